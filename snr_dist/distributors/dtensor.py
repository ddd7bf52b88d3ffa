"""Row shards: a parameter's local part and where its rows live.

Two kinds of parameter hold some rows of a larger matrix: FSDP2's DTensors placed ``Shard(0)``,
and the plain tensors snr-dist builds for DeepSpeed ZeRO (`snr_dist.optim.zero_view`), each
rank's whole rows of a parameter cut into flat partitions, marked with `mark_row_shard`. The
estimators treat both alike: statistics are partial sums over rows, bases live on the columns.
"""

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


_ROW_SHARD = "_snr_row_shard"


def mark_row_shard(t: Tensor, global_shape: tuple[int, ...], first_row: int) -> Tensor:
    """Mark ``t`` as rows ``first_row ...`` of a parameter of ``global_shape`` (ZeRO)."""
    setattr(t, _ROW_SHARD, (tuple(global_shape), int(first_row)))
    return t


def row_shard(t: Tensor) -> tuple[tuple[int, ...], int] | None:
    """``(global shape, first row)`` of a marked row shard, else None."""
    return getattr(t, _ROW_SHARD, None)


def global_shape(p: Tensor) -> tuple[int, ...]:
    """The whole parameter's shape (a DTensor's shape is global already)."""
    info = row_shard(p)
    return info[0] if info is not None else tuple(p.shape)


def is_row_sharded(p: Tensor) -> bool:
    """Placed ``Shard(0)``, as FSDP2's ``fully_shard`` places parameters, or a marked ZeRO row
    shard."""
    return row_shard(p) is not None or (is_dtensor(p) and isinstance(p.placements[0], Shard))


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
    (``torch.chunk`` semantics: trailing ranks may hold fewer rows or none), or as a marked
    ZeRO row shard says."""
    info = row_shard(p)
    if info is not None:
        shape, first = info
        rows = p.shape[0] if p.dim() else 0
        if dim == 0:
            full = full.reshape((shape[0] if shape else 1,) + tuple(shape[1:]))
        return full.narrow(dim, first, rows)
    mesh = p.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    size = math.ceil(full.shape[dim] / world) if world else 0
    start = min(rank * size, full.shape[dim])
    stop = min(start + size, full.shape[dim])
    return full.narrow(dim, start, stop - start)
