"""Batch augmentations on normalised tensors. They run in training only, never at
evaluation or prediction time (test-time augmentation is separate and explicit)."""

from __future__ import annotations

import torch


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


def _random_shift(x: torch.Tensor, g: torch.Generator, frac: float = 0.1) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph, pw = max(1, int(h * frac)), max(1, int(w * frac))
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="replicate")
    dy = torch.randint(0, 2 * ph + 1, (x.shape[0],), generator=g)
    dx = torch.randint(0, 2 * pw + 1, (x.shape[0],), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
                        for i in range(x.shape[0])])


def augment_batch(x: torch.Tensor, policy: str, g: torch.Generator) -> torch.Tensor:
    """Apply a named policy (see ``TrainConfig`` / ``AUGMENT_POLICIES``) to a (N, C, H, W) batch."""
    if policy == "none":
        return x
    x = _random_flip(x, g, -1)
    if policy == "flip_rot90":
        x = _random_flip(x, g, -2)
        x = _random_rot90(x, g)
    elif policy == "shift":
        x = _random_shift(x, g)
    return x
