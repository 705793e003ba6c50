"""imgtriage serve BUNDLE [options]: one option per ServeConfig field.

The options are generated from the fields of :class:`~imgtriage.serve.config.ServeConfig`
(each field carries its help text and flag), as ``imgtriage train`` does from TrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from imgtriage.cli._options import argument, command, config_from_options
from imgtriage.serve.config import ServeConfig

PANELS = {"host": "Where and how many", "max_batch_size": "Batching and limits",
          "expect_sha256": "Access and deployment"}


def serve_command(**options: Any) -> None:
    """Serve a bundle over HTTP: POST /v1/classify, GET /v1/model, /livez, /readyz,
    /metrics and a web page at /."""
    from imgtriage.serve.app import serve

    bundle = options.pop("bundle")
    serve(config_from_options(ServeConfig, options, bundle=str(bundle)))


command(serve_command,
        arguments=[argument("bundle", "Bundle directory or .zip to serve.", Path)],
        configs=[ServeConfig], skip=("bundle",), panels=PANELS)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
