"""imgtriage serve BUNDLE --host 127.0.0.1 --port 8000 --workers 1"""

from __future__ import annotations

from pathlib import Path

import typer


def serve_command(
    bundle: Path = typer.Argument(..., help="Bundle directory or .zip to serve."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0 for all)."),
    port: int = typer.Option(8000, help="TCP port."),
    workers: int = typer.Option(1, help="Worker processes; each loads the model once."),
    threads: int = typer.Option(None, help="Compute threads per worker "
                                           "(default: CPU cores / workers)."),
    backend: str = typer.Option("auto", help="auto (ONNX Runtime when the bundle has a "
                                             "graph), torch or onnx."),
    precision: str = typer.Option(None, help="fp32 or int8 ONNX graph (default: the "
                                             "bundle's: int8 only where its check accepted "
                                             "it)."),
    max_batch_size: int = typer.Option(16, help="Most images merged into one inference call."),
    max_wait_ms: float = typer.Option(50.0, help="How long the model may idle waiting for "
                                                 "requests known to be on their way (a lone "
                                                 "client never waits)."),
    max_queue: int = typer.Option(256, help="Images waiting for inference before 503."),
    max_request_bytes: int = typer.Option(16 * 1024 * 1024, help="Request body limit (413)."),
    max_images: int = typer.Option(32, help="Images per request (413 above)."),
    max_pixels: int = typer.Option(40_000_000, help="Pixels per image; larger images are "
                                                    "refused as too_many_pixels."),
    allowed_formats: str = typer.Option("jpeg,png,bmp,webp,gif,tiff,fits",
                                        help="Comma-separated formats accepted (checked from "
                                             "the bytes)."),
    request_timeout: float = typer.Option(30.0, help="Seconds a request may wait for its "
                                                     "inference (503 after)."),
    body_timeout: float = typer.Option(15.0, help="Seconds between pieces of a request body "
                                                  "(408 after)."),
    body_deadline: float = typer.Option(60.0, help="Seconds a whole request body may take "
                                                   "to arrive (408 after)."),
    max_decoded_bytes: int = typer.Option(64 * 2**20, help="Decode budget: bytes one image "
                                          "may take once decoded (too_large above)."),
    max_pages: int = typer.Option(64, help="Decode budget: pages, planes or HDUs one image "
                                           "may need (too_many_pages above)."),
    decode_timeout: float = typer.Option(5.0, help="Decode budget: seconds one image may "
                                                   "take to decode (decode_timeout, 422)."),
    expect_sha256: str = typer.Option(None, "--expect-sha256", help="Refuse to serve any "
                                      "bundle but the one with this sha256 (imgtriage "
                                      "inspect prints it)."),
    max_client_inflight: int = typer.Option(32, help="Open classify requests per client "
                                                     "(API key or address; 429 above)."),
    api_key_file: Path = typer.Option(None, help="File with one accepted bearer token per "
                                                 "line; without it no key is asked for."),
    cors_origin: list[str] = typer.Option(None, help="Allow this browser origin (repeat); "
                                                     "CORS is off without it."),
    root_path: str = typer.Option("", help="Path prefix a reverse proxy serves the app "
                                           "under, e.g. /imgtriage."),
    log_level: str = typer.Option("info", help="critical|error|warning|info|debug."),
    access_log: bool = typer.Option(True, help="Log one line per request."),
    legacy_classify_route: bool = typer.Option(
        False, "--legacy-classify-route", help="Also answer the old Flask backend's clients: "
        "POST /classify {\"image\": \"<base64>\"} -> one flat result (docs/service.md)."),
) -> None:
    """Serve a bundle over HTTP: POST /v1/classify, GET /v1/model, /livez, /readyz,
    /metrics and a web page at /."""
    from imgtriage.serve import ServeConfig
    from imgtriage.serve.app import serve

    cfg = ServeConfig(
        bundle=str(bundle), host=host, port=port, workers=workers, threads=threads,
        backend=backend, precision=precision, max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue, max_request_bytes=max_request_bytes, max_images=max_images,
        max_pixels=max_pixels,
        allowed_formats=tuple(f.strip().lower() for f in allowed_formats.split(",") if f.strip()),
        request_timeout_s=request_timeout, body_timeout_s=body_timeout,
        body_deadline_s=body_deadline, max_decoded_bytes=max_decoded_bytes,
        max_pages=max_pages, decode_timeout_s=decode_timeout, expect_sha256=expect_sha256,
        max_client_inflight=max_client_inflight,
        api_key_file=str(api_key_file) if api_key_file else None,
        cors_origins=tuple(cors_origin or ()), root_path=root_path, log_level=log_level,
        access_log=access_log, legacy_classify=legacy_classify_route)
    serve(cfg)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
