"""The run settings of ``imgtriage predict`` (where results go, backend, workers, the engine,
the decode budget), as one frozen record; the per-call decision options are
:class:`~imgtriage.predict.base.PredictOptions`.

Each field carries its ``--help`` text in ``metadata["help"]`` (``cli/_options.py`` builds the
command's options from them); errors name the CLI flag that sets the value. No heavy imports
here: the CLI imports this module at start-up.

Example:
    >>> cfg = PredictRunConfig(output="out.csv", store="run.sqlite", workers=4)
    >>> cfg.output, cfg.backend, cfg.engine
    (PosixPath('out.csv'), 'auto', 'local')
    >>> PredictRunConfig(executor="fork")
    Traceback (most recent call last):
    ...
    imgtriage.errors.ConfigError: executor must be thread or process, got 'fork' (--executor)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgtriage.errors import ConfigError

ENGINES = ("local", "ray")
EXECUTORS = ("thread", "process")


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class PredictRunConfig:
    """How ``imgtriage predict`` runs: its report, store and defect log, the model's backend
    and threads, the decoding workers, the engine (this machine or Ray), the decode budget
    (None: the bundle's) and the feature manifest of image + feature bundles."""

    output: Path = field(default=Path("results.json"), metadata={
        "help": "Report file: .json, .jsonl, .csv or .parquet.", "short": "-o"})
    store: Path | None = field(default=None, metadata={"help": (
        "SQLite result store: every row is kept as it is produced; run again with the same "
        "store to resume (files with the same path, size and mtime are skipped).")})
    new_only: bool = _f(False, "Classify only files the store has never seen, and report only "
                               "those (needs --store).", switch=True)
    defect_log: Path | None = field(default=None, metadata={"help": (
        "Also write the defects alone to this .json (or .jsonl) file.")})
    batch_size: int | None = _f(None, "Images per inference batch (default: what the backend "
                                      "runs best: 16 ONNX, 32 torch).")
    thresholds: str | None = _f(None, "Override the per-class thresholds: one value for all, "
                                      "or comma-separated in class order.")
    backend: str = _f("auto", "auto (ONNX Runtime when the bundle has a graph), torch or "
                              "onnx.")
    precision: str | None = _f(None, "fp32 or int8 ONNX graph (default: the bundle's: int8 "
                                     "only where its check accepted it).")
    device: str = _f("cpu", "torch device, e.g. cpu or cuda:0.")
    workers: int | None = _f(None, "Decoding workers (default: one per core, >= 2).")
    executor: str = _f("thread", "Decoding workers are threads or processes.")
    threads: int | None = _f(None, "Compute threads for the model (default: cores).")
    progress: bool = _f(True, "Show a live progress line.")
    engine: str = _f("local", "local (this machine) or ray (a Ray cluster; needs "
                              "imgtriage[ray]).")
    address: str | None = _f(None, "Ray cluster address for --engine ray (default: start a "
                                   "local one).")
    expect_sha256: str | None = _f(None, "Refuse any bundle but the one with this sha256 "
                                         "(imgtriage inspect prints it): pins a deployment to "
                                         "a bundle.")
    max_pixels: int | None = _f(None, "Decode budget: pixels per image (default: the "
                                      "bundle's, 100M).")
    max_decoded_bytes: int | None = _f(None, "Decode budget: bytes one file may take once "
                                             "decoded (default: the bundle's, 64 MiB).")
    max_pages: int | None = _f(None, "Decode budget: pages, planes or HDUs one file may need "
                                     "(default: the bundle's, 256).")
    decode_timeout: float | None = _f(None, "Decode budget: seconds one file may take to "
                                            "decode (default: the bundle's, 30).")
    feature_manifest: Path | None = field(default=None, metadata={"help": (
        "Image + feature bundles trained with --feature-columns: a CSV/JSONL with path and "
        "those columns for the files (files not listed get them imputed and flagged).")})

    def __post_init__(self) -> None:
        for name in ("output", "store", "defect_log", "feature_manifest"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be local or ray, got {self.engine!r} (--engine)")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor must be thread or process, got {self.executor!r} "
                              "(--executor)")
        for name in ("batch_size", "workers", "threads", "max_pixels", "max_decoded_bytes",
                     "max_pages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value} "
                                  f"(--{name.replace('_', '-')})")
        if self.decode_timeout is not None and not self.decode_timeout > 0:
            raise ConfigError(f"decode_timeout must be > 0, got {self.decode_timeout} "
                              "(--decode-timeout)")

    def read_limits(self) -> dict[str, Any]:
        """The decode budget as ``predict.limits.with_read_limits`` takes it."""
        return {"max_pixels": self.max_pixels, "max_decoded_bytes": self.max_decoded_bytes,
                "max_pages": self.max_pages, "decode_timeout_s": self.decode_timeout}


@dataclass(frozen=True)
class ReportConfig:
    """What ``imgtriage report`` / ``runner.report_from_store`` writes from a result store:
    the report file and, optionally, the defects alone."""

    output: Path = field(metadata={"help": "Report file: .json, .jsonl, .csv or .parquet.",
                                   "short": "-o"})
    defect_log: Path | None = field(default=None, metadata={"help": (
        "Also write the defects alone (.json or .jsonl).")})


def parse_thresholds(text: str | None, n_classes: int) -> tuple[float, ...] | None:
    """``"0.6"`` (every class) or ``"0.5,0.7,0.6"`` (one per class, in the bundle's order).

    Example:
        >>> parse_thresholds("0.6", 3)
        (0.6, 0.6, 0.6)
    """
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--thresholds takes numbers separated by commas, got {text!r}") from None
    if len(values) == 1:
        return values * n_classes
    if len(values) != n_classes:
        raise ConfigError(f"--thresholds has {len(values)} values for {n_classes} classes; give "
                          "one value for all classes or one per class")
    return values
