"""The typed manifest: one frozen dataclass, read from and written to ``manifest.json`` here
and only here.

``Bundle.info`` is a :class:`Manifest`; readers use its fields (``info.kind``,
``info.model.name``, ``info.profiles``, ``info.block("cascade")``) instead of string keys into
the raw dict. Writers build one too (``bundle.new_manifest``, then :meth:`Manifest.with_changes`)
and hand it to ``save_bundle``, which serialises it with :meth:`Manifest.to_dict`: the one
place a manifest becomes JSON. The raw dict stays what is on disk (``Bundle.manifest``): the
bundle's identity (``Bundle.sha256``) is the hash of exactly that, so reading never changes it.

Schema version 1 is the only one so far. Bundles written by early releases of it lack keys that
later writers always set (``kind``, ``bundle_version``, ``profiles``, ``history``, ``tta``,
``features``); :func:`upgrade` fills their defaults, so every v1 bundle reads the same way
(``tests/bundle/data/v1_classifier`` is one). A future schema version adds its step to
:func:`upgrade`, and a new record becomes an optional field here (default None or empty), so
older bundles keep reading. The blocks a kind or a step adds without a field of its own
(``cascade``, ``gallery``, ``onnx``, ``calibration``, ...) are named in :data:`BLOCKS` and kept
as data in ``blocks``; any other key, here or in a typed block, is refused with the list of
the known ones, so a misspelt writer fails when it writes, not when a reader misses the key.

Example:
    >>> m = Manifest.from_dict({"schema": "imgtriage.bundle", "schema_version": 1,
    ...     "model": {"name": "crop_cnn", "kwargs": {}, "in_chans": 1, "num_classes": 2},
    ...     "preprocess": {}, "classes": ["a", "b"], "decision": {}, "files": {}})
    >>> m.kind, m.bundle_version, m.model.in_chans, m.profiles, m.block("cascade")
    ('classifier', 1, 1, {}, None)
    >>> m.with_changes(cascade={"gate": 0.9}).block("cascade")
    {'gate': 0.9}
    >>> Manifest.from_dict(m.to_dict()) == m
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from imgtriage.errors import BundleSchemaError

SCHEMA = "imgtriage.bundle"

# Keys a v1 writer may have left out, with what they mean when absent.
V1_DEFAULTS: dict[str, Any] = {"kind": "classifier", "bundle_version": 1, "profiles": {},
                               "history": [], "tta": None, "features": None, "created": None,
                               "training": {}, "metrics": {}, "versions": {}}

# Top-level blocks kept as data (``Manifest.block``), and who writes each.
BLOCKS: dict[str, str] = {
    "onnx": "the ONNX graphs (training, export, import: bundle/graph.py)",
    "calibration": "each profile's calibration summary (training, calibrate)",
    "drift_reference": "the validation distributions a drift check compares with",
    "cascade": "the cascade kind's stages and gate (predict/_cascade_build.py)",
    "gallery": "the gallery kind's rule and tensors (predict/gallery.py)",
    "threshold_fit": "a gallery threshold fitted on its enrolled items",
    "scale_fit": "a gallery's logit scale: fitted on held-out similarities, or given "
                 "(predict/gallery_scale.py)",
    "imported": "where an imported model came from and how it checked (predict/importing.py)",
}


def upgrade(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A manifest dict as the current schema reads it: v1 keys that early writers omitted get
    their defaults (the caller's dict is not changed)."""
    out = dict(raw)
    for key, default in V1_DEFAULTS.items():
        if out.get(key) is None and default is not None:
            out[key] = type(default)(default)
        out.setdefault(key, default)
    return out


def plain(value: Any) -> Any:
    """``value`` as JSON holds it: tuples and sets to lists, NumPy numbers and arrays to
    Python ones, paths to text, mapping keys to text (what reading it back gives)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return plain(value.tolist())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__fspath__"):
        return str(value)
    raise BundleSchemaError(f"the manifest cannot hold a {type(value).__name__} "
                            f"({value!r:.60}); store numbers, text, lists or mappings")


def _exact(d: Any, keys: tuple[str, ...], required: tuple[str, ...], what: str,
           where: str) -> Mapping[str, Any]:
    if not isinstance(d, Mapping):
        raise BundleSchemaError(f"{where}: the manifest's {what} must be a JSON object, not "
                                f"{type(d).__name__}")
    unknown = sorted(set(d) - set(keys))
    missing = [k for k in required if k not in d]
    if unknown or missing:
        raise BundleSchemaError(
            f"{where}: the manifest's {what} "
            + (f"has unknown keys {unknown}" if unknown else "")
            + (" and " if unknown and missing else "")
            + (f"lacks {missing}" if missing else "")
            + f" (it takes {list(keys)}); the bundle was edited by hand or written by another "
              "version: restore it or write it again")
    return d


@dataclass(frozen=True)
class ModelRecord:
    """The architecture: registry name, its keyword arguments, input channels, outputs."""

    name: str
    kwargs: Mapping[str, Any]
    in_chans: int
    num_classes: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", plain(self.kwargs))

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ModelRecord:
        keys = ("name", "kwargs", "in_chans", "num_classes")
        d = _exact(d, keys, ("name", "in_chans", "num_classes"), "'model' block", where)
        try:
            return cls(str(d["name"]), dict(d.get("kwargs") or {}), int(d["in_chans"]),
                       int(d["num_classes"]))
        except (TypeError, ValueError) as exc:
            raise BundleSchemaError(f"{where}: the manifest's 'model' block needs a name and "
                                    f"whole numbers in_chans and num_classes ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs), "in_chans": self.in_chans,
                "num_classes": self.num_classes}


@dataclass(frozen=True)
class HistoryEntry:
    """One earlier version of the bundle (its manifest is ``history/manifest.v<N>.json``)."""

    version: int
    note: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> HistoryEntry:
        d = _exact(d, ("version", "note"), ("version",), "history entry", where)
        try:
            return cls(int(d["version"]), str(d.get("note", "")))
        except (TypeError, ValueError) as exc:
            raise BundleSchemaError(f"{where}: a history entry's version must be a whole "
                                    f"number ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "note": self.note}


_MAPPINGS = ("preprocess", "decision", "profiles", "files", "features", "training", "metrics",
             "versions", "blocks")


@dataclass(frozen=True)
class Manifest:
    """Everything that decides an answer, typed. ``preprocess`` and ``decision`` stay the
    dicts their own layers parse (``PreprocessSpec.from_dict``, ``DecisionPolicy.from_dict``);
    every mapping is held as JSON holds it (:func:`plain`), so writing and reading back give
    an equal record.
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

    def __post_init__(self) -> None:
        _check_blocks(self.blocks, "manifest")
        for name in _MAPPINGS:
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, plain(value))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "history", tuple(self.history))
        if self.tta is not None:
            object.__setattr__(self, "tta", tuple(str(v) for v in self.tta))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "manifest") -> Manifest:
        """The typed view of a validated manifest dict (v1 defaults filled in); unknown keys
        and malformed typed blocks are a :class:`~imgtriage.errors.BundleSchemaError`."""
        m = upgrade(raw)
        blocks = {k: v for k, v in m.items() if k not in _FIELDS | {"schema"}}
        _check_blocks(blocks, where)
        try:
            return cls(
                schema_version=int(m["schema_version"]), kind=str(m["kind"]),
                bundle_version=int(m["bundle_version"]),
                model=ModelRecord.from_dict(m["model"], where),
                preprocess=dict(m["preprocess"]), classes=tuple(m["classes"]),
                decision=dict(m["decision"] or {}),
                profiles={str(k): dict(v) for k, v in (m["profiles"] or {}).items()},
                files=dict(m["files"]),
                history=tuple(HistoryEntry.from_dict(h, where) for h in m["history"]),
                tta=tuple(m["tta"]) if m["tta"] is not None else None,
                features=dict(m["features"]) if m["features"] is not None else None,
                created=m["created"], training=dict(m["training"]),
                metrics=dict(m["metrics"]), versions=dict(m["versions"]),
                blocks=blocks)
        except KeyError as exc:
            raise BundleSchemaError(f"{where}: manifest lacks {exc.args[0]!r}; the bundle is "
                                    "incomplete") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleSchemaError(f"{where}: malformed manifest ({exc})") from None

    def to_dict(self) -> dict[str, Any]:
        """The manifest as ``manifest.json`` holds it (the one serialisation)."""
        out: dict[str, Any] = {
            "schema": SCHEMA, "schema_version": self.schema_version, "kind": self.kind,
            "bundle_version": self.bundle_version, "created": self.created,
            "model": self.model.to_dict(), "preprocess": dict(self.preprocess),
            "classes": list(self.classes), "features": self.features,
            "decision": dict(self.decision), "profiles": dict(self.profiles),
            "training": dict(self.training), "metrics": dict(self.metrics),
            "versions": dict(self.versions), "files": dict(self.files),
            "history": [h.to_dict() for h in self.history],
            "tta": list(self.tta) if self.tta is not None else None}
        out.update(self.blocks)
        return plain(out)

    def with_changes(self, **changes: Any) -> Manifest:
        """A copy with some fields or blocks replaced, each given as the manifest holds it
        (``model={...}``, ``history=[...]``, ``onnx={...}``); an unknown name is refused."""
        return Manifest.from_dict({**self.to_dict(), **changes})

    def block(self, name: str, default: Any = None) -> Any:
        """A top-level block this class has no field for (``cascade``, ``gallery``,
        ``onnx``, ...), or ``default``."""
        return self.blocks.get(name, default)


_FIELDS = frozenset(f.name for f in fields(Manifest)) - {"blocks"}


def _check_blocks(blocks: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(blocks) - set(BLOCKS))
    if unknown:
        raise BundleSchemaError(
            f"{where}: manifest keys {unknown} are not part of schema version 1 (it has "
            f"{sorted(_FIELDS | {'schema'})} and the blocks {sorted(BLOCKS)}); a writer's new "
            "block is named in imgtriage.bundle.record.BLOCKS, a bundle edited by hand is "
            "restored from its history/ or written again")
