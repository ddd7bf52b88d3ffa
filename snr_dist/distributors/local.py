"""One process, or a rank-local optimizer under a bigger job: no communication at all.

This is also what each rank of a DDP job runs when the optimizer is not told its
data-parallel group: after DDP's all-reduce every rank holds the same gradient, so every rank
computes the same statistics and the same update. Only the cross-sample estimator, which
pools the ranks' own gradients, needs `ReplicatedDistributor`.
"""

from __future__ import annotations

from snr_dist.distributors.base import Distributor
from snr_dist.distributors.comm import Comm


class LocalDistributor(Distributor):
    name = "local"

    def __init__(self) -> None:
        super().__init__(Comm())
