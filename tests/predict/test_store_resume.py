"""The result store: resume after SIGKILL, skip what is done, --new-only, identity checks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor
from imgtriage.predict.runner import report_from_store, run_batch
from imgtriage.predict.store import ResultStore


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor.load(tiny_bundle, backend="torch", num_threads=1)


@pytest.fixture
def inbox(tmp_path, digits_folder):
    root = tmp_path / "inbox"
    for c in (0, 5):
        shutil.copytree(digits_folder / f"d{c}", root / f"d{c}")
    (root / "empty.png").write_bytes(b"")
    return root


def _stored(db: Path) -> dict[str, tuple[str, dict]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {p: (k, json.loads(d)) for p, k, d in
                con.execute("SELECT path, kind, data FROM items")}
    finally:
        con.close()


def test_second_run_skips_done_files_and_redoes_changed_ones(predictor, inbox, tmp_path):
    db, out = tmp_path / "s.sqlite", tmp_path / "r.json"
    first = run_batch(predictor, [inbox], output=out, store=db)
    n = first.n_new
    assert n == 61 and first.n_skipped == 0 and first.n_defects == 1
    again = run_batch(predictor, [inbox], output=out, store=db)
    assert (again.n_new, again.n_skipped, again.n_results + again.n_defects) == (0, n, n)
    changed = sorted((inbox / "d0").glob("*.png"))[0]
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    shutil.copy(changed, inbox / "d0" / "new.png")
    third = run_batch(predictor, [inbox], output=out, store=db)
    assert (third.n_new, third.n_skipped) == (2, n - 1)
    report = json.loads(out.read_text())
    paths = [r["path"] for r in report["results"]] + [d["path"] for d in report["defects"]]
    assert len(paths) == len(set(paths)) == n + 1 == report["meta"]["num_files"]


def test_new_only_classifies_and_reports_only_unseen_files(predictor, inbox, tmp_path):
    db = tmp_path / "s.sqlite"
    run_batch(predictor, [inbox], output=tmp_path / "all.json", store=db)
    old = sorted((inbox / "d5").glob("*.png"))[0]
    os.utime(old, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # changed, but seen
    for i in range(3):
        shutil.copy(old, inbox / f"fresh{i}.png")
    out = tmp_path / "new.csv"
    run = run_batch(predictor, [inbox], output=out, store=db, new_only=True)
    assert run.n_new == 3
    rows = out.read_text().splitlines()
    assert len(rows) == 4 and all("fresh" in r for r in rows[1:])
    assert run_batch(predictor, [inbox], output=out, store=db, new_only=True).n_new == 0
    assert len(out.read_text().splitlines()) == 1  # header only: nothing new
    with pytest.raises(ConfigError, match="--store"):
        run_batch(predictor, [inbox], output=out, new_only=True)


def test_rows_of_a_run_that_died_before_its_report_are_reported_next(predictor, inbox,
                                                                      tmp_path):
    db = tmp_path / "s.sqlite"
    run_batch(predictor, [inbox / "d0"], output=tmp_path / "a.json", store=db)
    meta = ResultStore.open(db).info("meta")
    with ResultStore.open(db) as rs:  # a run that stored one row, then died
        rs.begin_run("torch")
        rs.add("defect", {"path": str(inbox / "empty.png"), "issue": "empty_file",
                          "message": "empty"})
    out = tmp_path / "b.json"
    run = run_batch(predictor, [inbox], output=out, store=db, new_only=True)
    report = json.loads(out.read_text())
    assert run.n_new == 30 and len(report["results"]) == 30
    assert [d["path"] for d in report["defects"]] == [str(inbox / "empty.png")]
    assert report["meta"]["bundle_sha256"] == meta["bundle_sha256"]


def test_store_refuses_another_rule_and_a_second_concurrent_run(predictor, inbox, tmp_path):
    db = tmp_path / "s.sqlite"
    run_batch(predictor, [inbox / "d0"], store=db)
    with pytest.raises(ConfigError, match="temperature"):
        run_batch(predictor, [inbox], store=db, temperature=3.0)
    with pytest.raises(ConfigError, match="include_probs"):
        run_batch(predictor, [inbox], store=db, include_probs=True)
    with ResultStore.open(db) as holder:
        holder.begin_run()
        with pytest.raises(ConfigError, match="in use"):
            run_batch(predictor, [inbox], store=db)
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(ConfigError, match="--store"):
        run_batch(predictor, [inbox], store=tmp_path / "junk.sqlite")


def test_report_rebuilt_from_the_store_equals_the_runs_report(predictor, inbox, tmp_path):
    db = tmp_path / "s.sqlite"
    run_batch(predictor, [inbox], output=tmp_path / "run.json", store=db, include_probs=True)
    meta = report_from_store(db, tmp_path / "rebuilt.json",
                             defect_log=tmp_path / "defects.json")
    a = json.loads((tmp_path / "run.json").read_text())
    b = json.loads((tmp_path / "rebuilt.json").read_text())
    assert a["results"] == b["results"] and a["defects"] == b["defects"]
    assert meta["num_files"] == a["meta"]["num_files"] == 61
    assert json.loads((tmp_path / "defects.json").read_text()) == a["defects"]
    with pytest.raises(ConfigError, match="does not exist"):
        report_from_store(tmp_path / "none.sqlite", tmp_path / "x.json")


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
        try:
            return int(con.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            con.close()
    except sqlite3.OperationalError:
        return 0  # not created yet


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(predictor, tiny_bundle,
                                                                   digits_folder, tmp_path):
    root = tmp_path / "big"
    for copy in range(3):
        shutil.copytree(digits_folder, root / f"c{copy}")
    for i in range(3):
        (root / f"zero{i}.png").write_bytes(b"")
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    db, out = tmp_path / "killed.sqlite", tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "imgtriage", "predict", str(tiny_bundle), str(root),
           "--store", str(db), "--output", str(out), "--no-progress", "--backend", "torch",
           "--threads", "1", "--workers", "1", "--batch-size", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _count(db) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = _count(db)
    assert 0 < partial < n_files and not out.exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{partial} already in the store" in done.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [r["path"] for r in lines[1:]]
    assert len(paths) == len(set(paths)) == n_files == lines[0]["num_files"]
    ref = tmp_path / "straight.sqlite"
    run_batch(predictor, [root], store=ref, batch_size=8)
    killed, straight = _stored(db), _stored(ref)
    assert killed.keys() == straight.keys()
    for path, (kind, row) in straight.items():
        k2, row2 = killed[path]
        assert k2 == kind and row2.keys() == row.keys()
        if kind == "result":
            assert row2["class"] == row["class"]
            assert row2["score"] == pytest.approx(row["score"], abs=1e-5)
        else:
            assert row2 == row


def test_a_users_store_is_crash_safe_and_a_runs_throwaway_store_skips_the_syncs(
        predictor, inbox, tmp_path, monkeypatch):
    def journal(store: ResultStore) -> tuple[str, int]:
        return (store.db.execute("PRAGMA journal_mode").fetchone()[0],
                store.db.execute("PRAGMA synchronous").fetchone()[0])

    with ResultStore.open(tmp_path / "user.sqlite") as store:
        assert journal(store) == ("wal", 1)  # NORMAL: survives SIGKILL (test above)
    with ResultStore.open(tmp_path / "temp.sqlite", durable=False) as store:
        assert journal(store) == ("memory", 0)  # OFF: deleted with the run anyway
    seen: list[tuple[str, bool]] = []
    real = ResultStore.open.__func__

    def spy(cls, path, **kw):
        store = real(cls, path, **kw)
        seen.append((Path(path).name, journal(store) == ("wal", 1)))
        return store

    monkeypatch.setattr(ResultStore, "open", classmethod(spy))
    a = run_batch(predictor, [inbox], output=tmp_path / "a.json")
    b = run_batch(predictor, [inbox], output=tmp_path / "b.json", store=tmp_path / "s.sqlite")
    assert seen == [("results.sqlite", False), ("s.sqlite", True)]
    assert a.n_results == b.n_results > 0
    ra, rb = (json.loads((tmp_path / n).read_text())["results"] for n in ("a.json", "b.json"))
    assert ra == rb
