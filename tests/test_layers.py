"""The layers point only down, and no package reads another package's private modules.

The allowed direction is written once, in ``LAYERS``: a package may import packages of lower
layers, and packages of its own layer only where ``SAME_LAYER_OK`` says so (train, evaluate
and predict use each other's public names). ``errors`` and ``_version`` sit below everything.
Every ``import`` statement counts, lazy ones inside functions included: an import moved into a
function is still a dependency. Imports under ``if TYPE_CHECKING:`` are annotations only; they
are exempt from the direction rule (not from the private rule). ``bundle`` stores and loads data:
it must not build models either (``BUNDLE_MUST_NOT_IMPORT``), nor export or run them: no import
of ONNX, ONNX Runtime or torch's exporter/networks, lazy or through ``require``
(``BUNDLE_MUST_NOT_RUN``; ``torch`` itself stays allowed for its version and safetensors' tensors).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imgtriage"

LAYERS: list[set[str]] = [
    {"errors", "_version"},
    {"io"},
    {"data"},
    {"models"},
    {"bundle"},
    {"train", "evaluate", "predict"},
    {"serve", "integrations", "cli", "demo", "__main__", "__init__"},
]
SAME_LAYER_OK = {"train", "evaluate", "predict", "serve", "integrations", "cli", "demo",
                 "__main__", "__init__"}
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
BUNDLE_MUST_NOT_IMPORT = {"models"}
BUNDLE_MUST_NOT_RUN = ("onnx", "onnxruntime", "torch.onnx", "torch.nn")


def _package(module: str) -> str:
    """``imgtriage.io._tiff`` -> ``io``; ``imgtriage`` (the facade) -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                lines.update(range(inner.lineno, (inner.end_lineno or inner.lineno) + 1))
    return lines


def _imports(path: Path) -> list[tuple[int, str, list[str], bool]]:
    """(line, imported module, names taken from it, annotation only) for every import."""
    here = _module_name(path).split(".")
    is_pkg_init = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, [], node.lineno in typing_only)
                       for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg_init else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            out.append((node.lineno, mod, [a.name for a in node.names],
                        node.lineno in typing_only))
    return out


def violations() -> dict[tuple[str, str], list[str]]:
    """(file, imported module) -> what is wrong with it, for every offending import."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        mine = _package(_module_name(path))
        rel = path.relative_to(SRC.parent).as_posix()
        for line, mod, names, typing_only in _imports(path):
            if mod != "imgtriage" and not mod.startswith("imgtriage."):
                continue
            where = f"{rel}:{line}"
            if mod == "imgtriage":  # `from imgtriage import x`: x is a package or a name
                pairs = [(n if n in RANK else "__init__", [n]) for n in names]
            else:
                pairs = [(_package(mod), names)]
            for theirs, taken in pairs:
                bad = _check(where, mine, theirs, mod, taken, typing_only)
                if bad:
                    found.setdefault((rel, mod), []).extend(bad)
    return found


def _check(where: str, mine: str, theirs: str, mod: str, names: list[str],
           typing_only: bool) -> list[str]:
    if theirs == mine:
        return []
    out = []
    if theirs not in RANK:
        out.append(f"{where}: imports {mod}, a package missing from LAYERS in this test")
    elif typing_only:
        pass
    elif RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and mine not in SAME_LAYER_OK):
        out.append(f"{where}: {mine} imports {mod}, a layer above it")
    elif mine == "bundle" and theirs in BUNDLE_MUST_NOT_IMPORT:
        out.append(f"{where}: bundle imports {mod}; building models belongs above bundle")
    private = [p for p in mod.split(".")[2:] if p.startswith("_") and p != "__init__"]
    private += [n for n in names if n.startswith("_") and n != "__version__"]
    if private:
        out.append(f"{where}: {mine} imports {', '.join(private)} private to {theirs} "
                   f"(from {mod})")
    return out


def test_every_package_is_placed():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and p.name != "__pycache__"}
    modules = {p.stem for p in SRC.glob("*.py")}
    assert packages | modules <= set(RANK), sorted((packages | modules) - set(RANK))


def test_layers_point_down_and_privates_stay_private():
    found = [msg for _, msgs in sorted(violations().items()) for msg in msgs]
    assert not found, "\n".join(["upward or private imports:", *found])


@pytest.mark.parametrize(("source", "bad"), [
    ("from imgtriage.predict import Predictor\n", True),
    ("from imgtriage.io._finish import finish\n", True),
    ("from imgtriage.predict.batch import _decode\n", True),
    ("import imgtriage.bundle\n", True),
    ("from imgtriage.data import discover\n", False),
    ("from imgtriage.errors import DataError\n", False),
    ("from ._x import y\n", False),
])
def test_the_check_itself(tmp_path, monkeypatch, source, bad):
    """A models module importing those lines: the check must flag exactly the bad ones."""
    fake = tmp_path / "imgtriage"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "m.py").write_text(source)
    (fake / "bundle").mkdir()
    (fake / "bundle" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                          "if TYPE_CHECKING:\n"
                                          "    from imgtriage.predict import Predictor\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert bool(violations()) is bad


def test_bundle_must_not_build_models(tmp_path, monkeypatch):
    fake = tmp_path / "imgtriage"
    (fake / "bundle").mkdir(parents=True)
    (fake / "bundle" / "b.py").write_text("def f():\n    from imgtriage.models import x\n")
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert list(violations()) == [("imgtriage/bundle/b.py", "imgtriage.models")]


def runtime_imports(package: str = "bundle") -> list[str]:
    """``file:line module`` for every import (lazy, annotation-only or via ``require("...")``)
    of a model runtime or exporter (``BUNDLE_MUST_NOT_RUN``) in ``package``."""
    found = []
    for path in sorted((SRC / package).rglob("*.py")):
        rel = path.relative_to(SRC.parent).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        mods = [(line, mod) for line, mod, _, _ in _imports(path)]
        mods += [(n.lineno, n.args[0].value) for n in ast.walk(tree)
                 if isinstance(n, ast.Call) and ast.unparse(n.func).endswith("require")
                 and n.args and isinstance(n.args[0], ast.Constant)
                 and isinstance(n.args[0].value, str)]
        found += [f"{rel}:{line} {mod}" for line, mod in mods
                  if any(mod == r or mod.startswith(r + ".") for r in BUNDLE_MUST_NOT_RUN)]
    return found


def test_bundle_exports_and_runs_no_models():
    """Export, parity checks, quantisation and ORT sessions live in predict/, not bundle/."""
    found = runtime_imports()
    assert not found, "\n".join(["bundle imports a model runtime (move it to predict/):",
                                  *found])


@pytest.mark.parametrize(("source", "bad"), [
    ("def f():\n    import onnxruntime as ort\n", True),
    ("def f():\n    return require('onnxruntime', 'onnx')\n", True),
    ("from onnxruntime.quantization import quantize_static\n", True),
    ("import torch.onnx\n", True),
    ("import onnxscript\n", False),
    ("def f():\n    from safetensors.torch import load\n", False),
])
def test_the_runtime_check_itself(tmp_path, monkeypatch, source, bad):
    fake = tmp_path / "imgtriage"
    (fake / "bundle").mkdir(parents=True)
    (fake / "bundle" / "b.py").write_text(source)
    monkeypatch.setattr(f"{__name__}.SRC", fake)
    assert bool(runtime_imports()) is bad
