"""Semi-supervised training (--unlabeled): the unlabelled images are used, bad ones become
defects, validation/test content never becomes a pseudo-label, resume is exact, and the
result works with --model auto and the gallery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from imgtriage.errors import ConfigError
from imgtriage.train import run as run_mod
from imgtriage.train.auto import ImageProbe, choose_model
from imgtriage.train.callbacks import Callback
from imgtriage.train.config import TrainConfig
from imgtriage.train.run import train
from imgtriage.train.semisup import UnlabeledStream, semi_budget, semi_teacher

from .conftest import assert_default_rule, tiny_cfg, write_imbalanced_folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """3 digit classes, 6 labelled 16 px images each."""
    return write_imbalanced_folder(tmp_path_factory.mktemp("lab"), {"d0": 6, "d1": 6, "d2": 6})


@pytest.fixture(scope="module")
def inbox(tmp_path_factory) -> Path:
    """30 other digits of the same classes, flat, with their labels thrown away."""
    src = write_imbalanced_folder(tmp_path_factory.mktemp("unl"),
                                  {"d0": 10, "d1": 10, "d2": 10}, seed=7)
    flat = tmp_path_factory.mktemp("inbox")
    for f in sorted(src.rglob("*.png")):
        shutil.copy(f, flat / f"{f.parent.name}_{f.name}")
    return flat


def _cfg(inbox: Path | str = "", **kw) -> TrainConfig:
    base = {"val_frac": 0.0, "epochs": 3, "augment": "weak", "unlabeled": str(inbox),
            "unlabeled_ratio": 2, "pseudo_threshold": 0.5, "checkpoint_every": 1}
    return tiny_cfg(**{**base, **kw})


def _weights(run: Path) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(run / "bundle" / "weights.safetensors").items()}


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def _log(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds" and not k.endswith("_per_s")}
            for r in rows]


def test_unlabelled_images_change_the_model_and_are_counted(labelled, inbox, tmp_path):
    plain = train(labelled, tmp_path / "plain", _cfg(ema_decay=0.9), quiet=True)
    semi = train(labelled, tmp_path / "semi", _cfg(inbox, ema_decay=0.9, pseudo_threshold=0.4),
                 quiet=True)  # the default method, fixmatch_ema
    assert not _same(tmp_path / "plain", tmp_path / "semi")
    log = [json.loads(x) for x in
           (tmp_path / "semi" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3
    for row in log:  # both throughputs are reported, and some pseudo-labels were confident
        assert row["labeled_img_per_s"] > 0 and row["unlabeled_img_per_s"] > 0
        assert 0 <= row["pseudo_label_rate"] <= 1
    assert max(r["pseudo_label_rate"] for r in log) > 0
    info = json.loads((tmp_path / "semi" / "run.json").read_text())["unlabeled"]
    assert info["images"] == 30 and info["unreadable"] == 0
    assert semi.bundle_path.is_dir() and plain.metrics["train_count"] == 18
    # the unlabelled loss is what changes the model, not just the extra rows in batch norm:
    # with weight 0 the run differs from weight 1
    train(labelled, tmp_path / "w0", _cfg(inbox, ema_decay=0.9, pseudo_threshold=0.4,
                                          unlabeled_weight=0.0), quiet=True)
    assert not _same(tmp_path / "w0", tmp_path / "semi")


def test_ema_teacher_labels_the_weak_views(labelled, inbox, tmp_path):
    cfg = _cfg(inbox, semi_method="fixmatch_ema", ema_decay=0.9, pseudo_threshold=0.4)
    train(labelled, tmp_path / "ema", cfg, quiet=True)
    train(labelled, tmp_path / "plain", _cfg(ema_decay=0.9), quiet=True)
    assert not _same(tmp_path / "ema", tmp_path / "plain")
    log = [json.loads(x) for x in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["pseudo_label_rate"] for r in log) > 0
    assert all(r["unlabeled_img_per_s"] > 0 for r in log)


def test_self_training_grows_a_class_balanced_pseudo_labelled_set(labelled, inbox, tmp_path):
    cfg = _cfg(inbox, semi_method="self_training", epochs=5, ema_decay=0.9)
    train(labelled, tmp_path / "st", cfg, quiet=True)
    rates = [json.loads(x)["pseudo_label_rate"]
             for x in (tmp_path / "st" / "metrics.jsonl").read_text().splitlines()]
    assert rates[0] == 0 and rates[-1] > 0  # labels only in the first stage, then pseudo
    state = json.loads((tmp_path / "st" / "checkpoint" / "state.json").read_text())["unlabeled"]
    targets, selected = state["targets"], state["selected"]
    assert len(targets) == len(selected) == round(rates[-1] * 30)
    assert len(set(selected)) == len(selected) and set(selected) <= set(range(30))
    # equal labelled classes: each predicted class gets at most a third of the pool
    assert max(np.bincount(targets, minlength=3)) <= 10


def test_corrupt_unlabelled_file_lands_in_the_defect_log(labelled, inbox, tmp_path):
    box = tmp_path / "box"
    shutil.copytree(inbox, box)
    (box / "zz_truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    (box / "notes.txt").write_text("not an image")
    train(labelled, tmp_path / "r", _cfg(box, epochs=1), quiet=True)
    defects = json.loads((tmp_path / "r" / "defects.json").read_text())
    assert sorted(Path(d["path"]).name for d in defects) == ["notes.txt", "zz_truncated.png"]
    assert all(d["issue"] and d["message"] for d in defects)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["unlabeled"]["images"] == 30


def test_validation_and_test_content_is_never_pseudo_labelled(labelled, inbox, tmp_path):
    run = tmp_path / "r"
    box = tmp_path / "box"
    shutil.copytree(inbox, box)
    # the split is seeded: learn it from a first run, then copy every val/test file (under
    # another name) into the unlabelled folder
    cfg = _cfg(box, val_frac=0.2, test_frac=0.2, epochs=1)
    train(labelled, tmp_path / "probe", cfg, quiet=True)
    rows = (tmp_path / "probe" / "splits.csv").read_text().splitlines()[1:]
    held = [r.split(",")[0] for r in rows if r.split(",")[-1] in ("val", "test")]
    assert len(held) >= 6
    for i, p in enumerate(held):
        shutil.copy(p, box / f"copy_{i}.png")
    seen: list[str] = []

    class Spy(Callback):
        def on_fit_start(self, state):
            seen.extend(state.semi.pool.paths)

    real_fit = run_mod.fit
    try:
        run_mod.fit = lambda *a, **kw: real_fit(*a, **kw, callbacks=[Spy()])
        res = train(labelled, run, cfg, quiet=True)
    finally:
        run_mod.fit = real_fit
    info = json.loads((run / "run.json").read_text())["unlabeled"]
    excluded = sorted(Path(p).name for p in info["excluded_same_content_as_val_test"])
    assert excluded == sorted(f"copy_{i}.png" for i in range(len(held)))
    assert len(seen) == 30 and not any(Path(p).name.startswith("copy_") for p in seen)
    assert_default_rule(res.bundle_path)  # the semi-supervised route is calibrated too


class _Interrupt(Exception):
    pass


class _StopAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, state):
        if state.epoch == self.epoch:
            raise _Interrupt


@pytest.mark.parametrize("method", ["fixmatch", "fixmatch_ema", "fixmatch_ema:flex",
                                    "self_training", "noisy_student"])
def test_resume_equals_uninterrupted(labelled, inbox, tmp_path, monkeypatch, method):
    method, _, mode = method.partition(":")
    cfg = _cfg(inbox, epochs=4, checkpoint_every=2, pseudo_threshold=0.4, semi_method=method,
               ema_decay=0.9 if method == "fixmatch_ema" else 0.0,
               pseudo_threshold_mode=mode or "fixed")
    train(labelled, tmp_path / "full", cfg, quiet=True)
    real_fit = run_mod.fit
    monkeypatch.setattr(run_mod, "fit",
                        lambda *a, **kw: real_fit(*a, **kw, callbacks=[_StopAt(4)]))
    with pytest.raises(_Interrupt):
        train(labelled, tmp_path / "cut", cfg, quiet=True)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and state["unlabeled"]["stream"]["drawn"] > 0
    monkeypatch.setattr(run_mod, "fit", real_fit)
    train(labelled, tmp_path / "cut", cfg, quiet=True, resume=True)
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")
    assert _same(tmp_path / "cut", tmp_path / "full")


def test_stream_is_a_pure_function_of_what_was_drawn():
    a = UnlabeledStream(7, seed=3)
    first = torch.cat([a.take(5) for _ in range(4)])  # crosses permutation boundaries
    assert sorted(first[:7].tolist()) == list(range(7))  # each cycle is a permutation
    b = UnlabeledStream(7, seed=3)
    b.take(9)
    c = UnlabeledStream(7, seed=3)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.take(11), first[9:20])
    with pytest.raises(ConfigError, match="--unlabeled"):
        UnlabeledStream(8, seed=3).load_state_dict(b.state_dict())


def test_auto_explains_labels_and_unlabelled_images():
    probe = ImageProbe(1, (64, 64), 32)
    few = dict.fromkeys("abcdefghij", 10)
    assert choose_model(few, probe).model in ("siamese", "crop_cnn")
    choice = choose_model(few, probe, unlabeled=2600)
    assert choice.model == "deep_cnn"
    assert "100 labels and 2600 unlabelled images" in choice.reason
    assert "2700" in choice.reason


def test_auto_run_records_what_it_does_with_the_unlabelled_images(labelled, inbox, tmp_path):
    train(labelled, tmp_path / "auto", _cfg(inbox, model="auto", epochs=1, model_kwargs={}),
          quiet=True)
    why = json.loads((tmp_path / "auto" / "run.json").read_text())["model_choice"]
    assert why.startswith("18 labels and 30 unlabelled images") and "48 labels" in why


def test_default_epochs_become_the_semi_supervised_step_budget(labelled, inbox, tmp_path):
    # --epochs left at its default: the run is sized in optimiser steps, per labelled epoch
    assert semi_budget(TrainConfig(unlabeled="x", batch_size=32), 100)[0].epochs == 600
    assert semi_budget(TrainConfig(unlabeled="x", batch_size=32), 250)[0].epochs == 300
    assert semi_budget(TrainConfig(unlabeled="x", batch_size=32), 250, world_size=2
                       )[0].epochs == 600  # 125 images per process: 4 steps an epoch
    # never fewer epochs than the default: a large labelled set does not train less
    assert semi_budget(TrainConfig(unlabeled="x", batch_size=32), 50_000)[0].epochs == 10
    # kept as given: --epochs set, --semi-steps 0, or no --unlabeled
    for cfg in (TrainConfig(unlabeled="x", epochs=12), TrainConfig(unlabeled="x", semi_steps=0),
                TrainConfig(unlabeled="x", semi_steps=1), TrainConfig()):
        assert semi_budget(cfg, 100) == (cfg, "")
    # end to end: 18 labels in batches of 8 are 3 steps an epoch; 31 steps -> 11 epochs
    cfg = _cfg(inbox, epochs=None, semi_steps=31)  # --epochs not given
    train(labelled, tmp_path / "r", cfg, quiet=True)
    assert len(_log(tmp_path / "r")) == 11
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs"] == 11
    why = json.loads((tmp_path / "r" / "run.json").read_text())["model_choice"]
    assert "11 epochs of 3 step(s), 33 optimiser steps (--semi-steps 31" in why
    # the teacher of the default method is the measured weight average, unless given
    assert json.loads((tmp_path / "r" / "config.json").read_text())["ema_decay"] == 0.99
    assert "teacher is a weight average (--ema-decay 0.99" in why
    assert semi_teacher(TrainConfig(unlabeled="x", ema_decay=0.9)) == (
        TrainConfig(unlabeled="x", ema_decay=0.9), "")
    assert semi_teacher(TrainConfig()) == (TrainConfig(), "")


def test_settings_are_checked_and_named(labelled, tmp_path):
    with pytest.raises(ConfigError, match="--unlabeled-ratio"):
        TrainConfig(unlabeled="x", unlabeled_ratio=0)
    with pytest.raises(ConfigError, match="--semi-steps"):
        TrainConfig(unlabeled="x", semi_steps=-1)
    with pytest.raises(ConfigError, match="--semi-method"):
        TrainConfig(semi_method="mixmatch")
    with pytest.raises(ConfigError, match="--unlabeled"):
        TrainConfig(model="fusion:crop_cnn", unlabeled="x")
    with pytest.raises(ConfigError, match="--unlabeled"):
        TrainConfig(freeze_backbone=True, unlabeled="x")
    with pytest.raises(ConfigError, match="--cache-limit-gb"):
        train(labelled, tmp_path / "big", _cfg(labelled, cache_limit_gb=1e-6), quiet=True)
    with pytest.raises(ConfigError, match="does not exist"):
        train(labelled, tmp_path / "r", _cfg(tmp_path / "missing"), quiet=True)


def test_cli_and_gallery_over_a_semi_supervised_encoder(labelled, inbox, tmp_path):
    from typer.testing import CliRunner

    from imgtriage.cli.main import app
    from imgtriage.predict import Predictor

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(labelled), "--out", str(out), "--model",
                                   "siamese", "--img-size", "16", "--epochs", "2",
                                   "--val-frac", "0", "--unlabeled", str(inbox),
                                   "--semi-method", "pseudo_label", "--threads", "1",
                                   "--batch-size", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["unlabeled"] == str(inbox)
    res = CliRunner().invoke(app, ["gallery", "create", str(out / "bundle"), str(labelled),
                                   "--out", str(tmp_path / "gallery")])
    assert res.exit_code == 0, res.output
    pred = Predictor.load(tmp_path / "gallery")
    rows = pred.predict_paths(sorted(str(p) for p in labelled.rglob("*.png"))[:4])
    assert len(rows["results"]) == 4


def _bn_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(3),
                               torch.nn.BatchNorm1d(3))


def test_strong_views_never_reach_the_batch_norm_running_statistics():
    from imgtriage.train.semisup import clean_bn_stats

    clean = torch.randn(6, 1, 8, 8)
    strong = 5 + 3 * torch.randn(10, 1, 8, 8)  # far off the clean statistics
    guarded, alone = _bn_net(), _bn_net()
    alone(clean[:2])  # materialise the lazy layer, then start both alike
    guarded.load_state_dict(alone.state_dict())
    with clean_bn_stats(guarded, len(clean)):
        out = guarded(torch.cat([clean, strong]))
    after_clean = {k: v.clone() for k, v in alone.state_dict().items()}
    ref_clean = alone(clean)
    for name, value in guarded.state_dict().items():  # learnt from the clean rows, as if alone
        assert torch.allclose(value.float(), alone.state_dict()[name].float(), atol=1e-5), name
    assert torch.allclose(out[:6], ref_clean, atol=1e-5)
    alone.load_state_dict(after_clean)
    assert torch.allclose(out[6:], alone(strong), atol=1e-4)  # strong rows: their own stats
    out.sum().backward()  # gradients flow through both parts
    assert guarded[0].weight.grad is not None and guarded[0].weight.grad.abs().sum() > 0
    before = guarded[1].running_mean.clone()
    alone.load_state_dict(guarded.state_dict())
    with clean_bn_stats(guarded, len(clean)):  # a batch of clean rows only: an ordinary step
        guarded(clean)
    alone(clean)
    assert not torch.equal(before, guarded[1].running_mean)
    assert torch.allclose(guarded[1].running_mean, alone[1].running_mean, atol=1e-5)
    assert all(m.momentum == 0.1 for m in guarded.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))


def test_clean_statistics_keep_the_activation_of_fused_batch_norm_layers():
    # timm's BatchNormAct2d applies its activation inside the layer (EfficientNet-Lite):
    # under clean_bn_stats the clean rows still go through the network as they would alone
    from timm.layers import BatchNormAct2d

    from imgtriage.train.semisup import clean_bn_stats

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), BatchNormAct2d(4),
                                   torch.nn.Conv2d(4, 2, 3))

    clean, strong = torch.randn(6, 1, 8, 8), 5 + 3 * torch.randn(10, 1, 8, 8)
    guarded, alone = net(), net()
    with clean_bn_stats(guarded, len(clean)):
        out = guarded(torch.cat([clean, strong]))
        only_clean = guarded(clean)  # the no-strong-rows path as well
    assert torch.allclose(out[:6], alone(clean), atol=1e-5)
    assert torch.allclose(only_clean, alone(clean), atol=1e-5)
    assert torch.allclose(guarded[1].running_mean, alone[1].running_mean, atol=1e-5)


def test_clean_rows_cover_labels_and_weak_views_only():
    from imgtriage.train.semisup import SemiSupervised, UnlabeledPool

    pool = UnlabeledPool(torch.zeros(4, 1, 8, 8), ("a", "b", "c", "d"), (), ())
    rows = {m: SemiSupervised(pool, tiny_cfg(semi_method=m, unlabeled="x", batch_size=4,
                                             unlabeled_ratio=2), [1, 1]).clean_rows(4)
            for m in ("fixmatch", "fixmatch_ema", "pseudo_label", "self_training",
                      "noisy_student")}
    assert rows == {"fixmatch": 4 + 8, "fixmatch_ema": 4, "pseudo_label": None,
                    "self_training": None, "noisy_student": 4}
    all_rows = SemiSupervised(pool, tiny_cfg(unlabeled="x", semi_bn_stats="all"), [1, 1])
    assert all_rows.clean_rows(4) is None


def test_flex_thresholds_start_low_and_rise_as_classes_are_learnt():
    from imgtriage.train.semisup import SemiSupervised, UnlabeledPool

    pool = UnlabeledPool(torch.zeros(8, 1, 8, 8), tuple("abcdefgh"), (), ())
    semi = SemiSupervised(pool, tiny_cfg(unlabeled="x", pseudo_threshold_mode="flex",
                                         pseudo_threshold=0.9, distribution_alignment=False,
                                         batch_size=2, unlabeled_ratio=2), [1, 1])
    unsure = torch.tensor([[0.6, 0.4]] * 4).log()  # 60% sure of class 0: below 0.9
    semi._idx = torch.arange(4)
    _, mask = semi._pseudo(unsure)
    assert mask.tolist() == [1.0] * 4  # nothing learnt yet: the warm-up accepts them
    sure = torch.tensor([[0.99, 0.01], [0.99, 0.01], [0.02, 0.98], [0.99, 0.01]]).log()
    for rows in (torch.arange(4), torch.arange(4, 8)):
        semi._idx = rows
        semi._pseudo(sure)
    assert semi.learned.tolist() == [0, 0, 1, 0] * 2
    factors = semi.class_thresholds()
    assert factors[0] == 1.0 and 0 < factors[1] < factors[0]  # the lagging class: lower bar
    semi._idx = torch.arange(4)
    _, mask = semi._pseudo(unsure)
    assert mask.tolist() == [0.0] * 4  # class 0 is learnt: 0.6 no longer passes
    fixed = SemiSupervised(pool, tiny_cfg(unlabeled="x", pseudo_threshold=0.9,
                                          distribution_alignment=False), [1, 1])
    fixed._idx = torch.arange(4)
    assert fixed._pseudo(unsure)[1].sum() == 0 and (fixed.learned < 0).all()
    restored = SemiSupervised(pool, semi.cfg, [1, 1])
    restored.load_state_dict(semi.state_dict())  # resumes with what was learnt
    assert torch.equal(restored.learned, semi.learned)
