"""Greedy longest-job-first assignment of eigen-trackers to data-parallel ranks.

A tracker's per-step cost is dominated by its thin matmuls, ``~ m * n * r``; refreshes scale
the same way. Sorting by cost (largest first) and giving each tracker to the least-loaded
rank is the classic LPT rule: within 4/3 of the optimal makespan, deterministic, and identical
on every rank because it depends only on shapes and order.
"""

from __future__ import annotations

from collections.abc import Sequence


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job; ties broken by job index, then by rank, for determinism."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(world), key=lambda k: (loads[k], k))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[float], owners: Sequence[int], world: int) -> list[float]:
    loads = [0.0] * world
    for c, o in zip(costs, owners):
        loads[o] += c
    return loads


def balance_ratio(costs: Sequence[float], owners: Sequence[int], world: int) -> float:
    """``max / mean`` of the per-rank load (1.0 is perfect balance)."""
    loads = rank_loads(costs, owners, world)
    mean = sum(loads) / world
    return max(loads) / mean if mean > 0 else 1.0
