"""Every file once, whatever its name or kind: odd names, special files, hidden files, the same
folder named three ways, a store that is not ours, and names that are spreadsheet formulas."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
from imgtriage.predict.runner import run_batch
from imgtriage.predict.sinks import csv_cell, safe_text


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor.load(tiny_bundle, backend="torch", num_threads=1)


@pytest.fixture
def good_png(digits_folder) -> bytes:
    return next((digits_folder / "d3").glob("*.png")).read_bytes()


def _report_paths(report: Path) -> list[str]:
    data = json.loads(report.read_text())
    return [r["path"] for r in data["results"]] + [d["path"] for d in data["defects"]]


def _run(predictor, paths, **kw):
    """run_batch in a thread, so a run that blocks fails the test instead of hanging it."""
    out: list = []

    def target() -> None:
        try:
            out.append(run_batch(predictor, paths, workers=1, **kw))
        except BaseException as exc:
            out.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the batch run blocked"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_a_name_that_is_not_utf8_is_stored_exactly_and_reported_safely(tmp_path, predictor,
                                                                        good_png):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    raw = os.fsencode(inbox) + b"/caf\xe9.png"
    with open(raw, "wb") as fh:
        fh.write(good_png)
    store = tmp_path / "run.sqlite"
    for suffix in (".json", ".jsonl", ".csv", ".parquet"):
        run = _run(predictor, [inbox], store=store, output=tmp_path / f"r{suffix}")
        assert run.n_results == 1
    shown = safe_text(os.fsdecode(raw))
    assert shown.endswith("caf\\xe9.png")
    assert _report_paths(tmp_path / "r.json") == [shown]
    assert shown in (tmp_path / "r.csv").read_text(encoding="utf-8")
    keys = [k for (k,) in sqlite3.connect(store).execute("SELECT path FROM items")]
    assert keys == [raw]  # the exact bytes, not a rendering
    again = _run(predictor, [inbox], store=store)
    assert again.n_skipped == 1 and again.n_new == 0


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_named_like_an_image_is_a_defect_and_does_not_block(tmp_path, predictor,
                                                                  good_png):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(good_png)
    os.mkfifo(inbox / "x.jpg")
    try:
        _run(predictor, [inbox], output=tmp_path / "r.json")
    finally:
        if not (tmp_path / "r.json").exists():  # unblock a reader stuck on the FIFO
            fd = os.open(inbox / "x.jpg", os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
    defects = json.loads((tmp_path / "r.json").read_text())["defects"]
    assert [(Path(d["path"]).name, d["issue"]) for d in defects] == [("x.jpg", "not_regular_file")]


def test_hidden_files_are_classified_or_reported_never_dropped(tmp_path, predictor, good_png):
    inbox = tmp_path / "inbox"
    (inbox / ".cache").mkdir(parents=True)
    (inbox / ".hidden.png").write_bytes(good_png)
    (inbox / ".cache" / "b.png").write_bytes(good_png)
    (inbox / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    _run(predictor, [inbox], output=tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert sorted(Path(r["path"]).name for r in data["results"]) == [".hidden.png", "b.png"]
    assert [(Path(d["path"]).name, d["issue"]) for d in data["defects"]] == [
        (".DS_Store", "unsupported_format")]


def test_one_folder_named_three_ways_is_one_row_per_file(tmp_path, predictor, good_png,
                                                         monkeypatch):
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "a.png").write_bytes(good_png)
    (inbox / "sub" / "b.png").write_bytes(good_png)
    store = tmp_path / "one.sqlite"
    monkeypatch.chdir(inbox)
    for given in ("../inbox", str(inbox), ".", "./sub/../a.png"):
        _run(predictor, [given], store=store, output=tmp_path / "r.json")
    paths = sorted(os.path.abspath(p) for p in _report_paths(tmp_path / "r.json"))
    assert paths == [str(inbox / "a.png"), str(inbox / "sub" / "b.png")]
    one_run = _run(predictor, [".", str(inbox)], output=tmp_path / "twice.json")
    twice = sorted(os.path.abspath(p) for p in _report_paths(tmp_path / "twice.json"))
    assert twice == paths and one_run.n_results == 2


def test_a_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path, predictor, good_png):
    foreign = tmp_path / "app.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO users (name) VALUES ('ada')")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    (tmp_path / "a.png").write_bytes(good_png)
    with pytest.raises(ConfigError, match="not an imgtriage result store") as info:
        run_batch(predictor, [tmp_path / "a.png"], store=foreign)
    assert "users" in str(info.value) and "--store" in str(info.value)
    assert foreign.read_bytes() == before
    assert not Path(str(foreign) + "-wal").exists()


FORMULAS = ['=HYPERLINK("http://x.example","y")', "+1+2", "-2+3", "@SUM(A1)", "\tx", "\rx"]


@pytest.mark.parametrize("text", FORMULAS)
def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path, text):
    from imgtriage.predict.sinks import write_report_as

    report = {"meta": {}, "results": [{"path": text, "class": text, "class_id": 0,
                                       "score": -0.5, "abstained": False, "note": text}],
              "defects": [{"path": text, "issue": "decode_error", "message": text}]}
    write_report_as(report, tmp_path / "r.csv")
    with (tmp_path / "r.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        for key, value in row.items():
            assert key == "score" or not value.startswith(tuple("=+-@\t\r")), row
    assert rows[0]["path"] == "'" + text and rows[0]["score"] == "-0.5"
    assert csv_cell("-0.25") == "-0.25"  # numbers stay numbers


def test_a_file_named_like_a_formula_end_to_end(tmp_path, predictor, good_png):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "=HYPERLINK(x).png").write_bytes(good_png)
    (inbox / "@x.txt").write_bytes(b"notes")
    _run(predictor, [inbox], output=tmp_path / "r.csv")
    with (tmp_path / "r.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["kind"] for r in rows) == ["defect", "result"]
    assert all(not v.startswith(tuple("=+-@\t\r")) for r in rows for v in r.values())


def test_a_file_given_twice_and_a_directory_copy_stay_distinct_files(tmp_path, predictor,
                                                                     good_png):
    a = tmp_path / "a"
    a.mkdir()
    (a / "x.png").write_bytes(good_png)
    shutil.copytree(a, tmp_path / "b")
    run = _run(predictor, [a / "x.png", tmp_path / "b", a], output=tmp_path / "r.json")
    assert run.n_results == 2


def test_a_file_stuck_in_its_decoder_is_a_timeout_and_the_run_goes_on(tmp_path, predictor,
                                                                      good_png, monkeypatch):
    """A decode that never reaches the io layer's own checks (stuck in C, say) is not waited
    for past the budget: that file becomes decode_timeout, every other file is classified."""
    import threading as th

    import imgtriage.predict.batch as batch
    from imgtriage.predict.limits import with_read_limits

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(5):
        (inbox / f"{i}.png").write_bytes(good_png)
    release = th.Event()
    real = batch.decode_entry

    def stuck_on_2(decoder, path, *args, **kwargs):
        if path.endswith("2.png"):
            release.wait(60)
        return real(decoder, path, *args, **kwargs)

    monkeypatch.setattr(batch, "decode_entry", stuck_on_2)
    quick = with_read_limits(predictor, decode_timeout_s=1.0)
    try:
        rows = dict(_pairs(batch.iter_predictions(quick, [inbox], batch_size=2, workers=2)))
    finally:
        release.set()
    assert rows[str(inbox / "2.png")] == "decode_timeout"
    assert [rows[str(inbox / f"{i}.png")] for i in (0, 1, 3, 4)] == ["result"] * 4


def _pairs(items):
    for kind, item in items:
        yield item["path"], item.get("issue") if kind == "defect" else "result"


def _remove_deep(top: Path) -> None:
    """Remove a tree of any depth without recursion (pytest's own clean-up uses
    shutil.rmtree, which recurses and would fail on the next run, here and elsewhere)."""
    folders, stack = [], [str(top)]
    while stack:
        folder = stack.pop()
        folders.append(folder)
        with os.scandir(folder) as listing:
            for entry in listing:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


@pytest.fixture
def deep_inbox(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    yield inbox
    _remove_deep(inbox)


def test_deep_folders_and_links_to_folders_are_never_lost(tmp_path, predictor, good_png,
                                                          deep_inbox):
    inbox = deep_inbox
    fd = os.open(inbox, os.O_RDONLY)
    try:  # 1,200 nested folders, built one level at a time (no recursion anywhere)
        for _ in range(1200):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, good_png)
        os.close(out)
    finally:
        os.close(fd)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.png").write_bytes(good_png)
    (inbox / "linked").symlink_to(elsewhere, target_is_directory=True)
    _run(predictor, [inbox], output=tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert [Path(r["path"]).name for r in data["results"]] == ["deep.png"]
    assert [(Path(d["path"]).name, d["issue"]) for d in data["defects"]] == [
        ("linked", "not_found")]
    assert "link to a folder" in data["defects"][0]["message"]


def test_outputs_that_are_folders_or_the_store_are_refused_before_the_run(tmp_path, predictor,
                                                                         good_png):
    (tmp_path / "a.png").write_bytes(good_png)
    (tmp_path / "out.json").mkdir()
    with pytest.raises(ConfigError, match="--output"):
        run_batch(predictor, [tmp_path / "a.png"], output=tmp_path / "out.json")
    with pytest.raises(ConfigError, match="same file"):
        run_batch(predictor, [tmp_path / "a.png"], output=tmp_path / "r.parquet",
                  store=tmp_path / "r.parquet")


def test_the_python_api_reports_a_file_named_twice_once(tmp_path, predictor, good_png,
                                                        monkeypatch):
    (tmp_path / "a.png").write_bytes(good_png)
    monkeypatch.chdir(tmp_path)
    report = predictor.predict_paths([".", str(tmp_path), "a.png", "./a.png"])
    assert len(report["results"]) + len(report["defects"]) == 1


def test_a_store_keyed_by_relative_paths_resumes_without_a_second_row(tmp_path, predictor,
                                                                      good_png, monkeypatch):
    (tmp_path / "a.png").write_bytes(good_png)
    (tmp_path / "b.png").write_bytes(good_png)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "s.sqlite"
    _run(predictor, ["a.png", "b.png"], store=store)
    con = sqlite3.connect(store)  # as a store of the earlier release: keys as given
    con.execute("UPDATE items SET path = ? WHERE path = ?", ("a.png", str(tmp_path / "a.png")))
    con.execute("UPDATE items SET path = ? WHERE path = ?", ("b.png", str(tmp_path / "b.png")))
    con.commit()
    con.close()
    (tmp_path / "b.png").write_bytes(good_png + b"")  # unchanged content, new mtime
    os.utime(tmp_path / "b.png", ns=(1, 1))
    again = _run(predictor, ["a.png", "b.png"], store=store, output=tmp_path / "r.json")
    assert again.n_skipped == 1 and again.n_new == 1
    assert sorted(_report_paths(tmp_path / "r.json")) == ["a.png", "b.png"]
