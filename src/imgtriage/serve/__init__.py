"""The HTTP service: ``imgtriage serve BUNDLE`` or :func:`create_app` for an ASGI server.

Routes: ``POST /v1/classify``, ``GET /v1/model``, ``/livez``, ``/readyz``, ``/metrics`` and the
web page at ``/``. FastAPI, uvicorn and prometheus-client come with ``imgtriage[serve]``;
nothing here imports them until an app is built.
"""

from imgtriage.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve", "app_from_env"):
        from imgtriage.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'imgtriage.serve' has no attribute {name!r}")
