"""Every refusal is a JSON problem document (RFC 7807 / 9457): type, title, status, detail.

Handlers raise :class:`Problem`; the exception handlers installed by :func:`install_handlers`
turn it, FastAPI's validation errors, Starlette's HTTP errors (404, 405) and anything
unexpected (500) into ``application/problem+json`` responses, so a client never has to parse
an HTML error page and the server never dies of a request.

Example:
    >>> p = Problem(413, "request-too-large", "Request too large", "body over 16 MiB")
    >>> p.body()["status"], p.body()["type"]
    (413, 'urn:imgtriage:problem:request-too-large')
"""

from __future__ import annotations

import logging
from typing import Any

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:imgtriage:problem:"

log = logging.getLogger("imgtriage.serve")


class Problem(Exception):
    """A request the server refuses; ``extra`` adds members such as ``defects``."""

    def __init__(self, status: int, slug: str, title: str, detail: str, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"type": TYPE_PREFIX + self.slug, "title": self.title, "status": self.status,
                "detail": self.detail, **self.extra}


def problem_response(problem: Problem):
    from fastapi.responses import JSONResponse

    return JSONResponse(problem.body(), status_code=problem.status, headers=problem.headers,
                        media_type=PROBLEM_MEDIA_TYPE)


_HTTP_SLUGS = {400: ("bad-request", "Bad request"), 401: ("unauthorized", "Unauthorized"),
               404: ("not-found", "Not found"), 405: ("method-not-allowed", "Method not allowed"),
               413: ("request-too-large", "Request too large"),
               415: ("unsupported-media-type", "Unsupported media type")}


def install_handlers(app: Any) -> None:
    """Route every error a request can cause to a problem response."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def on_problem(request: Any, exc: Problem):
        return problem_response(exc)

    async def on_validation(request: Any, exc: RequestValidationError):
        errors = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(e['loc'])}: {e['msg']}" for e in errors)
        return problem_response(Problem(422, "invalid-parameters", "Invalid parameters",
                                        detail or "the request parameters are invalid",
                                        errors=errors))

    async def on_http(request: Any, exc: HTTPException):
        slug, title = _HTTP_SLUGS.get(exc.status_code, ("http-error", "HTTP error"))
        return problem_response(Problem(exc.status_code, slug, title, str(exc.detail),
                                        headers=dict(exc.headers or {})))

    async def on_unexpected(request: Any, exc: Exception):
        log.exception("unexpected error while serving %s %s", request.method, request.url.path)
        return problem_response(Problem(500, "internal-error", "Internal server error",
                                        f"the server failed on this request "
                                        f"({type(exc).__name__}); it keeps serving others"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
