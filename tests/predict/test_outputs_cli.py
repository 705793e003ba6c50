"""Every output format, the defect log, progress, and the predict/export/report commands."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgtriage.cli.main import app
from imgtriage.cli.predict_cmd import parse_thresholds
from imgtriage.errors import ConfigError
from imgtriage.predict import Predictor, write_report
from imgtriage.predict.progress import RunProgress

runner = CliRunner()


@pytest.fixture(scope="module")
def inbox(tmp_path_factory, digits_folder):
    root = tmp_path_factory.mktemp("inbox")
    for p in sorted((digits_folder / "d8").glob("*.png"))[:6]:
        (root / "sub" / p.name).parent.mkdir(exist_ok=True)
        shutil.copy(p, root / "sub" / p.name)
    (root / "zero.png").write_bytes(b"")
    (root / "notes.jpg").write_text("hello")
    return root


def _read(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """(meta, results, defects) from any of the four formats, extras decoded."""
    suffix = path.suffix
    if suffix == ".json":
        r = json.loads(path.read_text())
        return r["meta"], r["results"], r["defects"]
    if suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        meta, rows = lines[0], lines[1:]
    elif suffix == ".csv":
        with path.open() as fh:
            rows = list(csv.DictReader(fh))
        meta = {}
        for r in rows:
            r["class_id"] = int(r["class_id"]) if r["class_id"] else None
            r["score"] = float(r["score"]) if r["score"] else None
            r["abstained"] = {"True": True, "False": False}.get(r["abstained"])
            r["reason"] = r["reason"] or None  # CSV has no null: an empty cell
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"imgtriage_meta"])
        rows = table.to_pylist()
    results = [{k: (json.loads(v) if k in ("probs", "topk") else v) for k, v in r.items()
                if k not in ("kind", "issue", "message")} for r in rows if r["kind"] == "result"]
    defects = [{k: r[k] for k in ("path", "issue", "message")} for r in rows
               if r["kind"] == "defect"]
    return meta, results, defects


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_cli_predict_writes_every_format_with_the_same_content(tiny_bundle, inbox, tmp_path,
                                                               suffix):
    out, log = tmp_path / f"r{suffix}", tmp_path / "defects.json"
    res = runner.invoke(app, ["predict", str(tiny_bundle), str(inbox), "--output", str(out),
                              "--include-probs", "--topk", "2", "--defect-log", str(log),
                              "--backend", "torch", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "6 results, 2 defects" in res.output
    meta, results, defects = _read(out)
    ref = Predictor.load(tiny_bundle, backend="torch").predict_paths(
        [inbox], include_probs=True, topk=2)
    assert sorted(results, key=lambda r: r["path"]) == sorted(ref["results"],
                                                              key=lambda r: r["path"])
    assert defects == ref["defects"] == json.loads(log.read_text())
    if suffix != ".csv":
        assert meta["num_files"] == 8 and meta["classes"] == ref["meta"]["classes"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_write_report_in_memory_round_trips(tiny_bundle, inbox, tmp_path, suffix):
    report = Predictor.load(tiny_bundle, backend="torch").predict_paths([inbox], topk=3)
    path = write_report(report, tmp_path / f"r{suffix}")
    _, results, defects = _read(path)
    assert results == report["results"] and defects == report["defects"]
    empty = {**report, "results": [], "defects": []}
    _, results, defects = _read(write_report(empty, tmp_path / f"empty{suffix}"))
    assert results == defects == []


def test_cli_export_then_predict_uses_onnx_and_report_rebuilds(tiny_bundle, inbox, tmp_path):
    pytest.importorskip("onnxruntime")
    b = shutil.copytree(tiny_bundle, tmp_path / "b")
    res = runner.invoke(app, ["export", str(b), "--onnx"])
    assert res.exit_code == 0, res.output
    # a re-export of the same weights keeps the int8 graph that passed the held-out check
    assert "max |Δprob| vs torch" in res.output and "default precision int8" in res.output
    db, out = tmp_path / "s.sqlite", tmp_path / "r.json"
    res = runner.invoke(app, ["predict", str(b), str(inbox), "--store", str(db), "--output",
                              str(out), "--thresholds", "1.0", "--abstain", "--no-progress"])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["meta"]["backend"] == "onnx" and report["meta"]["coverage"] == 0.0
    assert all(r["class"] == "unknown" for r in report["results"])
    res = runner.invoke(app, ["report", str(db), "--output", str(tmp_path / "again.parquet")])
    assert res.exit_code == 0 and "8 files" in res.output
    res = runner.invoke(app, ["export", str(b)])
    assert isinstance(res.exception, ConfigError) and "--onnx" in str(res.exception)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_cli_predict_names_backend_precision_and_threads(tiny_bundle, inbox, tmp_path, backend):
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["predict", str(tiny_bundle), str(inbox), "--output", str(out),
                              "--backend", backend, "--threads", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    # auto: the bundle's int8 graph (accepted by its held-out check); torch runs fp32
    name, precision = ("onnx", "int8") if backend == "auto" else ("torch", "fp32")
    said = f"backend {name}, precision {precision}, 1 thread"
    assert lines[0].startswith(f"predict: {said}")  # before any file is read
    assert "8 files" not in lines[0] and said in lines[-1] and "6 results" in lines[-1]
    meta = json.loads(out.read_text())["meta"]
    assert (meta["backend"], meta["precision"], meta["threads"]) == (name, precision, 1)


def test_cli_refuses_bad_outputs_before_running(tiny_bundle, inbox, tmp_path):
    for args, flag in ([["--output", str(tmp_path / "r.xlsx")], "--output"],
                       [["--defect-log", str(tmp_path / "d.csv")], "--defect-log"],
                       [["--new-only"], "--store"], [["--thresholds", "0.5,x"], "--thresholds"],
                       [["--executor", "fibers"], "--executor"]):
        res = runner.invoke(app, ["predict", str(tiny_bundle), str(inbox), "--backend", "torch",
                                  "--no-progress", *args])
        assert isinstance(res.exception, ConfigError), (args, res.output)
        assert flag in str(res.exception)
        if flag != "--thresholds":  # (parsed against the bundle's classes, so after it loads)
            assert "predict: backend" not in res.output  # refused before the model loads


def test_parse_thresholds():
    assert parse_thresholds(None, 3) is None
    assert parse_thresholds("0.2,0.3,0.4", 3) == (0.2, 0.3, 0.4)
    with pytest.raises(ConfigError, match="3 classes"):
        parse_thresholds("0.2,0.3", 3)


def test_progress_counts_rate_and_eta(tmp_path):
    for i in range(5):
        (tmp_path / f"{i}.png").write_bytes(b"x")
    bar = RunProgress([tmp_path], enabled=True)
    with bar:
        bar.skipped(1)
        bar.done(2)
        for _ in range(200):  # the background count finishes quickly
            if bar.total is not None:
                break
            import time

            time.sleep(0.01)
        line = bar.line()
    assert bar.total == 5 and bar.classified == 2 and bar.skipped_count == 1
    assert "2 classified, 1 already done of 5" in line and "files/s" in line and "ETA" in line
    quiet = RunProgress([tmp_path], enabled=False)
    with quiet:
        quiet.done(3)
    assert quiet.total is None and "ETA" not in quiet.line()


def test_progress_without_a_terminal_prints_a_plain_line_every_n_files():
    import io

    out = io.StringIO()  # not a TTY, like a log file
    with RunProgress(None, enabled=True, every=10, stream=out) as bar:
        for _ in range(25):
            bar.done(1)
    lines = out.getvalue().splitlines()
    assert [line.split(" classified")[0] for line in lines] == [
        "classify: 10", "classify: 20", "classify: 25"]
    assert all("files/s" in line for line in lines)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_abstained_rows_have_class_id_minus_one_in_every_format(tiny_bundle, inbox, tmp_path,
                                                                 suffix):
    """Issue 19: one stable class_id (-1) for "unknown"; the best class stays readable."""
    out = tmp_path / f"r{suffix}"
    res = runner.invoke(app, ["predict", str(tiny_bundle), str(inbox), "--output", str(out),
                              "--thresholds", "0.999", "--abstain", "--backend", "torch",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    _, results, _ = _read(out)
    classes = Predictor.load(tiny_bundle, backend="torch").classes
    abstained = [r for r in results if r["abstained"]]
    assert abstained and len(results) == 6
    for r in results:
        if r["abstained"]:
            assert r["class_id"] == -1 and r["class"] == "unknown"
            assert r["best_class"] in classes
        else:
            assert classes[r["class_id"]] == r["class"] and not r.get("best_class")
