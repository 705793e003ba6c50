"""Build the FastAPI app and run it under uvicorn.

Every app has its own metrics registry, model runtime, key check and limiter, so tests (or one
process serving two bundles) can build several side by side.

Example:
    >>> from imgtriage.serve import ServeConfig, create_app
    >>> app = create_app(ServeConfig(bundle="runs/digits/bundle"))  # doctest: +SKIP
    >>> # uvicorn.run(app) -- or `imgtriage serve runs/digits/bundle --port 8000`
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Any

from imgtriage._version import __version__
from imgtriage.errors import require
from imgtriage.predict.base import BasePredictor
from imgtriage.serve.auth import ApiKeyAuth
from imgtriage.serve.config import ENV_VAR, ServeConfig
from imgtriage.serve.limits import ClientLimiter, SecretQueryGuard
from imgtriage.serve.metrics import Metrics, MetricsMiddleware
from imgtriage.serve.problems import install_handlers
from imgtriage.serve.routes import STATIC_DIR, build_router
from imgtriage.serve.runtime import ModelRuntime

DESCRIPTION = """Classify images with an imgtriage bundle: calibrated scores, per-class
thresholds and an explicit "unknown" when the model should not decide. Every refusal is an
`application/problem+json` document."""


def create_app(config: ServeConfig, *, predictor: BasePredictor | None = None) -> Any:
    """The service for ``config.bundle`` (or an already loaded ``predictor``).

    The model loads (or, given, warms up) in the background once the app starts; ``/readyz``
    turns 200 when it can answer.
    """
    fastapi = require("fastapi", "serve")
    from fastapi.staticfiles import StaticFiles

    metrics = Metrics()
    runtime = ModelRuntime(config, metrics, predictor)

    @asynccontextmanager
    async def lifespan(app: Any):
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    app = fastapi.FastAPI(title="imgtriage", version=__version__, description=DESCRIPTION,
                          lifespan=lifespan)
    app.state.config = config
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.state.auth = ApiKeyAuth.from_file(config.api_key_file)
    app.state.limiter = ClientLimiter(config.max_client_inflight)
    install_handlers(app)
    app.include_router(build_router())
    if config.legacy_classify:
        from imgtriage.serve.compat import build_compat_router

        app.include_router(build_compat_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # sees every answer
    app.add_middleware(SecretQueryGuard)  # outermost: a credential in a URL goes no further
    return app


def app_from_env() -> Any:
    """uvicorn's factory in each worker process: the config ``serve`` put in the env."""
    config = ServeConfig.from_env()
    _log_to_stderr(config.log_level)
    return create_app(config)


def _log_to_stderr(level: str) -> None:
    """The service's own messages (model loaded, batcher errors) beside uvicorn's, at
    ``--log-level``; runs in each worker process. A host that already configured the
    ``imgtriage`` logger keeps its handlers."""
    logger = logging.getLogger("imgtriage")
    logger.setLevel("DEBUG" if level == "trace" else level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def runtime_line(bundle: Any, config: ServeConfig) -> str:
    """What each worker will run: backend, precision and threads (and why), from the manifest.

    Example:
        >>> runtime_line(load_bundle("b"), ServeConfig("b", threads=2))  # doctest: +SKIP
        "backend onnx, precision fp32, 2 threads (the bundle's verified graph)"
    """
    kind = bundle.info.kind
    if kind != "classifier":
        return f"a {kind} bundle, {config.compute_threads} threads per worker"
    from imgtriage.predict.backends import choose_runtime

    line = choose_runtime(bundle, config.backend, num_threads=config.compute_threads,
                          precision=config.precision).line()
    return line + (f", per worker x {config.workers}" if config.workers > 1 else "")


def serve(config: ServeConfig) -> None:
    """Check the bundle and the key file, then run uvicorn with ``config.workers`` processes.

    Problems a user can fix (a bad bundle, a missing key file) stop here with one clear error
    instead of in every worker.
    """
    uvicorn = require("uvicorn", "serve")
    from imgtriage.bundle import load_bundle

    b = load_bundle(config.bundle, expect_sha256=config.expect_sha256)
    ApiKeyAuth.from_file(config.api_key_file)
    print(f"serve: {runtime_line(b, config)}", flush=True)
    os.environ[ENV_VAR] = config.to_env()
    uvicorn.run("imgtriage.serve.app:app_from_env", factory=True, host=config.host,
                port=config.port, workers=config.workers, log_level=config.log_level,
                access_log=config.access_log, root_path=config.root_path,
                timeout_keep_alive=5, timeout_graceful_shutdown=10)
