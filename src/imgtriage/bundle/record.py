"""The typed manifest: one frozen dataclass read from ``manifest.json``, in this one place.

``Bundle.info`` is a :class:`Manifest`; readers use its fields (``info.kind``,
``info.model.name``, ``info.profiles``, ``info.block("cascade")``) instead of string keys into
the raw dict. The raw dict stays what is on disk (``Bundle.manifest``): the bundle's identity
(``Bundle.sha256``) is the hash of exactly that, so reading never changes it.

Schema version 1 is the only one so far. Bundles written by early releases of it lack keys that
later writers always set (``kind``, ``bundle_version``, ``profiles``, ``history``, ``tta``,
``features``); :func:`upgrade` fills their defaults, so every v1 bundle reads the same way
(``tests/bundle/data/v1_classifier`` is one). A future schema version adds its step to
:func:`upgrade`, and a new record becomes an optional field here (default None or empty), so
older bundles keep reading; until then any other top-level block (a kind's ``cascade`` or
``gallery`` block, ``onnx``, ``int8``, ...) is kept as data in ``blocks``.

Example:
    >>> m = Manifest.from_dict({"schema": "imgtriage.bundle", "schema_version": 1,
    ...     "model": {"name": "crop_cnn", "kwargs": {}, "in_chans": 1, "num_classes": 2},
    ...     "preprocess": {}, "classes": ["a", "b"], "decision": {}, "files": {}})
    >>> m.kind, m.bundle_version, m.model.in_chans, m.profiles, m.block("cascade")
    ('classifier', 1, 1, {}, None)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from imgtriage.errors import BundleSchemaError

# Keys a v1 writer may have left out, with what they mean when absent.
V1_DEFAULTS: dict[str, Any] = {"kind": "classifier", "bundle_version": 1, "profiles": {},
                               "history": [], "tta": None, "features": None, "created": None,
                               "training": {}, "metrics": {}, "versions": {}}


def upgrade(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest dict as the current schema reads it: v1 keys that early writers omitted get
    their defaults (the caller's dict is not changed)."""
    out = dict(raw)
    for key, default in V1_DEFAULTS.items():
        if out.get(key) is None and default is not None:
            out[key] = type(default)(default)
        out.setdefault(key, default)
    return out


@dataclass(frozen=True)
class ModelRecord:
    """The architecture: registry name, its keyword arguments, input channels, outputs."""

    name: str
    kwargs: Mapping[str, Any]
    in_chans: int
    num_classes: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ModelRecord:
        try:
            return cls(str(d["name"]), dict(d.get("kwargs") or {}), int(d["in_chans"]),
                       int(d["num_classes"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleSchemaError(f"{where}: the manifest's 'model' block needs name, "
                                    f"in_chans and num_classes ({exc})") from None


@dataclass(frozen=True)
class HistoryEntry:
    """One earlier version of the bundle (its manifest is ``history/manifest.v<N>.json``)."""

    version: int
    note: str


@dataclass(frozen=True)
class Manifest:
    """Everything that decides an answer, typed. ``preprocess`` and ``decision`` stay the
    dicts their own layers parse (``PreprocessSpec.from_dict``, ``DecisionPolicy.from_dict``).
    """

    schema_version: int
    kind: str
    bundle_version: int
    model: ModelRecord
    preprocess: Mapping[str, Any]
    classes: tuple[str, ...]
    decision: Mapping[str, Any]
    profiles: Mapping[str, Mapping[str, Any]]
    files: Mapping[str, str]
    history: tuple[HistoryEntry, ...]
    tta: tuple[str, ...] | None = None
    features: Mapping[str, Any] | None = None
    created: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    blocks: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "manifest") -> Manifest:
        """The typed view of a validated manifest dict (v1 defaults filled in)."""
        m = upgrade(raw)
        known = {f.name for f in fields(cls)} | {"schema"}
        return cls(
            schema_version=int(m["schema_version"]), kind=str(m["kind"]),
            bundle_version=int(m["bundle_version"]),
            model=ModelRecord.from_dict(m["model"], where),
            preprocess=dict(m["preprocess"]), classes=tuple(str(c) for c in m["classes"]),
            decision=dict(m["decision"] or {}),
            profiles={str(k): dict(v) for k, v in (m["profiles"] or {}).items()},
            files=dict(m["files"]),
            history=tuple(HistoryEntry(int(h["version"]), str(h.get("note", "")))
                          for h in m["history"]),
            tta=tuple(m["tta"]) if m["tta"] is not None else None,
            features=dict(m["features"]) if m["features"] is not None else None,
            created=m["created"], training=dict(m["training"]), metrics=dict(m["metrics"]),
            versions=dict(m["versions"]),
            blocks={k: v for k, v in m.items() if k not in known})

    def block(self, name: str, default: Any = None) -> Any:
        """A top-level block this class has no field for yet (``cascade``, ``gallery``,
        ``onnx``, ...), or ``default``."""
        return self.blocks.get(name, default)
