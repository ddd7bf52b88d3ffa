"""What every eigen-tracker shares, whatever its estimator: the layout of its state, its cost,
and its refresh as a `RefreshJob` the distributor sequences across ranks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snr_dist import subspace
from snr_dist.distributors.base import RefreshJob
from snr_dist.distributors.dtensor import global_shape, is_row_sharded
from snr_dist.estimators.base import Slot, impl
from snr_dist.grad_mode import no_grad
from snr_dist.layout import Kind

TRACKER_KINDS = {
    "basis_rows": Kind.SHARED,
    "basis": Kind.SHARED,
    "sketch": Kind.PARTIAL,
    "sketch_weight": Kind.SHARED,
    "eigvals": Kind.SHARED,
}


def basis_rows(p: Tensor, group: dict) -> bool:
    return subspace.basis_on_rows(global_shape(p), group["basis_side"], is_row_sharded(p))


def tracker_cost(p: Tensor, group: dict) -> float:
    rows = basis_rows(p, group)
    shape = global_shape(p)  # the same on every rank, whatever rows it holds
    return float(math.prod(shape) * subspace.effective_rank(shape, rows, group["rank"]))


def tracker_made(state: dict, p_shape: tuple, group: dict, marker: str) -> bool:
    """A tracker of the group's rank whose estimator keeps ``marker`` (a key only it has)."""
    if "basis" not in state or marker not in state:
        return False
    rows = bool(state["basis_rows"])
    return state["basis"].shape[1] == subspace.effective_rank(p_shape, rows, group["rank"])


def refresh_job(slot: Slot, mean: Tensor | None, temporal: tuple | None) -> RefreshJob:
    """A tracker's refresh as callbacks: partial sketches, the owner's Nystrom solve, and what
    every rank does with the solution."""
    state, t = slot.state, slot.step
    q = state["basis"]
    r = q.shape[1]
    with_cov = temporal is not None
    _, _, beta_s, beta_v = temporal if with_cov else (None, t, 0.0, 0.0)

    def solve(partials: list[Tensor]) -> list[Tensor]:
        q_new, evals, cov = subspace.refresh_solve(
            q, partials, float(state["sketch_weight"]), temporal
        )
        # contiguous, as the ranks that receive the solution hold it: the same memory layout
        # makes every rank's later matmuls with it round identically
        return [t.contiguous() for t in [q_new, evals] + ([cov] if with_cov else [])]

    def placeholders() -> list[Tensor]:
        out = [torch.zeros(q.shape, device=q.device), torch.zeros(r, device=q.device)]
        return out + ([torch.zeros(r, r, device=q.device)] if with_cov else [])

    def apply(solution: list[Tensor], carries_total: bool) -> None:
        q_new, evals = solution[0].clone(), solution[1].clone()
        cov = solution[2] if with_cov else None
        subspace.refresh_apply(state, q_new, evals, cov, mean, carries_total, t, beta_s, beta_v)

    return RefreshJob(slot.param, subspace.refresh_partials(state), solve, placeholders, apply)


@no_grad
def gate_trackers(
    current: dict[Tensor, Tensor],
    group: dict,
    slots: list[Slot],
    directions: list[Tensor],
    out: list[Tensor] | None,
    alphas: list[float] | None,
    decay: float = 1.0,
) -> None:
    """`subspace.apply_gates` on each slot with this step's gates (``current``): the
    estimators' ``gate_``. With ``out``, ``out <- decay * out + alpha * gated direction``."""
    kernels: dict = {}
    for i, (s, d) in enumerate(zip(slots, directions)):
        k = kernels.get(d.device)
        if k is None:
            k = kernels[d.device] = impl(group, d.device)
        if out is None:
            subspace.apply_gates(s.state, d, current[s.param], None, 1.0, k)
        else:
            subspace.apply_gates(s.state, d, current[s.param], out[i], alphas[i], k, decay)
