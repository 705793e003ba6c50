"""Augmentation policies, conservative classes, modality flips, MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch

from imgtriage.data.augment import AugmentPolicy, augment_batch
from imgtriage.train.mix import Mixer


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ramp(n: int, size: int = 12) -> torch.Tensor:
    """Distinct, asymmetric images: every symmetry of one of them is recognisable."""
    base = torch.arange(size * size, dtype=torch.float32).view(1, 1, size, size) / size**2
    return base.repeat(n, 1, 1, 1) + torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)


def _d4(img: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for flipped in (img, img.flip(-1)):
        out += [torch.rot90(flipped, k, dims=(-2, -1)) for k in range(4)]
    return out


def test_none_is_identity_and_flip_gives_only_hflips():
    x = _ramp(16)
    assert augment_batch(x, "none", _gen()) is x
    out = augment_batch(x, "flip", _gen())
    flipped = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x, strict=True)]
    same = [bool(torch.equal(o, xi)) for o, xi in zip(out, x, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)


def test_d4_policies_give_the_eight_symmetries():
    x = _ramp(64)
    for out in (augment_batch(x, "flip_rot90", _gen()),
                AugmentPolicy("light", strength=0.0, flips="d4")(x, None, _gen())):
        kinds = set()
        for o, xi in zip(out, x, strict=True):
            matches = [k for k, v in enumerate(_d4(xi)) if torch.equal(o, v)]
            assert matches, "output is not a symmetry of its input"
            kinds.add(matches[0])
        assert len(kinds) >= 6


def test_document_modality_never_flips():
    x = _ramp(32)
    assert torch.equal(AugmentPolicy("light", strength=0.0, flips="none")(x, None, _gen()), x)


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return img[..., rows[:, None], cols[None, :]]


def test_shift_translates_with_replicated_edges():
    x = _ramp(8, 20)  # 10% of 20 px: shifts of -2..2
    out = augment_batch(x, "shift", _gen(3))
    assert not torch.equal(out, x)
    for o, xi in zip(out, x, strict=True):
        candidates = [_shifted(v, dy, dx) for v in (xi, xi.flip(-1))
                      for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.equal(o, c) for c in candidates)


def test_conservative_classes_get_geometric_ops_only():
    n = 64
    consts = torch.linspace(-1, 1, n).view(n, 1, 1, 1)
    x = consts.repeat(1, 1, 16, 16)  # constant images: any geometric op keeps them constant
    y = torch.arange(n) % 2
    policy = AugmentPolicy("randaug", strength=1.0, n_ops=4, flips="d4", conservative=(1,))
    out = policy(x, y, _gen(5))
    cons = y == 1
    assert torch.allclose(out[cons], x[cons], atol=1e-5)  # no intensity change at all
    changed = ~torch.isclose(out[~cons], x[~cons], atol=1e-4).flatten(1).all(1)
    assert changed.float().mean() > 0.8  # the others did get photometric ops
    ramp = _ramp(n, 16)
    moved = policy(ramp, y, _gen(6))
    assert not torch.equal(moved[cons], ramp[cons])  # ... but conservative ones still move


def test_light_policy_changes_images_within_bounds_and_is_seeded():
    x = _ramp(32, 16)
    policy = AugmentPolicy("light", strength=0.5, flips="hflip")
    a, b = policy(x, None, _gen(7)), policy(x, None, _gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, policy(x, None, _gen(8)))
    assert a.isfinite().all() and a.shape == x.shape


def test_strength_scales_the_change():
    x = _ramp(64, 16)
    y = torch.zeros(64, dtype=torch.long)
    diffs = [(AugmentPolicy("randaug", strength=s, flips="none")(x, y, _gen(9)) - x).abs().mean()
             for s in (0.1, 1.0)]
    assert diffs[0] < diffs[1]


def test_mixup_keeps_conservative_samples_and_mixes_labels():
    x = torch.randn(32, 1, 8, 8, generator=_gen(1))
    y = torch.arange(32) % 4
    mixer = Mixer(mixup_alpha=0.4, conservative=(3,))
    out, ya, yb, lam = mixer(x, y, _gen(2))
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    keep = y == 3
    assert torch.equal(out[keep], x[keep]) and torch.equal(yb[keep], y[keep])
    assert not torch.equal(out[~keep], x[~keep])
    # partners of the others are never conservative
    assert not (yb[~keep & (yb != y)] == 3).any()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_features_mix_with_the_label_weight(kind):
    """Issue 19: fusion batches mix their features like their labels (never the conservative
    ones), so MixUp/CutMix work for image + feature models."""
    x = torch.randn(16, 1, 12, 12, generator=_gen(5))
    y = torch.arange(16) % 4
    f = torch.randn(16, 3, generator=_gen(6))
    mixer = Mixer(**({"mixup_alpha": 0.4} if kind == "mixup" else {"cutmix_alpha": 1.0}),
                  conservative=(3,))
    _, ya, yb, lam, fm = mixer.mix(x, y, _gen(7), f)
    keep = y == 3
    assert torch.equal(fm[keep], f[keep]) and torch.equal(ya, y)
    mixed = yb != y
    assert mixed.any() and not torch.allclose(fm[mixed], f[mixed])
    for i in range(16):  # every row: lam * its own + (1 - lam) * a partner labelled y_b
        assert any(y[j] == yb[i] and torch.allclose(fm[i], lam * f[i] + (1 - lam) * f[j],
                                                    atol=1e-5) for j in range(16)), i
    _, _, yb_, lam_ = mixer(x, y, _gen(7))  # the 4-tuple call draws the same mix
    assert lam_ == lam and torch.equal(yb_, yb)


def test_cutmix_lambda_is_the_pasted_area():
    x = torch.zeros(16, 1, 20, 20)
    x[8:] = 1.0
    y = torch.arange(16)
    out, _, yb, lam = Mixer(cutmix_alpha=1.0)(x, y, _gen(4))
    own = (out == x).float().flatten(1).mean(1)
    differs = yb >= 8
    mixed = own[(y < 8) & differs]
    if len(mixed):
        assert torch.allclose(mixed, torch.full_like(mixed, lam), atol=1e-6)


@pytest.mark.parametrize("off,epoch,active", [(0, 50, True), (5, 4, True), (5, 5, False)])
def test_mixing_stops_at_the_off_epoch(off, epoch, active):
    assert Mixer(mixup_alpha=0.2, off_epoch=off).active(epoch) is active
    assert not Mixer().active(1)


def test_training_flips_are_the_ones_the_policy_applies():
    from imgtriage.train.config import AUGMENT_POLICIES, MODALITIES, TrainConfig, training_flips

    for name in (p for p in AUGMENT_POLICIES if p != "auto"):
        for modality, flips in MODALITIES.items():
            cfg = TrainConfig(augment=name, modality=modality)
            assert training_flips(cfg) == AugmentPolicy(name, flips=flips).effective_flips
