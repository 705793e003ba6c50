"""``POST /classify``: the request and answer of the Flask backend imgtriage replaces.

Clients of that backend send one image as JSON ``{"image": "<base64>"}`` and read one flat
object back. With ``--legacy-classify-route`` (``ServeConfig.legacy_classify``) the service
answers them through the same runtime, batcher, limits, key check and decision rule as
``POST /v1/classify``, so their answers are the bundle's answers::

    {"class": "cat", "class_id": 0, "score": 0.93, "abstained": false, "reason": null,
     "probs": {"cat": 0.93, "dog": 0.07}}

An abstained image answers ``class`` = the unknown label, ``class_id`` -1, ``best_class`` and
the ``reason`` it abstained.
An image that cannot be classified answers 422 with the problem document of ``/v1`` plus
``error`` (the message, where the old backend put it). Other keys of the body are ignored,
so old clients that send more than ``image`` keep working.
"""

# No `from __future__ import annotations`: FastAPI reads the handler's annotations at runtime.

from typing import Any

from imgtriage.errors import require
from imgtriage.serve.config import ServeConfig
from imgtriage.serve.inputs import Upload, decode_base64
from imgtriage.serve.limits import ClientLimiter, iter_body, load_json_limited
from imgtriage.serve.problems import Problem

LEGACY_NAME = "image"
LEGACY_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "byte",
                  "description": "base64 file bytes (data: URLs accepted)"}}}}}}}


async def read_legacy_upload(request: Any, cfg: ServeConfig) -> Upload:
    """The one image of a ``{"image": "<base64>"}`` body (422 for any other shape)."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise Problem(415, "unsupported-media-type", "Unsupported media type",
                      f'send {{"image": "<base64>"}} as application/json, not {media!r}',
                      error="send the image as JSON {\"image\": \"<base64>\"}")
    chunks = [c async for c in iter_body(request, cfg.max_request_bytes, cfg.body_timeout_s,
                                         cfg.body_deadline_s)]
    try:
        doc = load_json_limited(b"".join(chunks))
    except ValueError as exc:  # bad JSON, bad UTF-8, too deep, absurd numbers
        raise Problem(400, "bad-json", "Invalid JSON", f"the body is not valid JSON: {exc}",
                      error="the body is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str):
        raise Problem(422, "invalid-body", "Invalid request body",
                      'expected a JSON object {"image": "<base64>"}',
                      error='expected a JSON object {"image": "<base64>"}')
    return Upload(LEGACY_NAME, decode_base64(doc["image"], "image"))


def legacy_answer(entry: dict[str, Any]) -> dict[str, Any]:
    """A result row in the old flat shape (no path: the old clients sent none)."""
    keys = ("class", "class_id", "score", "abstained", "reason", "best_class", "probs", "set",
            "flags")
    return {k: entry[k] for k in keys if k in entry}


def build_compat_router() -> Any:
    fastapi = require("fastapi", "serve")
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse

    router = fastapi.APIRouter()

    def api_key(request: Request) -> None:
        request.app.state.auth.check(request)

    @router.post("/classify", tags=["compatibility"], dependencies=[Depends(api_key)],
                 openapi_extra=LEGACY_BODY,
                 summary="One base64 image, the old backend's request and answer")
    async def classify_legacy(request: Request) -> JSONResponse:
        """``{"image": "<base64>"}`` -> ``{class, class_id, score, abstained, probs}``."""
        st = request.app.state
        st.runtime.require_ready()
        opts = st.runtime.options(include_probs=True)
        with st.limiter.hold(ClientLimiter.client_id(request, keyed=st.auth.enabled)):
            with st.runtime.batcher.receiving():
                upload = await read_legacy_upload(request, st.config)
            (entry,) = await st.runtime.classify([upload], opts)
        st.metrics.observe_rows([entry])
        if "issue" in entry:
            raise Problem(422, "unusable-images", "No usable image",
                          f"the image could not be classified ({entry['issue']})",
                          error=entry["message"], defects=[entry])
        return JSONResponse(legacy_answer(entry))

    return router
