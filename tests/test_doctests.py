"""Every docstring example in src/imgtriage runs and stays true (``make test`` runs this)."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> list[str]:
    names = []
    for f in sorted((SRC / "imgtriage").rglob("*.py")):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(parts))
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files (a result store) write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} fail; run " \
                               f"python -m doctest -v on {module.__file__}"


def test_examples_are_found():
    """The collection walks every module (a broken walk would pass with nothing to run)."""
    names = _modules()
    assert "imgtriage.predict.predictor" in names and "imgtriage.train.run" in names
    assert sum(len(doctest.DocTestFinder().find(importlib.import_module(n))) for n in
               ("imgtriage.evaluate.metrics", "imgtriage.models.gallery")) > 0
