"""fit(): events, early stopping, freezing, precision options, legacy callbacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgtriage.errors import ConfigError
from imgtriage.models import create_model
from imgtriage.train.callbacks import Callback
from imgtriage.train.config import TrainConfig
from imgtriage.train.loop import fit, predict_logits


@pytest.fixture(scope="module")
def arrays():
    """Real digits 0-2 upsampled to 16x16, normalised; (train, val) as arrays."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = d.target < 3
    x = np.kron(d.images[keep] / 16.0, np.ones((2, 2)))[:, None].astype(np.float32)
    x = (x - 0.5) / 0.25
    y = d.target[keep].astype(np.int64)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(y))[:120]
    return (x[idx[:90]], y[idx[:90]]), (x[idx[90:]], y[idx[90:]])


def _model():
    torch.manual_seed(0)
    return create_model("crop_cnn", 3, 1, widths=[8, 16, 32])


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 3e-3, **kw})


def test_fit_learns_and_reports_history(arrays):
    seen = []
    res = fit(_model(), *arrays, _cfg(epochs=4), show_progress=False,
              callbacks=[lambda epoch, metrics, model: seen.append(epoch)])
    assert seen == [1, 2, 3, 4] and len(res.history) == 4
    keys = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_balanced_accuracy",
            "val_macro_f1", "epoch", "lr", "seconds"}
    assert keys <= set(res.history[0])
    assert res.best_metrics["val_accuracy"] > 0.6
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_events_fire_in_order(arrays):
    events = []

    class Recorder(Callback):
        def on_fit_start(self, state):
            events.append("fit_start")

        def on_epoch_start(self, state):
            events.append(f"start{state.epoch}")

        def on_epoch_end(self, state):
            events.append(f"end{state.epoch}:{state.best_epoch > 0}")

        def on_fit_end(self, state):
            events.append("fit_end")

    fit(_model(), *arrays, _cfg(), show_progress=False, callbacks=[Recorder()])
    assert events == ["fit_start", "start1", "end1:True", "start2", "end2:True", "fit_end"]


def test_early_stopping_on_a_stalled_metric(arrays):
    # an LR of 1e-9 cannot change the predictions: val accuracy never improves after epoch 1
    res = fit(_model(), *arrays, _cfg(epochs=10, lr=1e-9, patience=2), show_progress=False)
    assert res.stopped_early and len(res.history) == 3 and res.best_epoch == 1


def test_best_epoch_by_val_loss_and_returned_weights(arrays):
    model = _model()
    res = fit(model, *arrays, _cfg(epochs=3, select_metric="val_loss"), show_progress=False)
    losses = [h["val_loss"] for h in res.history]
    assert res.best_epoch == int(np.argmin(losses)) + 1
    logits = predict_logits(model, arrays[1][0])
    ce = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(arrays[1][1]))
    assert float(ce) == pytest.approx(min(losses), rel=1e-4)


def test_freeze_backbone_then_unfreeze(arrays):
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    snaps = {}

    class Snap(Callback):
        def on_epoch_end(self, state):
            snaps[state.epoch] = {k: v.clone() for k, v in state.model.state_dict().items()}

    fit(model, *arrays, _cfg(epochs=2, freeze_epochs=1, layer_decay=0.5), show_progress=False,
        callbacks=[Snap()])
    conv = "features.0.0.weight"
    assert torch.equal(snaps[1][conv], start[conv])  # frozen: no update, no weight decay
    assert not torch.equal(snaps[1]["head.weight"], start["head.weight"])
    assert not torch.equal(snaps[2][conv], start[conv])  # unfrozen in epoch 2


def test_freeze_backbone_for_every_epoch(arrays):
    """--freeze-backbone: a new head learns on a trained backbone, which (weights and
    batch-norm statistics) never changes, for any number of epochs (issue 19: refused)."""
    model = _model()
    fit(model, *arrays, _cfg(epochs=3), show_progress=False)  # a "pretrained" backbone
    torch.nn.init.zeros_(model.head.weight)
    torch.nn.init.zeros_(model.head.bias)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res = fit(model, *arrays, _cfg(epochs=3, lr=3e-2, freeze_backbone=True),
              show_progress=False)
    head = {k for k in start if k.startswith("head.")}
    assert head and all(torch.equal(model.state_dict()[k], start[k])
                        for k in start if k not in head)
    assert any("running_mean" in k for k in start)  # the statistics were really checked
    assert res.best_metrics["val_accuracy"] > 0.6  # the zeroed head learned again
    with pytest.raises(ConfigError, match="--freeze-backbone"):
        _cfg(epochs=3, freeze_backbone=True, freeze_epochs=1)


@pytest.mark.parametrize("norm", ["frozen", "train"])
def test_backbone_norm_frozen_keeps_running_statistics_while_weights_learn(arrays, norm):
    """--backbone-norm frozen: batch norm runs in eval mode while the weights (its own scale
    and shift too) train, so its running statistics are exactly the starting ones."""
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, *arrays, _cfg(epochs=1, backbone_norm=norm), show_progress=False)
    now = model.state_dict()
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert stats
    assert all(torch.equal(now[k], start[k]) for k in stats) == (norm == "frozen")
    learned = [k for k in start if k.endswith("weight") and not k.startswith("head.")]
    assert all(not torch.equal(now[k], start[k]) for k in learned)


@pytest.mark.parametrize("opts", [
    {"amp": "on", "channels_last": "on"},
    {"optimizer": "sgd", "lr": 0.05, "schedule": "plateau", "grad_clip": 1.0},
    {"ema_decay": 0.9, "schedule": "cosine", "warmup_epochs": 0.5, "label_smoothing": 0.1},
    {"mixup_alpha": 0.2, "cutmix_alpha": 0.2, "mix_off_epoch": 2, "augment": "randaug"},
])
def test_options_train_to_finite_losses(arrays, opts):
    res = fit(_model(), *arrays, _cfg(**opts), show_progress=False)
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in res.history)


def test_fit_without_validation_keeps_the_last_epoch(arrays):
    res = fit(_model(), arrays[0], None, _cfg(), show_progress=False)
    assert res.best_epoch == 2 and "val_accuracy" not in res.history[-1]
