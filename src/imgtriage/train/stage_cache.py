"""Fine-tuning the last stages on cached activations of the frozen first ones.

When fine-tuning keeps the stem and the first ``k`` stages of an EfficientNet frozen (their
weights and their batch-norm statistics: ``--freeze-stages``, ``--backbone-norm frozen``),
their output for an image never changes. So every training image goes through them once,
with its horizontal mirror (stems with "same" padding and stride 2 are not mirror-symmetric,
so the mirror is computed, not the feature map flipped), and every epoch trains only the
rest of the network on those activations (:class:`TailNet`). On 2 CPU cores the frozen
stages at high resolution are a large share of a step (EfficientNet-Lite0 at 96 px: stage 1
alone costs more than stages 3-6 together in inference), so an epoch at a larger side costs a
fraction of a full one, and augmentation moves to the activations: the mirror or not, and a
random translation of the feature map (reflected at the border) per image.

The activations live in memory for the run only (float16: 5,000 CIFAR photos at 160 px after
3 stages, with mirrors, ~0.3 GB), computed from the run's decoded inputs by the run's model,
so nothing outlives what decided them. The trained weights are the model's own:
:class:`TailNet` holds the same modules under the same names, so its state dict loads into
the full model, and the bundle is a normal one.

Example:
    >>> import timm, torch
    >>> net = timm.create_model("tf_efficientnet_lite0", num_classes=3).eval()
    >>> x = torch.randn(2, 3, 64, 64)
    >>> tail = TailNet(net, 3).eval()
    >>> bool(torch.allclose(tail(stem_forward(net, 3, x)), net(x), atol=1e-4))
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

_PARTS = ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier")
FEATURE_DTYPE = torch.float16


def supports(model: nn.Module) -> bool:
    """Whether ``model`` has the EfficientNet layout this module splits (timm's
    EfficientNet family: stem, ``blocks`` stages, head conv, pooling, classifier)."""
    return all(hasattr(model, p) for p in _PARTS) and isinstance(
        getattr(model, "blocks", None), nn.Sequential)


def stem_forward(model: nn.Module, stages: int, x: torch.Tensor) -> torch.Tensor:
    """The output of the stem and the first ``stages`` stages (as the model runs them)."""
    h = model.bn1(model.conv_stem(x))
    for block in model.blocks[:stages]:
        h = block(h)
    return h


class TailNet(nn.Module):
    """The network from stage ``start`` on, on the activations :func:`stem_forward` gives.

    It registers every module of ``model`` under its own name (shared, not copied), so its
    parameter names, layer groups (``--layer-decay``), classifier and state dict are the
    model's; the stem and first stages are simply not run.
    """

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        if not supports(model):
            raise TypeError(f"{type(model).__name__} has no EfficientNet stage layout")
        for name, child in model.named_children():
            self.add_module(name, child)
        self.start = int(start)
        self.drop_rate = float(getattr(model, "drop_rate", 0.0))
        self._matcher = {c: model.group_matcher(coarse=c) for c in (False, True)} if hasattr(
            model, "group_matcher") else None

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        if self._matcher is None:
            return {}
        return self._matcher[coarse]

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks[self.start:]:
            h = block(h)
        h = self.global_pool(self.bn2(self.conv_head(h)))
        if self.drop_rate > 0:
            h = nn.functional.dropout(h, self.drop_rate, self.training)
        return self.classifier(h)


@torch.no_grad()
def compute_activations(model: nn.Module, stages: int, x: torch.Tensor, *, mirror: bool,
                        batch_size: int = 64, channels_last: bool = True,
                        advance: Callable[[int], None] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`stem_forward` of every image of ``x`` (N, C, H, W) in eval mode, stored as
    float16, and of its horizontal mirror when ``mirror``."""
    was = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    outs: list[torch.Tensor] = []
    flips: list[torch.Tensor] = []
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].float().contiguous(memory_format=fmt)
            outs.append(stem_forward(model, stages, xb).to(FEATURE_DTYPE).contiguous())
            if mirror:
                xf = xb.flip(3).contiguous(memory_format=fmt)
                flips.append(stem_forward(model, stages, xf).to(FEATURE_DTYPE).contiguous())
            if advance is not None:
                advance(len(xb))
    finally:
        model.train(was)
    return torch.cat(outs), (torch.cat(flips) if mirror else None)


def shift_batch(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Each feature map translated by up to ``max_shift`` cells each way, the border
    reflected (the feature-map counterpart of pad-and-crop on the image)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = nn.functional.pad(x, (max_shift,) * 4, mode="reflect")
    off = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=g).tolist()
    return torch.stack([pad[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off)])


@dataclass
class ActivationSource:
    """Cached activations as a training source for :func:`~imgtriage.train.loop.fit`:
    ``batches(order, bs)`` yields float32 ``(x, y)``; with ``mirrored`` each image is its
    mirror's activations with probability 1/2, and with ``max_shift`` it is translated
    (:func:`shift_batch`). Draws come from its own generator (seeded), so a run repeats."""

    x: torch.Tensor
    y: torch.Tensor
    mirrored: torch.Tensor | None = None
    max_shift: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.y = torch.as_tensor(self.y).long()
        self.labels = self.y.numpy()
        self.defects: list[Any] = []
        self._g = torch.Generator().manual_seed(self.seed)

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, order: Iterable[int], batch_size: int) -> Iterator[tuple[torch.Tensor,
                                                                               torch.Tensor]]:
        idx = torch.as_tensor(list(order), dtype=torch.long)
        for part in idx.split(batch_size):
            xb = self.x[part]
            if self.mirrored is not None:
                flip = torch.rand(len(part), generator=self._g) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), self.mirrored[part], xb)
            xb = xb.float()
            if self.max_shift:
                xb = shift_batch(xb, self.max_shift, self._g)
            yield xb, self.y[part]




def mirror_views(modality_flips: str) -> bool | None:
    """Whether the cached views include the mirror, from the modality's flips: ``hflip``
    yes, ``none`` no; other flips (``d4``) are not cached (None: the stage cache does not
    apply and epochs run on augmented images)."""
    return {"hflip": True, "none": False}.get(modality_flips)


def max_shift_for(side: int) -> int:
    """The largest translation (cells) of a feature map ``side`` cells wide: an eighth of
    it, as pad-and-crop by 4 of a 32-px photo (at least 1).

    Example:
        >>> [max_shift_for(s) for s in (6, 12, 20, 28)]
        [1, 2, 2, 4]
    """
    return max(1, round(side / 8))


@dataclass(frozen=True)
class StagePlan:
    """What fine-tuning runs on when the stage cache applies (see :func:`prepare`)."""

    net: TailNet
    train: ActivationSource
    val: ActivationSource | None
    cfg: Any  # the fine-tuning TrainConfig, image augmentation off
    summary: dict[str, Any]


def prepare(model: nn.Module, train: Any, val: Any, cfg: Any, modality_flips: str,
            say: Callable[[str], None]) -> StagePlan | None:
    """The stage cache for a fine-tuning run (``cfg`` the fine-tuning config), or None when
    it does not apply: ``--stage-cache off``, no frozen stages, batch norm not frozen, a
    model without the EfficientNet layout, inputs not decoded in memory (``.x``), feature
    fusion, or flips other than the mirror. Computes the activations (train with mirrors)."""
    views = False if cfg.augment == "none" else mirror_views(modality_flips)
    k = int(cfg.freeze_stages)
    if (cfg.stage_cache != "auto" or k < 1 or cfg.backbone_norm != "frozen"
            or not supports(model) or k >= len(model.blocks) or views is None
            or not isinstance(getattr(train, "x", None), torch.Tensor)
            or getattr(train, "features", None) is not None
            or (val is not None and not isinstance(getattr(val, "x", None), torch.Tensor))):
        return None
    t0 = time.perf_counter()
    last = cfg.channels_last != "off"
    a_tr, m_tr = compute_activations(model, k, train.x, mirror=bool(views),
                                     channels_last=last)
    a_va = (compute_activations(model, k, val.x, mirror=False, channels_last=last)[0]
            if val is not None and len(val) else None)
    shift = max_shift_for(a_tr.shape[-1]) if cfg.augment != "none" else 0
    seconds = time.perf_counter() - t0
    n = len(a_tr) * (2 if views else 1) + (len(a_va) if a_va is not None else 0)
    summary = {"stages": k, "shape": list(a_tr.shape[1:]), "mirrored": bool(views),
               "max_shift": shift, "images": n, "seconds": round(seconds, 1),
               "megabytes": round(n * a_tr[0].numel() * a_tr.element_size() / 2**20)}
    say(f"stage cache: stem + first {k} stages run once on {n} images"
        f"{' (train with mirrors)' if views else ''} in {seconds:.1f}s -> activations "
        f"{tuple(a_tr.shape[1:])} ({summary['megabytes']} MB); the epochs train the rest of "
        f"the network on them"
        + (f", each image mirrored at random and shifted up to {shift} cell(s)"
           if cfg.augment != "none" else ""))
    tr_src = ActivationSource(a_tr, torch.as_tensor(train.y), m_tr, max_shift=shift,
                              seed=cfg.seed)
    va_src = (ActivationSource(a_va, torch.as_tensor(val.y)) if a_va is not None else None)
    return StagePlan(TailNet(model, k), tr_src, va_src, replace(cfg, augment="none"), summary)


__all__ = ["ActivationSource", "TailNet", "compute_activations", "max_shift_for",
           "mirror_views", "prepare", "shift_batch", "stem_forward", "supports"]
