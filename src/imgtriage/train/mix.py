"""MixUp and CutMix: mix each image with another of the batch; the loss mixes the two labels.

Samples of conservative classes are never mixed (they are paired with themselves), and mixing
stops from ``mix_off_epoch`` on so the last epochs see clean images.

Image + feature (fusion) batches mix their feature vectors with the pair's label weight:
``lam * f_a + (1 - lam) * f_b``, with CutMix's ``lam`` the pasted area's complement, so the
features say as much about each label as the pixels and the loss do (a one-hot header
category becomes the same soft mix as the labels).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Mixer:
    """Draws a mix for a batch: returns ``(x_mixed, y_a, y_b, lam)``; the loss is
    ``lam * loss(y_a) + (1 - lam) * loss(y_b)``.

    Example:
        >>> m = Mixer(mixup_alpha=0.2)
        >>> g = torch.Generator().manual_seed(0)
        >>> x, ya, yb, lam = m(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]), g)
        >>> 0.0 <= lam <= 1.0
        True
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    off_epoch: int = 0
    conservative: tuple[int, ...] = ()

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def active(self, epoch: int) -> bool:
        """Whether batches of ``epoch`` (1-based) are mixed."""
        return self.enabled and (self.off_epoch == 0 or epoch < self.off_epoch)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        x, ya, yb, lam, _ = self.mix(x, y, g)
        return x, ya, yb, lam

    def mix(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator,
            features: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        """``(x_mixed, y_a, y_b, lam, features_mixed)``: the features of each pair mixed
        with the same ``lam`` as the labels (None stays None).

        Example:
            >>> f = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
            >>> x, ya, yb, lam, fm = Mixer(mixup_alpha=0.2).mix(
            ...     torch.randn(4, 1, 8, 8), torch.arange(4), torch.Generator().manual_seed(0), f)
            >>> torch.allclose(fm[:, 0], lam * ya.float() + (1 - lam) * yb.float())
            True
        """
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
        if rng.random() >= self.prob:
            return x, y, y, 1.0, features
        perm = torch.randperm(len(x), generator=g).to(y.device)
        if self.conservative:
            keep = torch.isin(y, torch.tensor(self.conservative, device=y.device))
            keep |= keep[perm]
            perm = torch.where(keep, torch.arange(len(x), device=y.device), perm)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < 0.5)
        alone = perm == torch.arange(len(x), device=perm.device)
        if use_cutmix:
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
            x, lam = _cutmix(x, perm, lam, rng)
        else:
            lam = float(rng.beta(self.mixup_alpha, self.mixup_alpha))
            x = torch.where(alone.view(-1, 1, 1, 1), x, x * lam + x[perm] * (1 - lam))
        if features is not None:
            p = perm.to(features.device)
            features = torch.where(alone.to(features.device).view(-1, 1), features,
                                   features * lam + features[p] * (1 - lam))
        return x, y, y[perm], lam, features


def _cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator
            ) -> tuple[torch.Tensor, float]:
    """Paste a box of area ``1 - lam`` from the partner; lam is corrected to the real area."""
    h, w = x.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return out, 1.0 - float((y1 - y0) * (x1 - x0)) / (h * w)
