"""The collectives snr-dist adds, bucketed into flat buffers, with byte counters.

`Comm` is the single-process version (every operation is the identity), so the optimizer
runs one code path everywhere; `GroupComm` talks to a real process group. All payloads are
fp32 statistics; each call flattens its tensors into buckets of at most ``bucket_mb``.
"""

from __future__ import annotations

from collections import defaultdict

import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class Comm:
    """Single process: rank 0 of a world of 1."""

    rank = 0
    world = 1
    group = None

    def __init__(self) -> None:
        self.bytes = defaultdict(int)  # operation -> bytes this rank contributed
        self.calls = defaultdict(int)

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        """Sum over ranks, in place."""

    def reduce_(self, tensors: list[Tensor], dst: int) -> None:
        """Sum over ranks into ``dst``, in place (other ranks' values are undefined after)."""

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        """Copy ``src``'s values to every rank, in place."""

    def all_gather_object(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        """Wait for every rank."""


class GroupComm(Comm):
    """A torch.distributed process group (gloo, nccl, ...)."""

    def __init__(self, group=None, bucket_mb: float = 25.0) -> None:
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.bucket_bytes = int(bucket_mb * 2**20)

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank

    def _buckets(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        by_key: dict = defaultdict(list)
        for t in tensors:
            by_key[(t.device, t.dtype)].append(t)
        out = []
        for group in by_key.values():
            bucket: list[Tensor] = []
            size = 0
            for t in group:
                nbytes = t.numel() * t.element_size()
                if bucket and size + nbytes > self.bucket_bytes:
                    out.append(bucket)
                    bucket, size = [], 0
                bucket.append(t)
                size += nbytes
            if bucket:
                out.append(bucket)
        return out

    def _run(self, name: str, tensors: list[Tensor], op) -> None:
        for bucket in self._buckets([t for t in tensors if t.numel() > 0]):
            flat = _flatten_dense_tensors(bucket)
            self.bytes[name] += flat.numel() * flat.element_size()
            self.calls[name] += 1
            op(flat)
            for t, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(v)

    def all_reduce_(self, tensors: list[Tensor]) -> None:
        self._run("all_reduce", tensors, lambda f: dist.all_reduce(f, group=self.group))

    def reduce_(self, tensors: list[Tensor], dst: int) -> None:
        self._run("reduce", tensors, lambda f: dist.reduce(f, self._global(dst), group=self.group))

    def broadcast_(self, tensors: list[Tensor], src: int) -> None:
        self._run(
            "broadcast", tensors, lambda f: dist.broadcast(f, self._global(src), group=self.group)
        )

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        dist.barrier(group=self.group)
