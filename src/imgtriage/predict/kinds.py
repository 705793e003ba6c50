"""Bundle kinds other than a plain classifier (cascade, gallery, ...) register a loader here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from imgtriage.bundle import Bundle
from imgtriage.errors import BundleSchemaError

_LOADERS: dict[str, Callable[..., Any]] = {}


def register_kind(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: ``fn(bundle, backend=..., device=...) -> predictor`` for bundles of ``kind``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _LOADERS[kind] = fn
        return fn

    return deco


def load_special(bundle: Bundle, **kw: Any) -> Any:
    kind = bundle.manifest.get("kind")
    _import_builtin_kinds()
    if kind not in _LOADERS:
        raise BundleSchemaError(f"{bundle.path}: bundle kind {kind!r} is not known to this "
                                f"release (known: classifier, {', '.join(sorted(_LOADERS))})")
    return _LOADERS[kind](bundle, **kw)


def _import_builtin_kinds() -> None:
    import importlib

    for mod in ("imgtriage.predict.cascade", "imgtriage.models.gallery"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
