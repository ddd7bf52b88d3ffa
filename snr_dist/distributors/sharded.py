"""FSDP2: DTensor parameters placed ``Shard(0)`` on a 1-D mesh, as ``fully_shard`` makes them.

Every rank holds some rows of every matrix and their gradient (after FSDP2's reduce-scatter).
Elementwise state is sharded like the parameter. A tracker's basis lives on the unsharded
column side, so its projections are local; the statistics it accumulates are sums over rows,
i.e. partial sums on each rank, which one all-reduce of ``2r + 2`` numbers per matrix completes
every step. At a refresh the partial sketches are summed to the tracker's owner, which solves
and broadcasts; the owner carries the non-additive parts (the rotated covariance, the new
sketch) so that the partial sums stay right.

Checkpoint view: parameter-shaped state as DTensors with the global shape (as torch's own
optimizers under FSDP2), a tracker's projected mean as a DTensor sharded along its columns,
partial sums all-reduced. That last step is a collective, so a plain ``state_dict()`` of a
subspace optimizer refuses and `snr_dist.checkpoint` (DCP) does it on every rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist.distributors.base import Distributor
from snr_dist.distributors.comm import GroupComm
from snr_dist.distributors.dtensor import is_dtensor, local, row_chunk, sharded_like
from snr_dist.layout import Kind


class ShardedDistributor(Distributor):
    name = "sharded"
    partial_statistics = True

    def __init__(self, mesh) -> None:
        super().__init__(GroupComm(mesh.get_group()))
        self.mesh = mesh

    # ------------------------------------------------------------------ checkpoint view
    def state_needs_collective(self, kinds: dict[str, Kind]) -> bool:
        return Kind.PARTIAL in kinds.values()

    def global_state(self, items):
        out, to_sum = [], []
        for p, state, kinds in items:
            g = {}
            for k, v in state.items():
                kind = kinds.get(k, Kind.SHARED)
                if kind is Kind.PARAM:
                    g[k] = sharded_like(v, p, 0, tuple(p.shape))
                elif kind is Kind.COLUMNS:
                    g[k] = sharded_like(v, p, 1, (v.shape[0], p.shape[0]))
                elif kind is Kind.PARTIAL:
                    g[k] = v.clone()
                    to_sum.append(g[k])
                else:
                    g[k] = v
            out.append(g)
        self.sum_(to_sum)
        return out

    def install_state(self, p: Tensor, values: dict, kinds: dict[str, Kind]) -> dict:
        out = {}
        for k, v in values.items():
            kind = kinds.get(k, Kind.SHARED)
            if is_dtensor(v):
                v = local(v)
            elif kind is Kind.PARAM and tuple(v.shape) == tuple(p.shape):
                v = row_chunk(v, p, 0)  # a full tensor from an unsharded run
            elif kind is Kind.COLUMNS and v.shape[-1] == p.shape[0]:
                v = row_chunk(v, p, 1)
            if kind is Kind.PARTIAL and not self.owns(p):
                v = torch.zeros_like(v)  # partial sums: the owner carries the total
            out[k] = v.clone()
        return out

    def template(self, p: Tensor, kind: Kind, size, dtype) -> Tensor:
        if kind is Kind.PARAM:
            return sharded_like(torch.zeros(local(p).shape, dtype=dtype), p, 0, tuple(p.shape))
        if kind is Kind.COLUMNS:
            rows = local(p).shape[0]
            return sharded_like(torch.zeros(size[0], rows, dtype=dtype), p, 1, tuple(size))
        return torch.zeros(tuple(size), dtype=dtype)
