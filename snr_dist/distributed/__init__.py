"""Data-parallel support: who owns which eigen-tracker, and the few collectives snr-dist adds.

- `assignment`: greedy longest-job-first assignment of trackers to ranks.
- `comm`: bucketed all-reduce / reduce / broadcast over a process group (and a no-op
  single-process version with the same interface), counting the bytes it moves.
- `context`: detects the parallelism of an optimizer's parameters (single process, replicated
  data parallel such as DDP, or FSDP2 DTensor shards) and answers "what do I own".
"""

from snr_dist.distributed.assignment import assign_owners, balance_ratio
from snr_dist.distributed.comm import Comm, GroupComm
from snr_dist.distributed.context import ParallelContext, detect_context

__all__ = [
    "Comm",
    "GroupComm",
    "ParallelContext",
    "assign_owners",
    "balance_ratio",
    "detect_context",
]
