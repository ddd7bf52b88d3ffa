"""The distributor interface: what this rank owns and how partial statistics become global.

An optimizer's SNR statistics are sums: over micro-batches, over the rows of a matrix, over
data-parallel ranks. A distributor knows which of those sums a rank holds only part of and
completes them with as few collectives as possible:

- **the step's exchange**: `sum_` all-reduces every partial statistic of the step in one
  bucketed call (the engine decides which vectors are partial: ``partial_statistics`` says
  whether ranks hold parts of each parameter);
- **refresh broadcasts**: `refresh` runs a list of `RefreshJob`: partial sketches are summed to
  each tracker's owner, the owner solves, the solution is broadcast, every rank applies it;
- **ownership**: `assign` gives every eigen-tracker one owner (longest job first), the rank
  that solves its refreshes;
- **the checkpoint view**: `global_state` / `install_state` translate between this rank's
  runtime state and values that do not depend on the world size, from the `Kind` each
  estimator declares for each state tensor.

No method runs a collective unless every rank of the group calls it at the same point of a
step (or of a checkpoint); constructors never do.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from snr_dist.distributors.assignment import assign_owners
from snr_dist.distributors.comm import Comm
from snr_dist.layout import Kind


@dataclass
class RefreshJob:
    """One tracker's refresh, as callbacks the distributor sequences across ranks."""

    param: Tensor
    partials: list[Tensor]
    """What the refresh sums over the ranks that hold rows (copies: reductions clobber)."""
    solve: Callable[[list[Tensor]], list[Tensor]]
    """The owner's solve, from the summed partials; returns the solution tensors."""
    placeholders: Callable[[], list[Tensor]]
    """Zero tensors shaped like the solution, for the ranks that receive it."""
    apply: Callable[[list[Tensor], bool], None]
    """Every rank: ``apply(solution, carries_total)``."""


class Distributor(ABC):
    """One parallelism. Subclasses set ``name`` and ``partial_statistics``."""

    name: ClassVar[str]
    partial_statistics: ClassVar[bool] = False
    """Ranks hold parts (rows) of each parameter, so tracker statistics are partial sums."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm
        self.owners: dict[Tensor, int] = {}
        self.costs: dict[Tensor, float] = {}
        self._checked = False

    # ------------------------------------------------------------------ ownership
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world(self) -> int:
        return self.comm.world

    def assign(self, trackers: list[tuple[Tensor, float]]) -> None:
        """Owners for ``(param, cost)`` trackers: longest job first, least-loaded rank."""
        owners = assign_owners([c for _, c in trackers], self.world)
        self.owners = {p: o for (p, _), o in zip(trackers, owners)}
        self.costs = dict(trackers)

    def owner(self, p: Tensor) -> int:
        return self.owners.get(p, 0)

    def owns(self, p: Tensor) -> bool:
        return self.owner(p) == self.rank

    def carries_total(self, p: Tensor) -> bool:
        """Whether this rank holds the parts of ``p``'s statistics that are not sums over rows
        (with partial statistics, only the owner does, so that the sums stay right)."""
        return not self.partial_statistics or self.owns(p)

    # ------------------------------------------------------------------ collectives
    def sum_(self, tensors: list[Tensor]) -> None:
        """Sum over the ranks, in place, in as few bucketed calls as possible."""
        if self.world > 1 and tensors:
            self.comm.all_reduce_(tensors)

    def agree_on_skips(self, finite: list[bool], device) -> list[bool]:
        """Which parameters every rank may update (a rank's non-finite shard skips the
        parameter everywhere where ranks hold parts of it)."""
        if not (self.partial_statistics and self.world > 1):
            return finite
        bad = self.agree_on_skips_device(
            torch.tensor([0.0 if f else 1.0 for f in finite], device=device)
        )
        return [f == 0 for f in bad.tolist()]

    def agree_on_skips_device(self, bad: Tensor) -> Tensor:
        """`agree_on_skips` without reading anything on the host: ``bad`` (a float per
        parameter, > 0 where this rank's part is non-finite) summed over the ranks that hold
        parts of the parameters (no-op where every rank holds whole parameters)."""
        if self.partial_statistics and self.world > 1:
            self.comm.all_reduce_([bad])
        return bad

    def check_consistent(self, signature: Any, describe: Callable[[Any, Any], str]) -> None:
        """Once, at the first step: every rank must run the same configuration."""
        if self._checked or self.world == 1:
            self._checked = True
            return
        everyone = self.comm.all_gather_object(signature)
        self._checked = True
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                raise ValueError(
                    "snr-dist: the SNR configuration differs across data-parallel ranks "
                    f"(rank 0 vs rank {rank}: {describe(everyone[0], theirs)}); every rank must "
                    "build the optimizer with the same options and parameters"
                )

    def refresh(self, jobs: list[RefreshJob]) -> None:
        """Sum partials to owners, owners solve, broadcast, every rank applies."""
        if not jobs:
            return
        if self.partial_statistics and self.world > 1:
            for owner in range(self.world):
                mine = [t for j in jobs if self.owner(j.param) == owner for t in j.partials]
                self.comm.reduce_(mine, owner)
        solutions = [
            job.solve(job.partials) if self.owns(job.param) else job.placeholders() for job in jobs
        ]
        if self.world > 1:
            for owner in range(self.world):
                mine = [
                    t
                    for job, sol in zip(jobs, solutions)
                    if self.owner(job.param) == owner
                    for t in sol
                ]
                self.comm.broadcast_(mine, owner)
        for job, sol in zip(jobs, solutions):
            job.apply(sol, self.carries_total(job.param))

    # ------------------------------------------------------------------ checkpoint view
    def state_needs_collective(self, kinds: dict[str, Kind]) -> bool:
        """Whether `global_state` of a parameter with these state kinds is a collective."""
        return False

    def global_state(self, items: list[tuple[Tensor, dict, dict[str, Kind]]]) -> list[dict]:
        """World-size-independent values of each ``(param, state, kinds)``; a collective when
        `state_needs_collective` says so (every rank must then call it)."""
        return [dict(state) for _, state, _ in items]

    def install_state(self, p: Tensor, values: dict, kinds: dict[str, Kind]) -> dict:
        """This rank's runtime state from world-size-independent ``values``."""
        return {k: _plain(v) for k, v in values.items()}

    def template(self, p: Tensor, kind: Kind, size, dtype) -> Tensor:
        """An empty tensor to read the global value of one state tensor into (DCP)."""
        return torch.zeros(tuple(size), dtype=dtype)


def _plain(v):
    full = getattr(v, "full_tensor", None)  # a DTensor from a sharded run
    return full() if full is not None else v
