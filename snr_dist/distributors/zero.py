"""DeepSpeed ZeRO 1-3: each rank keeps whole rows of every parameter, cut from its partition.

ZeRO hands the optimizer flat partitions that cut across tensors, and at most one row of a
parameter at each cut. `snr_dist.optim.zero_view` gives each rank the rows whose first element
its partition holds (a row cut by a partition boundary is completed by a small exchange), so
the estimators see row shards, as under FSDP2: statistics are partial sums over rows, one
bucketed all-reduce completes them every step, refresh partials go to each tracker's owner.

The checkpoint view is this rank's own state (what DeepSpeed's ``save_checkpoint`` stores per
rank): a ZeRO checkpoint resumes on the same number of ranks, as DeepSpeed's own optimizer
states do without its universal-checkpoint conversion.
"""

from __future__ import annotations

import torch.distributed as dist

from snr_dist.distributors.base import Distributor
from snr_dist.distributors.comm import GroupComm


class ZeroDistributor(Distributor):
    name = "zero"
    partial_statistics = True

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__(GroupComm(group))
