"""The HTTP routes: classify, model, health, metrics and the web page.

``POST /v1/classify`` answers 200 when at least one image became a result; the ``results``
list is aligned with the images sent, each entry either a result row (class, class_id, score,
abstained, optional probs/topk/set) or a defect ``{path, issue, message}``. When *no* image is
usable it answers a problem with every defect: 400 ``bad-base64`` when each was a JSON item that
is not valid base64, 415 when each was refused for its format (unknown bytes, a format this
server does not take, a name that contradicts the bytes), 422 otherwise (truncated,
undecodable, too many pixels, unusable shape, or a mix).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and Request/Query are imported lazily inside build_router().

from pathlib import Path
from typing import Any

from imgtriage.errors import require
from imgtriage.serve.inputs import read_uploads
from imgtriage.serve.limits import ClientLimiter
from imgtriage.serve.problems import PROBLEM_MEDIA_TYPE, Problem

STATIC_DIR = Path(__file__).resolve().parent / "static"
FORMAT_ISSUES = frozenset({"unsupported_format", "format_mismatch"})

_PROBLEM = {"content": {PROBLEM_MEDIA_TYPE: {"schema": {"type": "object"}}}}
CLASSIFY_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "properties": {"files": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {
        "type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"},
                       "description": "base64 file bytes (data: URLs accepted)"},
            "names": {"type": "array", "items": {"type": "string"},
                      "description": "optional labels echoed as each entry's path"}}}}}}}
CLASSIFY_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"description": text, **_PROBLEM} for code, text in (
        (400, "malformed body: bad JSON, base64 or multipart"),
        (401, "missing or wrong API key"), (408, "the body stalled (--body-timeout)"),
        (413, "body over --max-request-bytes or more than --max-images images"),
        (415, "not multipart/JSON, or every image in an unaccepted format"),
        (422, "invalid options, or no image could be used (per-image defects listed)"),
        (429, "this client has --max-client-inflight requests open"),
        (503, "not ready, queue full (--max-queue) or --request-timeout passed"))}


def build_router() -> Any:
    fastapi = require("fastapi", "serve")
    from fastapi import Depends, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, Response

    router = fastapi.APIRouter()

    def api_key(request: Request) -> None:
        request.app.state.auth.check(request)

    @router.post("/v1/classify", tags=["classify"], dependencies=[Depends(api_key)],
                 openapi_extra=CLASSIFY_BODY, responses=CLASSIFY_RESPONSES,
                 summary="Classify one or more images")
    async def classify(
        request: Request,
        include_probs: bool = Query(False, description="Add every class probability."),
        topk: int | None = Query(None, ge=1, le=1000, description="Add the k best classes."),
        tta: bool = Query(False, description="Test-time augmentation (bundle's views)."),
        profile: str | None = Query(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                                    description="A decision profile saved in the bundle."),
        temperature: float | None = Query(None, gt=0, le=1000,
                                          description="Override the bundle's temperature."),
    ) -> JSONResponse:
        """Images as multipart file parts or JSON base64; one entry per image, in order."""
        st = request.app.state
        st.runtime.require_ready()
        opts = st.runtime.options(include_probs=include_probs, topk=topk, tta=tta,
                                  profile=profile, temperature=temperature)
        with st.limiter.hold(ClientLimiter.client_id(request, keyed=st.auth.enabled)):
            with st.runtime.batcher.receiving():
                uploads = await read_uploads(request, st.config)
            entries = await st.runtime.classify(uploads, opts)
        st.metrics.observe_rows(entries)
        defects = [e for e in entries if "issue" in e]
        if len(defects) == len(entries):
            raise _no_usable_image(defects)
        return JSONResponse({"model": st.runtime.identity(),
                             "options": {"include_probs": include_probs, "topk": topk,
                                         "tta": tta, "profile": profile,
                                         "temperature": temperature},
                             "num_results": len(entries) - len(defects),
                             "num_defects": len(defects), "results": entries})

    @router.get("/v1/model", tags=["model"], dependencies=[Depends(api_key)],
                summary="What the served model is and which limits apply")
    async def model(request: Request) -> JSONResponse:
        st = request.app.state
        st.runtime.require_ready()
        cfg = st.config
        limits = {"max_request_bytes": cfg.max_request_bytes, "max_images": cfg.max_images,
                  "max_pixels": st.runtime.max_pixels, "max_batch_size": cfg.max_batch_size,
                  "allowed_formats": list(cfg.allowed_formats),
                  "request_timeout_s": cfg.request_timeout_s,
                  "body_timeout_s": cfg.body_timeout_s, "body_deadline_s": cfg.body_deadline_s,
                  **{k: v for k, v in st.runtime.budget.items() if k != "max_pixels"}}
        return JSONResponse({**st.runtime.description, "limits": limits,
                             "auth": st.auth.enabled})

    @router.get("/livez", tags=["health"], summary="The process is alive")
    async def livez(request: Request) -> JSONResponse:
        rt = request.app.state.runtime
        if rt.state == "failed":
            raise Problem(503, "model-failed", "Model unavailable",
                          f"the model failed to load: {rt.error}")
        return JSONResponse({"status": "alive"})

    @router.get("/readyz", tags=["health"], summary="The model is loaded and warmed up")
    async def readyz(request: Request) -> JSONResponse:
        rt = request.app.state.runtime
        rt.require_ready()
        return JSONResponse({"status": "ready", "queue_depth": rt.batcher.depth,
                             "bundle_sha256": rt.description.get("bundle_sha256")})

    @router.get("/metrics", tags=["health"], summary="Prometheus metrics (text format)")
    async def metrics(request: Request) -> Response:
        body, ctype = request.app.state.metrics.render()
        return Response(body, media_type=ctype)

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    return router


def _no_usable_image(defects: list[dict[str, Any]]) -> Problem:
    if all(d["issue"] == "bad_base64" for d in defects):
        return Problem(400, "bad-base64", "Invalid base64",
                       f"no image of the request is valid base64: {defects[0]['message']}",
                       defects=defects)
    if all(d["issue"] in FORMAT_ISSUES for d in defects):
        return Problem(415, "unsupported-image-format", "Unsupported image format",
                       "no image in the request is in a format this server reads; see "
                       "'defects'", defects=defects)
    issues = sorted({d["issue"] for d in defects})
    return Problem(422, "unusable-images", "No usable image",
                   f"no image in the request could be classified ({', '.join(issues)}); "
                   "see 'defects'", defects=defects)
