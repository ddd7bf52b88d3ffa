"""DTensor helpers: a parameter's local part and its FSDP2 placement."""

from __future__ import annotations

import math

import torch
from torch import Tensor

try:  # DTensor is public from torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - old torch
    DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (the tensor itself unless it is a DTensor); no copy."""
    return t.to_local() if is_dtensor(t) else t


def is_row_sharded(p: Tensor) -> bool:
    """Placed ``Shard(0)``, as FSDP2's ``fully_shard`` places parameters."""
    return is_dtensor(p) and isinstance(p.placements[0], Shard)


def sharded_like(local_t: Tensor, p: Tensor, dim: int, global_shape: tuple[int, ...]) -> Tensor:
    """``local_t`` as a DTensor sharded along ``dim`` on ``p``'s mesh (no communication)."""
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(
        local_t,
        p.device_mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )


def row_chunk(full: Tensor, p: Tensor, dim: int = 0) -> Tensor:
    """This rank's slice along ``dim`` of a full tensor, as ``Shard(0)`` cuts ``p``'s rows
    (``torch.chunk`` semantics: trailing ranks may hold fewer rows or none)."""
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    size = math.ceil(full.shape[dim] / world) if world else 0
    start = min(rank * size, full.shape[dim])
    stop = min(start + size, full.shape[dim])
    return full.narrow(dim, start, stop - start)
