"""Flip TTA folded into the bundle: decided on validation at train time, recorded, and run
identically by the torch and ONNX backends (the graph averages the image and its mirror;
the OOD features come out of the same graph)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from imgtriage.models import WithFeatures, create_model
from imgtriage.train.pipeline import ArraySource
from imgtriage.train.view_choice import candidate_views, choose_views

from .conftest import tiny_cfg


def _net(**kw):
    torch.manual_seed(0)
    return create_model("crop_cnn", 3, 3, widths=[4, 8], **kw).eval()


def test_averaged_model_is_the_mean_of_the_two_views_with_the_same_weights():
    plain, avg = _net(), _net(view_average=["hflip"])
    assert list(plain.state_dict()) == list(avg.state_dict())  # same names: same bundle files
    avg.load_state_dict(plain.state_dict())
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        want = (plain(x) + plain(x.flip(-1))) / 2
        assert torch.allclose(avg(x), want, atol=1e-5)  # linear head: mean of the logits
        assert torch.allclose(avg(x), avg(x.flip(-1)), atol=1e-5)  # mirror-invariant
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-3)
        logits, feats = WithFeatures(avg).eval()(x)  # features: the averaged ones, one row each
        assert feats.shape == (5, 8) and torch.allclose(logits, avg(x))


def test_views_are_tried_only_where_the_modality_allows_a_mirror():
    assert candidate_views(tiny_cfg()) == ["hflip"]
    assert candidate_views(tiny_cfg(modality="sar")) == ["hflip"]
    assert candidate_views(tiny_cfg(modality="document")) == []
    hooks, why = choose_views(_net(), None, tiny_cfg(modality="document"))
    assert hooks is None and not why["applied"] and "document" in why["why"]
    hooks, why = choose_views(_net(), None, tiny_cfg(view_average="off"))
    assert hooks is None and why["why"] == "--view-average off"


def test_the_choice_follows_validation_and_leaves_a_plain_model_when_it_does_not_help():
    """Labels that a mirror flips (left-bright vs right-bright images): a model that has
    learnt them loses everything when averaged with the mirror, so the mirror is refused;
    labels a mirror keeps (bright vs dark) are at worst unchanged."""
    torch.manual_seed(0)
    x = torch.rand(40, 3, 16, 16) * 0.1
    y = torch.arange(40) % 2
    x[y == 0, :, :, :8] += 0.8
    x[y == 1, :, :, 8:] += 0.8
    model = _LeftRight()  # a hand-set linear read-out of "left minus right"
    hooks, why = choose_views(model, ArraySource(x, y), tiny_cfg())
    assert hooks is None and not why["applied"]
    assert why["plain"]["val_accuracy"] == 1.0 and why["averaged"]["val_accuracy"] <= 0.6
    with torch.no_grad():  # the hooks were removed: the plain model again
        assert (model(x).argmax(1) == y).all()


class _LeftRight(torch.nn.Module):
    """Penultimate feature: mean of the left half minus the right half; a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Linear(1, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.head.bias.zero_()

    def get_classifier(self) -> torch.nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1] // 2
        return self.head((x[..., :w].mean((1, 2, 3)) - x[..., w:].mean((1, 2, 3)))[:, None])


@pytest.mark.filterwarnings("ignore")
def test_a_bundle_with_the_views_folded_in_predicts_the_same_with_torch_and_onnx(
        rgb_folder, tmp_path, monkeypatch):
    """Force the choice (the plumbing is under test, not the data): the bundle records the
    views and the validation figures, and both backends answer the averaged model, with the
    OOD score from the features of the same graph."""
    pytest.importorskip("onnxruntime")
    from imgtriage.bundle import load_bundle
    from imgtriage.data import load_input
    from imgtriage.predict import Predictor
    from imgtriage.train import view_choice
    from imgtriage.train.run import train

    calls = iter([(0.5, 1.0), (0.75, 0.9)])  # plain, then averaged
    monkeypatch.setattr(view_choice, "_score", lambda *a: next(calls))
    res = train(rgb_folder, tmp_path / "run", tiny_cfg(img_size=32, epochs=2), quiet=True)
    m = load_bundle(res.bundle_path).manifest
    assert m["model"]["kwargs"]["view_average"] == ["hflip"]
    why = m["training"]["view_average"]
    assert why["applied"] and why["averaged"]["val_accuracy"] == 0.75
    assert json.loads((tmp_path / "run" / "run.json").read_text())["view_average"] == why
    assert m["onnx"]["outputs"][0] == "logits" and m["decision"].get("ood")
    paths = sorted(str(f) for f in rgb_folder.rglob("*.png"))[::3]
    got = {b: Predictor.load(res.bundle_path, backend=b, precision="fp32") for b in
           ("onnx", "torch")}
    reps = {b: p.predict_paths(paths, include_probs=True) for b, p in got.items()}
    probs = {b: np.array([list(r["probs"].values()) for r in rep["results"]])
             for b, rep in reps.items()}
    assert np.abs(probs["onnx"] - probs["torch"]).max() <= 1e-4
    p = got["onnx"]
    assert p.tta_transforms == []  # --tta does not run the mirror a second time
    x = np.stack([load_input(f, p.spec)[0] for f in paths])
    lo, scores = p.forward(x, p.policy)  # logits and the OOD score from one graph run
    assert scores is not None and np.isfinite(scores).all()
    assert np.allclose(lo, p.logits(np.ascontiguousarray(x[..., ::-1])), atol=1e-4)
    lt, st = got["torch"].forward(x, got["torch"].policy)
    assert np.allclose(lo, lt, atol=1e-4) and np.allclose(scores, st, rtol=1e-3, atol=1e-4)


def test_a_gain_within_noise_keeps_the_plain_twice_as_fast_model(monkeypatch):
    """The mirror doubles the work per image at prediction: a tie (even with a lower NLL)
    or a gain under half a point of the selection metric leaves the plain model."""
    from imgtriage.train import view_choice

    x, y = torch.rand(8, 3, 16, 16), torch.arange(8) % 3
    for plain, averaged, kept in [((0.80, 0.50), (0.80, 0.40), False),
                                  ((0.80, 0.50), (0.804, 0.45), False),
                                  ((0.80, 0.50), (0.805, 0.45), True)]:
        calls = iter([plain, averaged])
        monkeypatch.setattr(view_choice, "_score", lambda *a, c=calls: next(c))
        hooks, why = choose_views(_net(), ArraySource(x, y), tiny_cfg())
        assert why["applied"] is kept and (hooks is not None) is kept
        if hooks is not None:
            hooks.remove()
