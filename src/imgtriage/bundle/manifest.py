"""The bundle manifest: a versioned schema that says everything that decides an answer."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from typing import Any

from imgtriage.bundle.checks import check_bounds
from imgtriage.bundle.record import SCHEMA, Manifest, ModelRecord
from imgtriage.errors import BundleSchemaError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "weights.safetensors"
REQUIRED_KEYS = ("schema", "schema_version", "model", "preprocess", "classes", "decision",
                 "files")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a bundle's numbers, recorded at save time."""
    import numpy
    import torch

    from imgtriage._version import __version__

    out = {"imgtriage": __version__, "python": platform.python_version(),
           "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - timm is a core dependency
        pass
    return out


def new_manifest(*, model_name: str, model_kwargs: dict[str, Any], in_chans: int,
                 preprocess: dict[str, Any], classes: list[str], decision: dict[str, Any],
                 training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
                 features: dict[str, Any] | None = None,
                 kind: str = "classifier") -> Manifest:
    """A fresh typed manifest (bundle_version 1); ``files`` is filled in by save_bundle, other
    fields and blocks with :meth:`~imgtriage.bundle.record.Manifest.with_changes`.

    ``decision`` is the decision record (``DecisionPolicy.to_dict()``; the default rule is
    ``DecisionPolicy().to_dict()``): the bundle stores it as data and never interprets it.
    """
    return Manifest(
        schema_version=SCHEMA_VERSION, kind=kind, bundle_version=1,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        model=ModelRecord(model_name, dict(model_kwargs), int(in_chans), len(classes)),
        preprocess=preprocess, classes=tuple(classes), features=features,
        decision=dict(decision), profiles={}, training=training or {}, metrics=metrics or {},
        versions=library_versions(), files={}, history=())


def validate_manifest(m: Any, where: str) -> dict[str, Any]:
    """Check the schema name, version and required keys; say exactly what is wrong."""
    if not isinstance(m, dict):
        raise BundleSchemaError(f"{where}: manifest.json must hold a JSON object")
    if m.get("schema") != SCHEMA:
        raise BundleSchemaError(f"{where}: not an imgtriage bundle (schema is "
                                f"{m.get('schema')!r}, expected {SCHEMA!r})")
    version = m.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise BundleSchemaError(f"{where}: bundle schema version {version!r} is not supported "
                                f"by this release (reads {SUPPORTED_SCHEMA_VERSIONS}); upgrade "
                                "imgtriage or re-export the bundle")
    missing = [k for k in REQUIRED_KEYS if k not in m]
    if missing:
        raise BundleSchemaError(f"{where}: manifest lacks {missing}; the bundle is incomplete")
    check_bounds(m, where)
    if len(m["classes"]) != m["model"].get("num_classes"):
        raise BundleSchemaError(f"{where}: {len(m['classes'])} class names for a model with "
                                f"{m['model'].get('num_classes')} outputs")
    Manifest.from_dict(m, where)  # unknown keys and malformed typed blocks, said here
    return m
