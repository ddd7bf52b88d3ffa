"""Which kind of parallelism an optimizer's parameters live in, and what this rank owns.

Three cases, detected from the parameters themselves (no wrapper needed):

- **single**: one process (or ``process_group=None``).
- **replicated**: plain tensors under an initialised process group, e.g. DDP. After the
  backward pass every rank holds the same averaged gradient, so a tracker's statistics are
  computed by its owner alone and only its ``r + 1`` gates (and, at a refresh, its basis) are
  shared.
- **sharded**: DTensor parameters placed ``Shard(0)`` on a 1-D mesh, as FSDP2's
  ``fully_shard`` makes them. Every rank holds rows of every matrix; tracker statistics are
  partial sums over rows that one all-reduce completes.

FSDP1 (``FullyShardedDataParallel``) hands the optimizer flattened parameters whose shapes are
not the model's; it is refused rather than silently treated as a bag of vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import Tensor

from snr_dist.distributed.comm import Comm, GroupComm

try:  # DTensor is public from torch 2.5
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - old torch
    DTensor = Replicate = Shard = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (the tensor itself unless it is a DTensor); no copy."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class ParallelContext:
    """The data-parallel world of one optimizer."""

    comm: Comm
    mode: str  # "single" | "replicated" | "sharded"
    owners: dict[Tensor, int] = field(default_factory=dict)
    mesh: object | None = None

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    @property
    def sharded(self) -> bool:
        return self.mode == "sharded"

    def owner(self, p: Tensor) -> int:
        return self.owners.get(p, 0)

    def owns(self, p: Tensor) -> bool:
        return self.mode == "single" or self.owner(p) == self.rank

    def participates(self, p: Tensor) -> bool:
        """Holds (partial) tracker statistics of ``p``: every shard, or the owner."""
        return self.mode != "replicated" or self.owns(p)


def _refuse_fsdp1(params: list[Tensor]) -> None:
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        raise ValueError(
            "snr-dist does not support FSDP1 (FullyShardedDataParallel): it hands the optimizer "
            "flattened parameter shards (even with use_orig_params=True), so per-matrix "
            "statistics cannot be formed. Use FSDP2 (torch.distributed.fsdp.fully_shard, or "
            "snr_dist.fsdp.wrap) or DistributedDataParallel."
        )


def detect_context(param_groups: list[dict], process_group="auto") -> ParallelContext:
    """Inspect the parameters; ``process_group``: "auto", None (single process) or a group."""
    params = [p for g in param_groups for p in g["params"]]
    _refuse_fsdp1(params)
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        if len(dtensors) != len(params):
            raise ValueError(
                "snr-dist: some parameters are DTensors and some are not; put them under one "
                "data-parallel wrapper (e.g. fully_shard the root module too)"
            )
        mesh = dtensors[0].device_mesh
        for p in dtensors:
            if p.device_mesh != mesh or p.device_mesh.ndim != 1:
                raise ValueError(
                    "snr-dist supports DTensor parameters on one 1-D device mesh (FSDP2); got "
                    f"a mesh of shape {tuple(p.device_mesh.shape)}. HSDP and tensor "
                    "parallelism are not supported yet."
                )
            placement = p.placements[0]
            if not isinstance(placement, (Shard, Replicate)) or (
                isinstance(placement, Shard) and placement.dim != 0
            ):
                raise ValueError(
                    f"snr-dist supports DTensor parameters placed Shard(0) or Replicate() (as "
                    f"FSDP2 places them); got {p.placements} for a parameter of shape "
                    f"{tuple(p.shape)}"
                )
        if process_group not in ("auto", None):
            raise ValueError(
                "process_group is taken from the DTensor parameters' device mesh; pass "
                "process_group='auto'"
            )
        return ParallelContext(GroupComm(mesh.get_group()), "sharded", mesh=mesh)
    if process_group is None:
        return ParallelContext(Comm(), "single")
    if process_group == "auto":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return ParallelContext(GroupComm(None), "replicated")
        return ParallelContext(Comm(), "single")
    if dist.get_world_size(process_group) == 1:
        return ParallelContext(Comm(), "single")
    return ParallelContext(GroupComm(process_group), "replicated")


def shard_placement(p: Tensor):
    """``(mesh, placements)`` of a DTensor parameter, else None."""
    return (p.device_mesh, p.placements) if is_dtensor(p) else None


def is_row_sharded(p: Tensor) -> bool:
    return is_dtensor(p) and isinstance(p.placements[0], Shard)
