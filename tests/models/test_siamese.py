"""The Siamese encoder, its losses and its balanced episode sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from imgtriage.errors import ConfigError, DataError, ModelError
from imgtriage.models import create_model, get_entry, list_models
from imgtriage.models.siamese import SiameseNet, build_encoder, encoder_kwargs
from imgtriage.train.fewshot import (
    EpisodeSampler,
    FewShotConfig,
    fit_encoder,
    prototypical_loss,
    similarity_threshold,
    triplet_loss,
)


def test_registered_with_family_and_size():
    assert "siamese" in list_models(family="siamese")
    entry = get_entry("siamese")
    assert entry.default_size == (64, 64)


@pytest.mark.parametrize("size", [16, 64, 80])
def test_embeddings_are_unit_length_and_logits_are_scaled_cosines(size):
    torch.manual_seed(0)
    m = create_model("siamese", num_classes=5, in_chans=1, embed_dim=24, scale=7.0).eval()
    x = torch.randn(3, 1, size, size)
    emb = m.embed(x)
    assert emb.shape == (3, 24)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    logits = m(x)
    assert logits.shape == (3, 5)
    cos = emb @ F.normalize(m.head.weight, dim=1).T
    torch.testing.assert_close(logits, 7.0 * cos)
    assert float(logits.detach().abs().max()) <= 7.0 + 1e-5


def test_encoder_alone_loads_the_classifier_encoder_weights():
    m = SiameseNet(3, in_chans=2, embed_dim=16, widths=(8, 16))
    enc = build_encoder(2, **encoder_kwargs({"embed_dim": 16, "widths": (8, 16), "scale": 3}))
    enc.load_state_dict(m.encoder.state_dict(), strict=True)
    x = torch.randn(2, 2, 32, 32)
    m.eval()
    enc.eval()
    torch.testing.assert_close(enc(x), m.embed(x))


def test_bad_arguments_raise_model_errors():
    with pytest.raises(ModelError, match="unexpected"):
        create_model("siamese", num_classes=3, in_chans=1, depth=3)
    with pytest.raises(ModelError, match="embed_dim"):
        create_model("siamese", num_classes=3, in_chans=1, embed_dim=1)


def test_prototypical_loss_prefers_separated_embeddings():
    n_way, k, q = 3, 2, 2
    centers = torch.eye(3, 4)
    y = torch.arange(n_way).repeat_interleave(k + q)
    good = F.normalize(centers[y] + 0.01 * torch.randn(len(y), 4), dim=1)
    bad = F.normalize(torch.randn(len(y), 4), dim=1)
    lg, acc_good = prototypical_loss(good, n_way, k, scale=10.0)
    lb, _ = prototypical_loss(bad, n_way, k, scale=10.0)
    assert acc_good == 1.0 and float(lg) < float(lb)


@pytest.mark.parametrize("mining", ["semihard", "hard"])
def test_triplet_loss_is_zero_when_classes_are_far_apart(mining):
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    far = torch.eye(3)[y]  # squared distances: 0 within, 2 across
    loss, active = triplet_loss(far, y, margin=0.5, mining=mining)
    assert float(loss) == 0.0 and active == 0.0
    mixed = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0]]), dim=1)
    loss, active = triplet_loss(mixed, torch.tensor([0, 0, 1, 1]), margin=0.2, mining=mining)
    assert float(loss) > 0.0 and active > 0.0


def test_hard_mining_is_at_least_as_hard_as_semihard():
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(24, 8), dim=1)
    y = torch.arange(4).repeat_interleave(6)
    hard, _ = triplet_loss(emb, y, 0.2, "hard")
    semi, _ = triplet_loss(emb, y, 0.2, "semihard")
    assert float(hard) >= float(semi) > 0.0


def test_episode_sampler_is_balanced():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 20 + [3] * 3)
    s = EpisodeSampler(labels, n_way=2, per_class=4, seed=0)
    seen = np.zeros(4, int)
    for _ in range(40):
        idx, y = s.sample()
        assert np.bincount(y).tolist() == [4, 4]
        classes = [int(np.unique(labels[idx[y == j]])[0]) for j in range(2)]
        assert len(set(classes)) == 2  # each episode class is one real class
        for c in classes:
            seen[c] += 1
    assert seen.tolist() == [20, 20, 20, 20]  # rare classes as often as common ones
    with pytest.raises(DataError):
        EpisodeSampler(np.zeros(5, int), 2, 2)


def test_episode_sampler_epochs_are_reproducible_and_resumable():
    labels = np.repeat(np.arange(5), 6)
    s = EpisodeSampler(labels, n_way=3, per_class=4, seed=1, episodes=5)
    assert len(s) == 5 * 3 * 4 == len(list(s))
    s.set_epoch(2)
    second = list(s)
    assert list(s) == second  # an epoch is drawn from (seed, epoch) alone
    s.set_epoch(3)
    assert list(s) != second
    for ep in np.array(second).reshape(5, 3, 4):  # class by class, 3 distinct classes
        assert len({int(labels[i]) for i in ep.ravel()}) == 3
        assert all(len(set(labels[row].tolist())) == 1 for row in ep)
    again = EpisodeSampler(labels, n_way=3, per_class=4, seed=1, episodes=5)
    again.load_state_dict({**s.state_dict(), "epoch": 2})
    assert list(again) == second
    with pytest.raises(ConfigError, match="per_class"):
        EpisodeSampler(labels, 3, 5, seed=1, episodes=5).load_state_dict(s.state_dict())


@pytest.mark.parametrize("augment, policy", [("none", "none"), ("flip", "flip"),
                                             ("d4", "flip_rot90")])
def test_augment_is_the_common_loops_policy(augment, policy):
    from imgtriage.data.augment import FIXED_FLIPS

    tc = FewShotConfig(augment=augment).train_config()
    assert tc.augment == policy
    assert FIXED_FLIPS[policy] == {"none": "none", "flip": "hflip", "d4": "d4"}[augment]


def test_fit_encoder_separates_a_toy_problem():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(4, 1, 8, 8)).astype(np.float32)
    y = np.repeat(np.arange(4), 12)
    x = protos[y] + 0.8 * rng.normal(size=(len(y), 1, 8, 8)).astype(np.float32)
    cfg = FewShotConfig(epochs=3, episodes=15, n_way=4, k_shot=3, n_query=3, img_size=8,
                        augment="none", lr=5e-3, embed_dim=8, widths=(8, 16))
    torch.manual_seed(0)
    enc = build_encoder(1, **cfg.encoder_kwargs())
    fit = fit_encoder(enc, (x, y), (x[::3], y[::3]), cfg)
    assert len(fit.history) == 3 and 1 <= fit.best_epoch <= 3
    assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"]
    assert max(h["val_accuracy"] for h in fit.history) >= 0.9


def test_similarity_threshold_keeps_the_asked_share():
    rng = np.random.default_rng(0)
    sims = rng.uniform(size=200)
    correct = rng.uniform(size=200) < 0.8
    t = similarity_threshold(sims, correct, keep_rate=0.9)
    kept = np.mean(sims[correct] >= t)
    assert 0.9 <= kept <= 0.9 + 1 / correct.sum() + 1e-9
    assert similarity_threshold(sims, np.zeros(200, bool), 0.9) is None


@pytest.mark.parametrize("kw, flag", [({"loss": "arcface"}, "--loss"),
                                      ({"mining": "easy"}, "--mining"),
                                      ({"n_way": 1}, "--n-way"),
                                      ({"keep_rate": 0.0}, "--keep-rate"),
                                      ({"augment": "randaug"}, "--augment"),
                                      ({"method": "svm"}, "--method"),
                                      ({"lr": 0.0}, "--lr"),
                                      ({"epochs": 0}, "--epochs"),
                                      ({"img_size": 4}, "--img-size"),
                                      ({"val_frac": 1.0}, "--val-frac"),
                                      ({"patience": -1}, "--patience"),
                                      ({"checkpoint_every": -1}, "--checkpoint-every")])
def test_config_errors_name_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=flag):
        FewShotConfig(**kw)
