"""The top-level facade: every public name importable, and the README's Python snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import imgtriage
from shared_helpers import write_digits_folder

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", imgtriage.__all__)
def test_every_public_name_resolves(name):
    obj = getattr(imgtriage, name)
    assert obj is not None
    if name != "__version__":
        assert callable(obj), f"imgtriage.{name} is {type(obj).__name__}, not callable"


def test_train_stays_the_function_after_the_subpackage_is_imported():
    import importlib

    config = importlib.import_module("imgtriage.train.config")
    importlib.import_module("imgtriage.train.run")
    assert imgtriage.TrainConfig is config.TrainConfig
    assert callable(imgtriage.train) and imgtriage.train.__module__ == "imgtriage"


def _readme_python() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no ```python block"
    return blocks[0]


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The snippet as written, in a folder holding the files it names (2 epochs, not 30)."""
    code = _readme_python()
    assert "imgtriage.train(" in code and "epochs=30" in code
    write_digits_folder(tmp_path / "data", per_class=12, classes=(0, 1, 7))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for f in sorted((tmp_path / "data" / "d7").iterdir())[:3]:
        (inbox / f.name).write_bytes(f.read_bytes())
    (inbox / "broken.png").write_bytes(b"not a png")
    (tmp_path / "a.png").write_bytes(next((tmp_path / "data" / "d0").iterdir()).read_bytes())
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code.replace("epochs=30", "epochs=2"), str(README), "exec"), scope)
    report, rows = scope["report"], scope["rows"]
    assert set(report) == {"meta", "results", "defects"}
    assert len(report["results"]) == 3 and [d["path"] for d in report["defects"]] == [
        str(Path("inbox/broken.png"))]
    assert len(rows) == 1 and rows[0]["path"] == "a.png"
    assert rows[0]["class"] in {"d0", "d1", "d7", "unknown"}
    assert Path(scope["res"].bundle_path).is_dir()
