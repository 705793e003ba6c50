"""Batch augmentations on normalised tensors. They run in training only, never at
evaluation or prediction time (test-time augmentation is separate and explicit).

Everything is vectorised over the batch and drawn from one ``torch.Generator``, so an epoch's
augmentations are reproducible from the seed. Two families of ops:

- geometric (flips, 90-degree turns, translate, rotate, scale, shear): they move pixels but
  never change their values' meaning, so they are safe for *conservative* classes
  (calibration frames, spectra);
- photometric (brightness, contrast, noise, blur, erasing): they change intensities and are
  never applied to samples of conservative classes.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> policy = AugmentPolicy("randaug", strength=0.5, n_ops=2, flips="d4", conservative=(1,))
    >>> policy(torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 0, 1]), g).shape
    torch.Size([4, 1, 16, 16])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

GEOMETRIC_OPS = ("translate", "rotate", "scale", "shear")
PHOTOMETRIC_OPS = ("brightness", "contrast", "noise", "blur", "erase")
LIGHT_OPS = ("translate", "rotate", "scale", "brightness", "contrast", "noise")
ALL_OPS = GEOMETRIC_OPS + PHOTOMETRIC_OPS
# Largest magnitude of each op at strength 1 (fractions of the image, degrees, std units).
MAX_MAGNITUDE = {"translate": 0.2, "rotate": 30.0, "scale": 0.25, "shear": 0.3,
                 "brightness": 0.4, "contrast": 0.5, "noise": 0.2, "blur": 1.5, "erase": 0.4}
FLIP_SETS = ("none", "hflip", "d4")
# Policy name -> the flip set it always uses (None: the modality's flip set).
FIXED_FLIPS = {"none": "none", "flip": "hflip", "flip_rot90": "d4", "shift": "hflip",
               "weak": None, "light": None, "randaug": None}


def _random_flip(x: torch.Tensor, g: torch.Generator, dim: int) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=g) < 0.5
    if mask.any():
        x = x.clone()
        x[mask] = x[mask].flip(dim)
    return x


def _random_rot90(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if x.shape[-1] != x.shape[-2]:
        return x
    k = torch.randint(0, 4, (x.shape[0],), generator=g)
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def _random_flips(x: torch.Tensor, g: torch.Generator, flips: str) -> torch.Tensor:
    """hflip: random left-right flips; d4: flips and 90-degree turns (all 8 symmetries)."""
    if flips == "none":
        return x
    x = _random_flip(x, g, -1)
    if flips == "d4":
        x = _random_rot90(_random_flip(x, g, -2), g)
    return x


def _random_shift(x: torch.Tensor, g: torch.Generator, frac: float = 0.1) -> torch.Tensor:
    """Integer translations up to ``frac`` of the size, edges replicated (one gather)."""
    n, _, h, w = x.shape
    ph, pw = max(1, int(h * frac)), max(1, int(w * frac))
    dy = torch.randint(-ph, ph + 1, (n, 1), generator=g)
    dx = torch.randint(-pw, pw + 1, (n, 1), generator=g)
    rows = (torch.arange(h)[None] - dy).clamp(0, h - 1)  # (n, h)
    cols = (torch.arange(w)[None] - dx).clamp(0, w - 1)  # (n, w)
    idx = torch.arange(n)[:, None, None]
    return x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _choose_ops(n: int, ops: tuple[str, ...], k: int, photometric_ok: torch.Tensor,
                g: torch.Generator) -> torch.Tensor:
    """(n, len(ops)) bool: ``k`` distinct ops per sample; conservative rows get geometric only."""
    scores = torch.rand(n, len(ops), generator=g)
    photometric = torch.tensor([o in PHOTOMETRIC_OPS for o in ops])
    scores[~photometric_ok[:, None] & photometric[None, :]] = -1.0
    top = scores.topk(min(k, len(ops)), dim=1).indices
    chosen = torch.zeros(n, len(ops), dtype=torch.bool).scatter_(1, top, True)
    return chosen & (scores >= 0)


def _geometric(x: torch.Tensor, mags: dict[str, torch.Tensor]) -> torch.Tensor:
    """One affine warp per sample (rotation, scale, shear, translation), borders replicated."""
    a = mags["rotate"] * math.pi / 180
    s = 1 + mags["scale"]
    sh, t = mags["shear"], mags["translate"] * 2  # grid coordinates span 2 units
    theta = torch.stack([torch.stack([s * torch.cos(a), -s * torch.sin(a) + sh, t[:, 0]], 1),
                         torch.stack([s * torch.sin(a), s * torch.cos(a), t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(0.3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)  # (n, 5)
    n, c, h, w = x.shape
    flat = x.reshape(1, n * c, h, w)
    kh = k1.repeat_interleave(c, 0)[:, None, None, :]
    kv = k1.repeat_interleave(c, 0)[:, None, :, None]
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), kh, groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), kv, groups=n * c)
    return flat.reshape(n, c, h, w)


def _erase(x: torch.Tensor, frac: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    eh, ew = (frac * h).ceil().long().clamp(1, h), (frac * w).ceil().long().clamp(1, w)
    top = (torch.rand(n, generator=g) * (h - eh + 1)).long()
    left = (torch.rand(n, generator=g) * (w - ew + 1)).long()
    yy, xx = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    box = ((yy >= top[:, None, None]) & (yy < (top + eh)[:, None, None])
           & (xx >= left[:, None, None]) & (xx < (left + ew)[:, None, None]))
    return x.masked_fill(box[:, None], 0.0)


def _photometric(x: torch.Tensor, mags: dict[str, torch.Tensor], on: dict[str, torch.Tensor],
                 g: torch.Generator) -> torch.Tensor:
    col = (-1, 1, 1, 1)
    if on["contrast"].any():
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        stretched = mean + (x - mean) * (1 + mags["contrast"].view(col))
        x = torch.where(on["contrast"].view(col), stretched, x)
    x = x + mags["brightness"].view(col)
    if on["noise"].any():
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = x + noise * mags["noise"].abs().view(col)
    if on["blur"].any():
        sel = on["blur"]
        x = x.clone()
        x[sel] = _blur(x[sel], mags["blur"][sel].abs())
    if on["erase"].any():
        sel = on["erase"]
        x = x.clone()
        x[sel] = _erase(x[sel], mags["erase"][sel].abs(), g)
    return x


@dataclass(frozen=True)
class AugmentPolicy:
    """A named policy with its strength; ``conservative`` are class ids that only get
    geometric augmentation. ``flips`` (none | hflip | d4) applies to light/randaug; the
    older policies fix their own (see ``FIXED_FLIPS``)."""

    name: str = "none"
    strength: float = 0.5
    n_ops: int = 2
    flips: str = "hflip"
    conservative: tuple[int, ...] = ()

    @property
    def effective_flips(self) -> str:
        return FIXED_FLIPS.get(self.name) or self.flips

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None, g: torch.Generator
                 ) -> torch.Tensor:
        if self.name == "none":
            return x
        x = _random_flips(x, g, self.effective_flips)
        if self.name in ("shift", "weak"):  # weak: the modality's flips + small shifts
            return _random_shift(x, g)
        if self.name not in ("light", "randaug") or self.strength == 0:
            return x
        ops = LIGHT_OPS if self.name == "light" else ALL_OPS
        k = 1 if self.name == "light" else self.n_ops
        ok = torch.ones(len(x), dtype=torch.bool)
        if y is not None and self.conservative:
            ok = ~torch.isin(y.cpu(), torch.tensor(self.conservative))
        chosen = _choose_ops(len(x), ops, k, ok, g)
        on = {o: chosen[:, ops.index(o)] if o in ops else torch.zeros(len(x), dtype=torch.bool)
              for o in ALL_OPS}
        mags = {o: (torch.rand(len(x), generator=g) * 2 - 1) * MAX_MAGNITUDE[o]
                * self.strength * on[o] for o in ALL_OPS}
        shift = (torch.rand(len(x), 2, generator=g) * 2 - 1) * MAX_MAGNITUDE["translate"]
        mags["translate"] = shift * self.strength * on["translate"][:, None]
        geo = on["translate"] | on["rotate"] | on["scale"] | on["shear"]
        if geo.any():
            x = x.clone()
            x[geo] = _geometric(x[geo], {k: v[geo] for k, v in mags.items()})
        return _photometric(x, mags, on, g)


def augment_batch(x: torch.Tensor, policy: str, g: torch.Generator, *,
                  y: torch.Tensor | None = None, strength: float = 0.5, n_ops: int = 2,
                  flips: str = "hflip", conservative: tuple[int, ...] = ()) -> torch.Tensor:
    """Apply a named policy (see ``AUGMENT_POLICIES`` in the training config) to a batch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> augment_batch(torch.zeros(2, 1, 8, 8), "flip_rot90", g).shape
        torch.Size([2, 1, 8, 8])
    """
    return AugmentPolicy(policy, strength, n_ops, flips, tuple(conservative))(x, y, g)
