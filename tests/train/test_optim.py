"""Optimiser groups, LR scaling, discriminative rates, schedules, EMA, freezing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imgtriage.models import create_model
from imgtriage.train.config import TrainConfig
from imgtriage.train.ema import ModelEma
from imgtriage.train.optim import (
    build_optimizer,
    head_names,
    layer_groups,
    param_groups,
    scaled_lr,
    set_backbone_frozen,
)
from imgtriage.train.schedules import LRSchedule


def test_no_weight_decay_on_biases_and_norm_layers():
    model = create_model("crop_cnn", 3, 1)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.05), 1e-3)
    names = {n: g["weight_decay"] for g in opt.param_groups for n in g["names"]}
    assert names["features.0.0.weight"] == 0.05 and names["head.weight"] == 0.05
    assert names["features.0.1.weight"] == 0.0 and names["features.0.1.bias"] == 0.0
    assert names["head.bias"] == 0.0
    assert len(names) == len(list(model.parameters()))


def test_lr_scales_with_global_batch():
    assert scaled_lr(TrainConfig(lr=0.1)) == 0.1
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=64, lr_ref_batch=256)) == pytest.approx(0.025)
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=64, lr_ref_batch=32), world_size=2) == \
        pytest.approx(0.4)
    assert scaled_lr(TrainConfig(lr=0.1, batch_size=256, lr_ref_batch=64, lr_scaling="sqrt")) \
        == pytest.approx(0.2)


def test_discriminative_rates_decay_from_head_to_stem():
    model = create_model("resnet18", 3, 3)
    groups = layer_groups(model)
    assert groups[-1] == sorted(head_names(model)) == ["fc.bias", "fc.weight"]
    assert groups[0][0].startswith("conv1")
    pg = param_groups(model, 1.0, 0.01, layer_decay=0.5)
    by_name = {n: g["lr"] for g in pg for n in g["names"]}
    assert by_name["fc.weight"] == 1.0
    assert by_name["conv1.weight"] == pytest.approx(0.5 ** (len(groups) - 1))
    assert by_name["layer4.1.conv2.weight"] > by_name["layer1.0.conv1.weight"]


def test_crop_cnn_groups_follow_its_blocks():
    model = create_model("crop_cnn", 3, 1)
    groups = layer_groups(model)
    assert [g[0].split(".")[:2] for g in groups[:3]] == [["features", "0"], ["features", "1"],
                                                          ["features", "2"]]
    assert groups[-1] == ["head.bias", "head.weight"]


def test_freezing_leaves_only_the_head_trainable():
    model = create_model("crop_cnn", 3, 1)
    set_backbone_frozen(model, True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == head_names(model)
    set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.parameters())


def _sched(kind: str, **kw) -> LRSchedule:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0, "base_lr": 1.0}], lr=1.0)
    return LRSchedule(opt, kind, total_steps=100, **kw)


def test_onecycle_warms_up_then_anneals():
    s = _sched("onecycle")
    m = [s.multiplier(i) for i in range(100)]
    assert m[0] == pytest.approx(1 / 25) and max(m) == pytest.approx(1.0)
    assert m.index(max(m)) == 15 and m[-1] < 1e-3


def test_warmup_cosine_reaches_the_floor():
    s = _sched("cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert s.multiplier(0) < s.multiplier(5) < s.multiplier(9) <= 1.0
    assert s.multiplier(10) == pytest.approx(1.0)
    assert s.multiplier(100) == pytest.approx(0.1)
    assert s.multiplier(55) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 2)) / 2)


def test_plateau_cuts_after_patience_and_state_round_trips():
    s = _sched("plateau", patience=1, factor=0.5)
    for v in (0.5, 0.6, 0.6, 0.6):
        s.step_epoch(v)
    assert s.opt.param_groups[0]["lr"] == pytest.approx(0.5)
    t = _sched("plateau", patience=1, factor=0.5)
    t.load_state_dict(s.state_dict())
    assert t.opt.param_groups[0]["lr"] == pytest.approx(0.5) and t.best == 0.6
    loss_mode = _sched("plateau", patience=0, maximize=False)
    loss_mode.step_epoch(1.0)
    loss_mode.step_epoch(0.9)
    assert loss_mode.cuts == 0
    loss_mode.step_epoch(0.95)
    assert loss_mode.cuts == 1


def test_ema_tracks_weights_and_copies_buffers():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(net)  # decay warms up: min(0.5, 2/11)
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * net[0].weight)
    assert torch.equal(ema.module[1].running_mean, net[1].running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_freeze_stages_stops_backward_before_them_and_survives_unfreezing():
    import timm

    from imgtriage.train.callbacks import FreezeBackbone, FreezeEarlyStages, LoopState
    from imgtriage.train.optim import early_names, set_early_frozen

    model = timm.create_model("tf_efficientnet_lite0", num_classes=3)
    early = early_names(model, 2)
    assert {n.split(".")[0] for n in early} == {"conv_stem", "bn1", "blocks"}
    assert {n.split(".")[1] for n in early if n.startswith("blocks")} == {"0", "1"}
    assert not early & head_names(model) and early < early_names(model, 3)
    assert set_early_frozen(model, 2) == len(early)
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in early), name
    # a freeze-epochs run unfreezes the backbone at epoch 2: the early stages stay frozen
    state = LoopState.__new__(LoopState)
    state.model, state.net, state.epoch = model, None, 2
    for cb in (FreezeBackbone(1), FreezeEarlyStages(2)):
        cb.on_epoch_start(state)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == early
