"""The features an OOD scorer reads: what the head sees, and how the early stages responded.

Out-of-distribution scores are computed in the penultimate space (k nearest neighbours of the
L2-normalised features, Sun et al. 2022). Every classifier here ends in one head module
(``get_classifier()`` for timm models, the crop CNNs and fusion nets; ``head`` for the
Siamese cosine head); its input is the feature vector. :class:`WithFeatures` returns it next
to the logits from the same forward pass, so the ONNX export can emit both from one graph.

With ``stages=True`` the features go on with the statistics of the earlier stages' feature
maps (:func:`stage_modules`): per channel, the mean and the standard deviation over the map,
each as ``sign(v) log(1 + |v|)``. The penultimate space of a network trained on one sensor
describes *which class*; it can place an unlike image (a photo before a SAR model) near a
class, while low-level responses (texture, speckle, contrast) tell at once that the input is
not of the training kind, and barely move under a covariate shift (another depression angle)
that moves the penultimate features (``docs/benchmarks.md``, issue 15). Layer statistics as
OOD evidence: Lee et al. 2018 (Mahalanobis over layers), Sastry & Oore 2020 (Gram matrices).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imgtriage.errors import ModelError


def head_of(model: nn.Module) -> nn.Module:
    """The module whose input is the penultimate feature vector."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else getattr(model, "head", None)
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise ModelError(f"{type(model).__name__} has no classification head to read features "
                         "from; out-of-distribution scores need one (train with --no-ood)")
    return head


def stage_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are ``model``'s intermediate feature maps, shallow to deep,
    less the deepest (its pooled output is, in effect, the penultimate feature): a model's
    own ``stages()`` (the crop CNNs), timm's ``feature_info`` (EfficientNet, ResNet, ...),
    else none (the OOD scorer then reads the penultimate features alone)."""
    own = getattr(model, "stages", None)
    if callable(own):
        found = list(own())
    else:
        info = getattr(model, "feature_info", None)
        names = [d.get("module") for d in info] if isinstance(info, list) else []
        try:
            found = [model.get_submodule(n) for n in names] if all(names) else []
        except AttributeError:
            found = []
    return found[:-1]


def _map_moments(fmap: torch.Tensor) -> torch.Tensor:
    """(N, 2C): per channel, the mean and standard deviation over the map. The variance from
    the centred map (E[x^2] - E[x]^2 cancels on inputs with large activations: torch and ONNX
    Runtime then disagreed by 1e-4 relative on a noise image's score), squared with ``Mul``:
    ``pow(2)`` exports as ONNX ``Pow``, slower on small maps."""
    mean = fmap.mean(dim=(2, 3))
    centred = fmap - mean[:, :, None, None]
    return torch.cat([mean, (centred * centred).mean(dim=(2, 3)).sqrt()], dim=1)


def _log_compress(v: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * torch.log1p(v.abs())


class WithFeatures(nn.Module):
    """``model`` returning ``(logits, features)``; features = the head's (flattened) input,
    then (``stages=True``) each earlier stage's map statistics; ``stage_widths`` says their
    widths (empty when the model has no stages; known after the first pass).

    Example:
        >>> from imgtriage.models import create_model
        >>> model = create_model("crop_cnn", 3, 1, widths=[4, 8])
        >>> logits, feats = WithFeatures(model).eval()(torch.zeros(2, 1, 16, 16))
        >>> tuple(logits.shape), tuple(feats.shape)
        ((2, 3), (2, 8))
        >>> tap = WithFeatures(model, stages=True).eval()
        >>> tuple(tap(torch.zeros(2, 1, 16, 16))[1].shape), tap.stage_widths
        ((2, 16), (8,))
    """

    def __init__(self, model: nn.Module, stages: bool = False) -> None:
        super().__init__()
        self.model = model
        self._head = (head_of(model),)  # a tuple: not registered twice as a submodule
        self._stages = tuple(stage_modules(model)) if stages else ()
        self.stage_widths: tuple[int, ...] = ()

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen: list[torch.Tensor] = []
        maps: list[torch.Tensor] = []

        def keep(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen.append(inputs[0])

        def keep_map(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                maps.append(_map_moments(output))

        handles = [self._head[0].register_forward_pre_hook(keep)]  # only for this pass
        handles += [m.register_forward_hook(keep_map) for m in self._stages]
        try:
            logits = self.model(*args)
        finally:
            for h in handles:
                h.remove()
        if len(seen) != 1:
            raise ModelError(f"the head of {type(self.model).__name__} ran {len(seen)} times in "
                             "one forward pass; cannot tell which input is the feature")
        feats = seen[0].flatten(1)
        n = feats.shape[0]
        stats = [self._per_image(s, n) for s in maps]
        self.stage_widths = tuple(int(s.shape[1]) for s in stats)
        if not stats:
            return logits, feats
        # one log-compression for every stage: few graph nodes (each costs ONNX Runtime a
        # dispatch, which on a 28-px model weighs more than the arithmetic)
        return logits, torch.cat([feats, _log_compress(torch.cat(stats, dim=1))], dim=1)

    def _per_image(self, s: torch.Tensor, n: int) -> torch.Tensor:
        """A stage's statistics, one row per image: a model that averages views (views.py)
        runs k x N images before its head, and the views' statistics are averaged as its
        features are. Decided when the graph is traced (the view count is fixed), so a plain
        model's graph gets no reshaping at all."""
        rows, n = int(s.shape[0]), int(n)
        if rows == n:
            return s
        if rows % n:
            raise ModelError(f"a stage of {type(self.model).__name__} saw a batch of {rows}, "
                             f"not a multiple of the head's ({n}); cannot pair its statistics")
        return s.reshape(rows // n, -1, int(s.shape[1])).mean(0)
