"""The ``imgtriage`` command. Each command module parses arguments and calls one library
function; errors from the library print as one clear line (exit code 2), not a traceback."""

from __future__ import annotations

import importlib
import os
import sys

import typer

from imgtriage.errors import ImgTriageError

# OpenMP threads that spin while waiting for work keep whole cores busy: on a CPU shared
# with other jobs PyTorch's 2-thread training step ran 2-6x slower than with sleeping waits.
# Sleeping at once (OMP_WAIT_POLICY=PASSIVE) costs ~16% on idle cores, a short bounded spin
# (GNU OpenMP's GOMP_SPINCOUNT, PyTorch's runtime on Linux) ~4%, and keeps 0.9x of passive's
# gain under load (bench/bench_omp_wait.py, docs/benchmarks.md). Set before torch loads its
# OpenMP runtime (no command module imports torch at import time); a setting of yours wins.
OPENMP_SPINCOUNT = "10000"
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINCOUNT)

app = typer.Typer(name="imgtriage", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False,
                  help="From a folder of labelled images to a calibrated classifier that knows "
                       "when to say 'unknown'.")

# Command modules, each with register(app). Optional ones may be absent in a slim install.
COMMAND_MODULES = ("train_cmd", "predict_cmd", "inspect_cmd", "demo_cmd", "evaluate_cmd",
                   "export_cmd", "serve_cmd", "cascade_cmd", "gallery_cmd", "import_cmd")


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"imgtriage.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"imgtriage.cli.{name}":
                continue
            raise
        mod.register(app)


_register_all()


def main() -> None:
    try:
        app()
    except ImgTriageError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except OSError as exc:  # a path in the way, no permission, a full disk: one line too
        typer.secho(f"error: {os_error_line(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def os_error_line(exc: OSError) -> str:
    """What the file system refused, on which path, and what to check.

    Example:
        >>> os_error_line(FileExistsError(17, "File exists", "runs/x"))[:45]
        "File exists: 'runs/x'; check the paths given "
    """
    where = f": {str(exc.filename)!r}" if exc.filename is not None else ""
    return (f"{exc.strerror or exc}{where}; check the paths given (DATA, BUNDLE, --out, "
            "--output): a file where a folder goes or the reverse, permissions, free space")


if __name__ == "__main__":  # pragma: no cover
    main()
