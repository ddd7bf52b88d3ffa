"""Distributors: one module per parallelism, behind one small interface (`base.Distributor`).

- `local`: one process, or a rank-local optimizer; no communication.
- `replicated`: DDP, DeepSpeed ZeRO 0, Megatron's data-parallel group; complete statistics on
  every rank, cross-sample sums all-reduced, refreshes solved by owners and broadcast.
- `sharded`: FSDP2 (DTensor ``Shard(0)``); partial sums over rows, one bucketed all-reduce per
  step, refresh partials reduced to owners.
- `zero`: DeepSpeed ZeRO 1-3, on the row shards `snr_dist.optim.zero_view` cuts from the
  flat partitions; the same sums as `sharded`, rank-local checkpoints.

See README.md in this folder for what each one communicates.

`make_distributor` picks one from the parameters and ``process_group`` without running a
collective. The data-parallel group is never guessed from "a process group is initialised":
plain tensors under several ranks may be DDP replicas, pipeline stages or rank-local models.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

from snr_dist.distributors.assignment import assign_owners, balance_ratio
from snr_dist.distributors.base import Distributor, RefreshJob
from snr_dist.distributors.comm import Comm, GroupComm
from snr_dist.distributors.dtensor import Replicate, Shard, is_dtensor, local, row_shard
from snr_dist.distributors.local import LocalDistributor
from snr_dist.distributors.replicated import ReplicatedDistributor
from snr_dist.distributors.sharded import ShardedDistributor
from snr_dist.distributors.zero import ZeroDistributor

__all__ = [
    "Comm",
    "Distributor",
    "GroupComm",
    "LocalDistributor",
    "RefreshJob",
    "ReplicatedDistributor",
    "ShardedDistributor",
    "ZeroDistributor",
    "assign_owners",
    "balance_ratio",
    "local",
    "make_distributor",
]


def _refuse_fsdp1(params: list[Tensor]) -> None:
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(
            "snr-dist does not support FSDP1 (FullyShardedDataParallel): it hands the optimizer "
            "flattened parameter shards (even with use_orig_params=True), so per-matrix "
            "statistics cannot be formed. Use FSDP2 (torch.distributed.fsdp.fully_shard, or "
            "snr_dist.fsdp.wrap) or DistributedDataParallel."
        )


def _fsdp2_mesh(dtensors: list[Tensor], n_params: int):
    if len(dtensors) != n_params:
        raise ValueError(
            "snr-dist: some parameters are DTensors and some are not; put them under one "
            "data-parallel wrapper (e.g. fully_shard the root module too)"
        )
    mesh = dtensors[0].device_mesh
    for p in dtensors:
        if p.device_mesh != mesh or p.device_mesh.ndim != 1:
            raise ValueError(
                "snr-dist supports DTensor parameters on one 1-D device mesh (FSDP2); got a "
                f"mesh of shape {tuple(p.device_mesh.shape)}. HSDP and tensor parallelism are "
                "not supported yet."
            )
        placement = p.placements[0]
        if not isinstance(placement, (Shard, Replicate)) or (
            isinstance(placement, Shard) and placement.dim != 0
        ):
            raise ValueError(
                f"snr-dist supports DTensor parameters placed Shard(0) or Replicate() (as FSDP2 "
                f"places them); got {p.placements} for a parameter of shape {tuple(p.shape)}"
            )
    return mesh


def _same_ranks(group: Any, other: Any) -> bool:
    """Whether ``group`` (a process group, or None / a string: not one) spans ``other``'s
    ranks."""
    if group is None or isinstance(group, str):
        return False
    return dist.get_process_group_ranks(group) == dist.get_process_group_ranks(other)


def _describe(group: Any) -> str:
    if group is None or isinstance(group, str):
        return repr(group)
    return f"ranks {dist.get_process_group_ranks(group)}"


def make_distributor(
    params: list[Tensor], process_group: Any = "auto", pools_ranks: bool = False
) -> Distributor:
    """The distributor for ``params``; ``process_group``: "auto", None or a process group.

    - DTensor parameters (FSDP2): their mesh; ``process_group`` must be "auto" or a group of
      the mesh's ranks (an optimizer built with the data-parallel group before a framework
      sharded its parameters, as Accelerate and HF Trainer do under FSDP2).
    - ``None``: local to this rank. A process group: replicated data parallelism over it.
    - "auto" with plain tensors: local. Every rank of a DDP job then computes the same
      statistics from the same reduced gradient, so that is right for DDP too, except for
      estimators that pool the ranks' own gradients (``pools_ranks``): they need the group
      and raise here when several ranks exist and none was given.
    """
    _refuse_fsdp1(params)
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        mesh = _fsdp2_mesh(dtensors, len(params))
        if process_group != "auto" and not _same_ranks(process_group, mesh.get_group()):
            raise ValueError(
                "process_group is taken from the DTensor parameters' device mesh (ranks "
                f"{dist.get_process_group_ranks(mesh.get_group())}), and the one given "
                f"({_describe(process_group)}) is another; pass process_group='auto'"
            )
        return ShardedDistributor(mesh)
    if process_group is None:
        return LocalDistributor()
    if any(row_shard(p) is not None for p in params):  # ZeRO row shards (zero_view)
        if isinstance(process_group, str) or dist.get_world_size(process_group) == 1:
            return LocalDistributor()
        return ZeroDistributor(process_group)
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(
                f"Invalid process_group: {process_group!r}; allowed: 'auto', None or a "
                "torch.distributed process group"
            )
        initialised = dist.is_available() and dist.is_initialized()
        if pools_ranks and initialised and dist.get_world_size() > 1:
            raise ValueError(
                "snr-dist: estimator='cross_sample' pools the gradients of the ranks that train "
                "one model, and cannot tell which ranks those are: torch.distributed runs "
                f"{dist.get_world_size()} ranks and the parameters are plain tensors (DDP "
                "replicas, pipeline stages and rank-local models all look like this). Under "
                "DDP pass process_group=dist.group.WORLD (or your data-parallel group); for an "
                "optimizer local to this rank pass process_group=None."
            )
        return LocalDistributor()
    if dist.get_world_size(process_group) == 1:
        return LocalDistributor()
    return ReplicatedDistributor(process_group)
