"""Replicated data parallelism (DDP, DeepSpeed ZeRO 0, Megatron's data-parallel group).

Every rank holds whole parameters and, after the data-parallel reduction, the same gradient.
So every rank keeps the complete SNR statistics of every parameter, and the optimizer state
is complete on each rank (``rank 0: torch.save(opt.state_dict())`` works, as with any torch
optimizer under DDP). What the group adds:

- cross-sample statistics, sums over each rank's own micro-batch gradients (captured before
  the reduction), are all-reduced once per step;
- each eigen-tracker has an owner that solves its refreshes and broadcasts the new basis, so
  the refresh work is split across ranks and the bases stay bit-identical on all of them;
- the first step checks that every rank runs the same configuration.
"""

from __future__ import annotations

import torch.distributed as dist

from snr_dist.distributors.base import Distributor
from snr_dist.distributors.comm import GroupComm


class ReplicatedDistributor(Distributor):
    name = "replicated"

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(GroupComm(group))
