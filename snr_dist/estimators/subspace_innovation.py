"""Subspace temporal estimator, ``noise="innovation"`` (the default): the drift-correct rule on
a tracked eigenbasis of each matrix.

Per direction ``k`` of the basis ``Q``: signal ``||row_k(Q^T m_hat)||^2`` from the projected
mean (``proj_avg``, the same EMA as Adam's mean, exact between refreshes), noise the
innovation energy ``||row_k(Q^T (G - m_hat_{t-1}))||^2`` averaged over the mean's window; the
complement of the span is one more direction (totals minus the tracked parts). ``2r + 2``
numbers per matrix (`snr_dist.subspace.innovation_vector`), partial sums over the rows a rank
holds. A refresh re-projects the mean exactly and rotates the innovation energies as a
diagonal second moment (linear, so partial sums stay right); nothing needs the owner's
covariance, so a refresh broadcasts only the basis and its eigenvalues.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from snr_dist import subspace
from snr_dist.distributors.base import RefreshJob
from snr_dist.distributors.dtensor import global_shape, is_row_sharded
from snr_dist.estimators.base import Estimator, Slot, gate_values, impl, stat_dtype
from snr_dist.estimators.tracker import (
    TRACKER_KINDS,
    gate_trackers,
    refresh_job,
    tracker_cost,
    tracker_made,
)
from snr_dist.grad_mode import no_grad
from snr_dist.layout import Kind


class SubspaceInnovation(Estimator):
    name = "subspace_innovation"
    tracks = True
    gate_decay = True  # gate_ takes the weight decay (decay * out + ...)

    def __init__(self, moments) -> None:
        super().__init__(moments)
        self.current: dict[Tensor, Tensor] = {}  # this step's gates
        self.last: dict[Tensor, tuple] = {}  # param -> (its finish batch, its row there)
        self.next_mean_sq: dict[Tensor, tuple[int, Tensor]] = {}  # from update to partial_sums

    def init_state(self, p, local_p, state, group, key) -> None:
        subspace.init_tracker(
            state,
            global_shape(p),
            tuple(local_p.shape),
            group,
            local_p.device,
            key,
            stats="innovation",
            sharded_rows=is_row_sharded(p),
        )
        if not self.moments_of.adam:
            like = dict(dtype=stat_dtype(group), device=local_p.device)
            state["snr_avg"] = torch.zeros(local_p.shape, **like)

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        kinds = {
            **TRACKER_KINDS,
            "proj_avg": Kind.COLUMNS,
            "noise_dir": Kind.PARTIAL,
            "noise_energy": Kind.PARTIAL,
            "snr_avg": Kind.PARAM,
        }
        return {k: v for k, v in kinds.items() if k in state}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        return tracker_made(state, global_shape(p), group, "proj_avg") and "proj_cov" not in state

    def cost(self, p: Tensor, group: dict) -> float:
        return tracker_cost(p, group)

    @no_grad
    def update(self, group: dict, slots: list[Slot]) -> None:
        batches: dict[tuple, list[Slot]] = defaultdict(list)
        for s in slots:
            batches[(s.step, s.grad.device)].append(s)
        for (t, device), batch in batches.items():
            beta = self.moments_of.beta_s(batch[0].state, group)
            mean_sq = subspace.observe_innovation_many(
                [s.state for s in batch],
                [s.grad for s in batch],
                [self.moments_of.mean(s.state, group)[0] for s in batch],
                t,
                beta,
                beta,
                group["sketch_beta"],
                impl(group, device),
            )
            # the squared norm of each mean once it has taken this gradient (the optimizer's
            # lerp for Adam's mean, the lerp below for an own one), for `partial_sums`
            for s, v in zip(batch, mean_sq.unbind(0)):
                self.next_mean_sq[s.param] = (t, v)
            own = [s for s in batch if "snr_avg" in s.state]
            if own:  # SNRPreconditioner's own mean, after its innovation
                torch._foreach_lerp_(
                    [s.state["snr_avg"] for s in own], [s.grad for s in own], 1.0 - beta
                )

    def partial_sums(self, group: dict, slots: list[Slot]) -> list[Tensor]:
        out = []
        for s in slots:
            mean_sq = self.next_mean_sq.pop(s.param, None)
            if mean_sq is not None and mean_sq[0] != s.step:
                mean_sq = None
            mean = self.moments_of.mean(s.state, group)[0]
            out.append(subspace.innovation_vector(s.state, mean, mean_sq and mean_sq[1]))
        return out

    @no_grad
    def finish(self, group: dict, slots: list[Slot], sums: list[Tensor], world: int) -> None:
        """Gates of all trackers of the group with the same rank and step at once."""
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, (s, vec) in enumerate(zip(slots, sums)):
            batches[(vec.numel(), s.step)].append(i)
        beta = self.moments_of.beta_s(slots[0].state, group)
        for (n, t), idx in batches.items():
            vecs = torch.stack([sums[i] for i in idx])
            r = (n - 2) // 2
            if t >= 2:
                raw, var, k = subspace.innovation_direction_moments(vecs, t, beta, beta)
            else:  # one gradient carries no noise estimate (the gate is 1 at step 1)
                raw = var = torch.zeros(len(idx), r + 1, device=vecs.device)
                k = 1.0
            gates = gate_values(group, raw, var, k, t, subspace=True)
            # per-parameter metrics (moments, captured energy) are read from the batch's
            # tensors only when asked: ~10 small ops per batch less on every step
            batch = (raw, var, k, gates, r)
            for j, (i, gates_j) in enumerate(zip(idx, gates.unbind(0))):
                p = slots[i].param
                self.current[p] = gates_j
                self.last[p] = (batch, j)

    def moments(self, p, state, group, step, index=None):
        info = self.info(p, state, group)
        return info["raw"], info["var"], info["k"]

    def gates(self, p, state, group, step, index=None) -> Tensor:
        return self.current[p]

    def gate_(
        self, group, slots, directions, out=None, alphas=None, foreach=True, decay=1.0
    ) -> None:
        gate_trackers(self.current, group, slots, directions, out, alphas, decay)

    def refresh_jobs(self, group: dict, slots: list[Slot]) -> list[RefreshJob]:
        return [
            refresh_job(s, self.moments_of.mean(s.state, group)[0], None)
            for s in slots
            if subspace.refresh_due(s.step, group["refresh_every"])
        ]

    def info(self, p, state, group) -> dict | None:
        entry = self.last.get(p)
        if entry is None:
            return None
        (raw, var, k, gates, r), j = entry
        energy = raw[j] + var[j]  # E||G||^2 = ||mu||^2 + tr(Sigma), by direction
        return {
            "raw": raw[j],
            "var": var[j],
            "k": k,
            "gates": gates[j],
            "captured": (energy[:r].sum(), energy.sum()),
        }
