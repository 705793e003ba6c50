"""Bundle kinds other than a plain classifier, and the loader of each.

Each built-in kind is listed here by the module and function that load it (imported on first
use), so no module registers itself by being imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from imgtriage.bundle import Bundle
from imgtriage.errors import BundleSchemaError

# kind -> (module, loader function): ``fn(bundle, backend=..., device=..., **kw) -> predictor``
KINDS: dict[str, tuple[str, str]] = {
    "cascade": ("imgtriage.predict.cascade", "load_cascade"),
    "gallery": ("imgtriage.predict.gallery", "load_gallery_predictor"),
}


def loader_for(kind: str, where: object = "bundle") -> Callable[..., Any]:
    """The loader of bundles of ``kind`` (anything but ``classifier``)."""
    if kind not in KINDS:
        raise BundleSchemaError(f"{where}: bundle kind {kind!r} is not known to this release "
                                f"(known: classifier, {', '.join(sorted(KINDS))}); upgrade "
                                "imgtriage")
    module, name = KINDS[kind]
    return getattr(importlib.import_module(module), name)


def load_special(bundle: Bundle, **kw: Any) -> Any:
    return loader_for(bundle.info.kind, bundle.path)(bundle, **kw)
