"""train() end to end: run directory, class weights, seeds, resume, streaming, auto model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from imgtriage.bundle import load_bundle
from imgtriage.errors import ConfigError
from imgtriage.train import run as run_mod
from imgtriage.train.callbacks import Callback
from imgtriage.train.losses import class_weights
from imgtriage.train.run import train

from .conftest import assert_default_rule, tiny_cfg


def _weights(run: Path) -> dict:
    return load_file(run / "bundle" / "weights.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def _log(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _train_counts(run: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (run / "splits.csv").read_text().splitlines()[1:]:
        _, label, _, split = line.split(",")
        if split == "train":
            counts[label] = counts.get(label, 0) + 1
    return counts


def test_imbalanced_run_saves_weights_and_everything_else(imbalanced_folder, tmp_path):
    cfg = tiny_cfg(loss_strategy="class_weights", class_weight_beta=1.0, class_weight_cap=2.0,
                   augment="flip_rot90")
    res = train(imbalanced_folder, tmp_path, cfg, quiet=True)
    saved = json.loads((tmp_path / "class_weights.json").read_text())
    counts = _train_counts(tmp_path)
    expected = class_weights([counts[c] for c in ("d0", "d1", "d2")], 1.0, 2.0)
    np.testing.assert_allclose([saved["by_class"][c] for c in ("d0", "d1", "d2")], expected)
    assert saved["by_class"]["d2"] / np.median(expected) == pytest.approx(2.0)  # capped
    for name in ("config.json", "splits.csv", "metrics.jsonl", "defects.json", "run.json",
                 "checkpoint/state.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "config.json").read_text())["in_chans"] == 1
    manifest = load_bundle(res.bundle_path).manifest
    assert manifest["tta"] == ["hflip", "vflip", "rot90", "rot180", "rot270"]
    assert manifest["training"]["loss"]["weights"] == pytest.approx(list(expected))
    assert {"val_accuracy", "val_nll", "val_count", "best_epoch", "train_count"} <= set(
        res.metrics)


def test_same_seed_same_run_other_seed_other_weights(imbalanced_folder, tmp_path):
    cfg = tiny_cfg(augment="light", loss_strategy="focal", balanced_sampling=True)
    a = train(imbalanced_folder, tmp_path / "a", cfg, quiet=True)
    b = train(imbalanced_folder, tmp_path / "b", cfg, quiet=True)
    assert a.metrics == b.metrics and _log(tmp_path / "a") == _log(tmp_path / "b")
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    train(imbalanced_folder, tmp_path / "c", tiny_cfg(augment="light", loss_strategy="focal",
                                                      balanced_sampling=True, seed=1),
          quiet=True)
    assert not _same_weights(tmp_path / "a", tmp_path / "c")


class _Interrupt(Exception):
    pass


class _StopAt(Callback):
    """Simulates a crash at the start of ``epoch`` (after the previous epoch's checkpoint)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise _Interrupt


def test_resume_equals_uninterrupted(imbalanced_folder, tmp_path, monkeypatch):
    cfg = tiny_cfg(epochs=4, augment="randaug", mixup_alpha=0.4, ema_decay=0.9,
                   balanced_sampling=True, loss_strategy="class_weights", schedule="cosine",
                   warmup_epochs=1, checkpoint_every=2)
    full = train(imbalanced_folder, tmp_path / "full", cfg, quiet=True)
    real_fit = run_mod.fit

    def crashing_fit(*args, **kw):
        return real_fit(*args, **kw, callbacks=[_StopAt(4)])

    monkeypatch.setattr(run_mod, "fit", crashing_fit)
    with pytest.raises(_Interrupt):
        train(imbalanced_folder, tmp_path / "cut", cfg, quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2  # --checkpoint-every 2: epoch 3 was lost in the crash
    monkeypatch.setattr(run_mod, "fit", real_fit)
    resumed = train(imbalanced_folder, tmp_path / "cut", cfg, quiet=True, resume=True)
    assert resumed.metrics == full.metrics
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")
    assert _same_weights(tmp_path / "cut", tmp_path / "full")


def test_resume_refuses_other_settings_or_a_missing_checkpoint(imbalanced_folder, tmp_path):
    train(imbalanced_folder, tmp_path / "r", tiny_cfg(epochs=1), quiet=True)
    with pytest.raises(ConfigError, match="lr"):
        train(imbalanced_folder, tmp_path / "r", tiny_cfg(epochs=1, lr=0.1), quiet=True,
              resume=True)
    with pytest.raises(ConfigError, match="no checkpoint"):
        train(imbalanced_folder, tmp_path / "none", tiny_cfg(), quiet=True, resume=True)


def test_streaming_equals_memory_and_records_broken_files(imbalanced_folder, tmp_path):
    mem = train(imbalanced_folder, tmp_path / "mem", tiny_cfg(augment="flip"), quiet=True)
    stream = train(imbalanced_folder, tmp_path / "stream",
                   tiny_cfg(augment="flip", cache="stream", workers=1), quiet=True)
    assert json.loads((tmp_path / "stream" / "run.json").read_text())["cache"] == "stream"
    assert stream.metrics == mem.metrics
    assert _same_weights(tmp_path / "mem", tmp_path / "stream")
    broken = tmp_path / "data"
    for d in imbalanced_folder.iterdir():
        (broken / d.name).mkdir(parents=True)
        for f in d.iterdir():
            (broken / d.name / f.name).write_bytes(f.read_bytes())
    (broken / "d0" / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    train(broken, tmp_path / "b", tiny_cfg(cache="stream", workers=0, val_frac=0.0),
          quiet=True)
    defects = json.loads((tmp_path / "b" / "defects.json").read_text())
    assert [Path(d["path"]).name for d in defects] == ["zz_truncated.png"]


def test_auto_model_says_why(imbalanced_folder, tmp_path):
    res = train(imbalanced_folder, tmp_path, tiny_cfg(model="auto", img_size=None,
                                                      model_kwargs={}, epochs=1), quiet=True)
    info = json.loads((tmp_path / "run.json").read_text())
    chosen = json.loads((tmp_path / "config.json").read_text())["model"]
    assert chosen in ("siamese", "crop_cnn") and chosen != "auto"
    assert "fewer than 300 labels" in info["model_choice"]
    assert_default_rule(res.bundle_path)  # calibrated, with the OOD rule in its graph


def test_conservative_classes_must_exist(imbalanced_folder, tmp_path):
    with pytest.raises(ConfigError, match="--conservative-classes"):
        train(imbalanced_folder, tmp_path, tiny_cfg(conservative_classes="flats"), quiet=True)


def test_train_test_layout_validates_on_a_carved_split_and_never_counts_test(
        imbalanced_folder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    for c in ("d0", "d1", "d2"):
        files = sorted((imbalanced_folder / c).iterdir())
        for i, f in enumerate(files):
            split = "test" if i < 2 else "train"
            (data / split / c).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, data / split / c / f.name)
    res = train(data, tmp_path / "run", tiny_cfg(epochs=1))
    err = capsys.readouterr().err
    splits = [line.split(",")[3] for line in
              (tmp_path / "run" / "splits.csv").read_text().splitlines()[1:]]
    n_val = splits.count("val")
    assert n_val > 0 and splits.count("test") == 6
    assert f"{n_val} val (carved from train" in err and "6 test (held out" in err
    # stderr is not a terminal here: one plain progress line per epoch, unwrapped lines
    epochs = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 1 and epochs[0].startswith(f"epoch 1/1: {splits.count('train')} img "
                                                     "train_loss=")
    assert any(line.startswith("answers ") and line.endswith("out of distribution)")
               for line in err.splitlines())
    counts = load_bundle(res.bundle_path).manifest["training"]["counts"]
    assert sum(counts.values()) == 38 - 6
    assert res.metrics["val_count"] == n_val
