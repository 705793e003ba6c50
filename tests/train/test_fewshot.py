"""Few-shot training runs in the common loop (issue 18): the episode sampler and the metric
loss are its only own parts; events, progress lines, the metrics log, early stopping,
checkpoints, exact resume and the result type are those of ``imgtriage train``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from imgtriage.errors import ConfigError
from imgtriage.train import loop
from imgtriage.train.callbacks import Callback
from imgtriage.train.fewshot import EpisodicObjective, FewShotConfig, fit_encoder, train_fewshot
from imgtriage.train.objective import Objective
from imgtriage.train.run import TrainResult
from shared_helpers import write_digits_folder

CFG = FewShotConfig(epochs=3, episodes=4, img_size=16, widths=(8, 16), embed_dim=16, n_way=3,
                    k_shot=2, n_query=2, lr=5e-3, num_threads=1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits_folder(tmp_path_factory.mktemp("fs") / "data", per_class=10, size=16,
                               classes=(0, 1, 2, 3))


class _Events(Callback):
    def __init__(self, stop_at: int = 0) -> None:
        self.seen: list[str] = []
        self.stop_at = stop_at

    def on_fit_start(self, state):
        self.seen.append("fit_start")

    def on_epoch_start(self, state):
        if state.epoch == self.stop_at:
            raise KeyboardInterrupt  # a crash in the middle of the run
        self.seen.append(f"start{state.epoch}")

    def on_epoch_end(self, state):
        self.seen.append(f"end{state.epoch}")

    def on_fit_end(self, state):
        self.seen.append("fit_end")


def _with_callback(monkeypatch, cb: Callback) -> list:
    """Route the common loop's fit through a spy that adds ``cb``; returns the objectives."""
    real, objectives = loop.fit, []

    def spy(*args, **kw):
        objectives.append(kw.get("objective"))
        return real(*args, **{**kw, "callbacks": [*kw.get("callbacks", ()), cb]})

    monkeypatch.setattr(loop, "fit", spy)
    return objectives


def _log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _weights(run: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((run / "bundle").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def test_fewshot_training_is_the_common_loop(digits, tmp_path, monkeypatch, capsys):
    events = _Events()
    objectives = _with_callback(monkeypatch, events)
    res = train_fewshot(digits, tmp_path / "run", CFG, quiet=False)
    assert isinstance(res, TrainResult)
    assert len(objectives) == 1 and isinstance(objectives[0], EpisodicObjective)
    assert isinstance(objectives[0], Objective)
    assert events.seen == ["fit_start", "start1", "end1", "start2", "end2", "start3", "end3",
                           "fit_end"]
    err = capsys.readouterr().err  # the loop's plain progress lines (stderr is not a tty)
    assert [line.split(":")[0] for line in err.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    rows = _log(res.run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert all(0 <= r["train_episode_accuracy"] <= 1 and "val_accuracy" in r for r in rows)
    state = json.loads((res.run_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 3 and state["objective"]["loss"] == "proto"
    assert state["sampler"]["episodes"] == 4 and state["config"]["batch_size"] == 3 * 4
    assert res.metrics["best_epoch"] == rows[int(np.argmax([r["val_accuracy"] for r in rows]))][
        "epoch"]
    assert (res.run_dir / "curves.png").is_file()


def test_a_class_whose_files_are_all_unreadable_is_named_as_left_out(digits, tmp_path):
    import shutil

    shutil.copytree(digits, tmp_path / "data")
    (tmp_path / "data" / "broken").mkdir()
    for i in range(3):
        (tmp_path / "data" / "broken" / f"{i}.png").write_text("not an image")
    res = train_fewshot(tmp_path / "data", tmp_path / "run", replace(CFG, epochs=1),
                        quiet=True)
    assert "left out of the gallery: 'broken' (none of their files could be read" in res.rule


def test_resume_equals_uninterrupted(digits, tmp_path, monkeypatch):
    cfg = replace(CFG, loss="triplet", augment="d4")
    full = train_fewshot(digits, tmp_path / "full", cfg, quiet=True)
    _with_callback(monkeypatch, _Events(stop_at=3))
    with pytest.raises(KeyboardInterrupt):
        train_fewshot(digits, tmp_path / "cut", cfg, quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2
    monkeypatch.undo()
    resumed = train_fewshot(digits, tmp_path / "cut", cfg, quiet=True, resume=True)
    assert resumed.metrics == full.metrics
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")
    wa, wb = _weights(tmp_path / "cut"), _weights(tmp_path / "full")
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ConfigError, match="loss"):
        train_fewshot(digits, tmp_path / "full", replace(cfg, loss="proto"), quiet=True,
                      resume=True)


def test_early_stopping_is_the_loops(monkeypatch):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 8)
    x = rng.normal(size=(len(y), 1, 8, 8)).astype(np.float32)
    monkeypatch.setattr(EpisodicObjective, "validate",
                        lambda self, model, train, val: {"val_accuracy": 0.5})  # stalled
    from imgtriage.models.siamese import build_encoder

    cfg = replace(CFG, epochs=5, episodes=2, img_size=8, patience=1)
    fit = fit_encoder(build_encoder(1, **cfg.encoder_kwargs()), (x, y), (x[::4], y[::4]), cfg)
    assert fit.stopped_early and len(fit.history) == 2 and fit.best_epoch == 1


def test_the_default_schedule_is_said_and_stops_when_it_stops_improving(
        digits, tmp_path, monkeypatch, capsys):
    """Not given, --episodes is 100 and --patience 3 stops a run whose validation gallery
    accuracy stalls, keeping the best epoch; both are said in the output, run.json,
    config.json and the bundle record."""
    seen = iter([0.5, 0.75] + [0.6] * 20)  # best at epoch 2, then stalled
    monkeypatch.setattr(EpisodicObjective, "validate",
                        lambda self, model, train, val: {"val_accuracy": next(seen)})
    cfg = FewShotConfig(epochs=10, img_size=16, widths=(8, 16), embed_dim=16, n_way=3,
                        k_shot=2, n_query=2, lr=5e-3, num_threads=1)  # CFG less its episodes
    res = train_fewshot(digits, tmp_path / "run", cfg, quiet=False)
    said = json.loads((res.run_dir / "run.json").read_text())
    assert said["episodes"] == 100 and said["patience"] == 3
    assert said["stopped_early"] and said["epochs_run"] == 5 and said["best_epoch"] == 2
    assert res.metrics["best_epoch"] == 2 and res.metrics["epochs_run"] == 5
    state = json.loads((res.run_dir / "checkpoint" / "state.json").read_text())
    assert state["sampler"]["episodes"] == 100
    assert json.loads((res.run_dir / "config.json").read_text())["episodes"] == 100
    assert "the default for" in said["schedule"] and "validation gallery" in said["schedule"]
    assert said["schedule"] in capsys.readouterr().err
    from imgtriage.bundle import load_bundle

    assert load_bundle(res.bundle_path).manifest["training"]["schedule"] == said["schedule"]
    # the default whatever the data size, given values kept
    assert FewShotConfig().sized(100_000, 10, True)[0].episodes == 100
    assert FewShotConfig().sized(200, 10, True)[0].episodes == 100
    assert FewShotConfig(episodes=7, patience=0).sized(2_000, 10, True)[0].episodes == 7
    assert FewShotConfig().sized(2_000, 10, False)[0].patience == 0  # nothing to stop on


def test_an_objective_refuses_what_only_classification_trains():
    from imgtriage.models.siamese import build_encoder

    y = np.repeat(np.arange(3), 4)
    x = np.zeros((len(y), 1, 8, 8), np.float32)
    tc = replace(CFG, img_size=8).train_config(3)
    with pytest.raises(ConfigError, match="mixup"):
        loop.fit(build_encoder(1, **CFG.encoder_kwargs()), (x, y), None,
                 replace(tc, mixup_alpha=0.2), show_progress=False,
                 objective=EpisodicObjective.from_config(CFG, 3))
