"""DDP under ``torchrun``: process group from the environment, rank-0-only side effects.

``torchrun --nproc_per_node N -m imgtriage train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` then joins the group (NCCL on CUDA, gloo on CPU)
and pins each process to its GPU. Without those variables everything is a no-op and the
same code runs as one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"
    owns_group: bool = False  # True when this process created the group (and must end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> str:
    """``auto`` -> cuda when available; ``cuda`` -> this process's GPU under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return device


def init_distributed(device: str = "cpu") -> DistInfo:
    """Join the torchrun process group if the environment describes one.

    Example:
        >>> init_distributed("cpu").world_size  # outside torchrun
        1
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device, local if world > 1 else 0)
    if world <= 1:
        return DistInfo(device=dev)
    owns = False
    if not dist.is_initialized():
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
        owns = True
    return DistInfo(rank, world, local, local_world, dev, owns)


def current_dist(device: str = "cpu") -> DistInfo:
    """The group this process already belongs to (single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(device=resolve_device(device))
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistInfo(rank, world, local, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
                    resolve_device(device, local))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over processes (in place on a copy); identity for one process."""
    if not info.distributed:
        return t
    out = t.clone().to(info.device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """End the group if this process created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
