"""Subspace temporal estimator, ``noise="second_moment"`` (the rule of snr-dist 0.1).

Per step, `snr_dist.subspace.observe` projects the gradient onto the basis ``Q`` and updates the
sketch and the projected moments (partial sums over the rows a rank holds); ``2r + 2`` numbers
per matrix (`snr_dist.subspace.temporal_vector`) give the ``r`` direction gates plus one for the
complement: ``var = (second moment - mean^2) / (1 - k)`` per direction. Refreshes re-fit ``Q``
from the sketch and carry the statistics over (the covariance rotated by the owner).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from snr_dist import subspace
from snr_dist.distributors.base import RefreshJob
from snr_dist.distributors.dtensor import global_shape, is_row_sharded
from snr_dist.estimators.base import Estimator, Slot, gate_values, impl, stat_dtype
from snr_dist.estimators.diagonal_second_moment import update_own_moments
from snr_dist.estimators.tracker import (
    TRACKER_KINDS,
    gate_trackers,
    refresh_job,
    tracker_cost,
    tracker_made,
)
from snr_dist.grad_mode import no_grad
from snr_dist.layout import Kind


class SubspaceSecondMoment(Estimator):
    name = "subspace_second_moment"
    tracks = True
    gate_decay = True  # gate_ takes the weight decay (decay * out + ...)

    def __init__(self, moments) -> None:
        super().__init__(moments)
        self.vectors: dict[Tensor, Tensor] = {}  # this step's summed temporal vectors
        self.current: dict[Tensor, Tensor] = {}  # this step's gates
        self.last: dict[Tensor, dict] = {}

    def init_state(self, p, local_p, state, group, key) -> None:
        subspace.init_tracker(
            state,
            global_shape(p),
            tuple(local_p.shape),
            group,
            local_p.device,
            key,
            stats="second_moment",
            sharded_rows=is_row_sharded(p),
        )
        if self.moments_of.own_mean(group):
            state["snr_avg"] = torch.zeros(
                local_p.shape, dtype=stat_dtype(group), device=local_p.device
            )

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        kinds = {
            **TRACKER_KINDS,
            "proj_avg": Kind.COLUMNS,
            "proj_cov": Kind.PARTIAL,
            "energy": Kind.PARTIAL,
            "snr_avg": Kind.PARAM,
        }
        return {k: v for k, v in kinds.items() if k in state}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        return tracker_made(state, global_shape(p), group, "proj_cov")

    def cost(self, p: Tensor, group: dict) -> float:
        return tracker_cost(p, group)

    @no_grad
    def update(self, group: dict, slots: list[Slot]) -> None:
        update_own_moments(self.moments_of, group, slots)
        beta_v = self.moments_of.beta_v(group)
        beta_s = self.moments_of.beta_s(slots[0].state, group)
        for s in slots:
            subspace.observe(
                s.state, s.grad, beta_v, beta_s, group["sketch_beta"], impl(group, s.grad.device)
            )

    def partial_sums(self, group: dict, slots: list[Slot]) -> list[Tensor]:
        return [
            subspace.temporal_vector(s.state, self.moments_of.mean(s.state, group)[0])
            for s in slots
        ]

    @no_grad
    def finish(self, group: dict, slots: list[Slot], sums: list[Tensor], world: int) -> None:
        """Gates of all trackers of the group with the same rank and step at once (one batch
        of small ops instead of one per matrix)."""
        batches: dict[tuple, list[int]] = defaultdict(list)
        for i, (s, vec) in enumerate(zip(slots, sums)):
            self.vectors[s.param] = vec
            batches[(vec.numel(), s.step)].append(i)
        beta_s = self.moments_of.beta_s(slots[0].state, group)
        beta_v = self.moments_of.beta_v(group)
        for (n, t), idx in batches.items():
            vecs = torch.stack([sums[i] for i in idx])
            raw, var, k = subspace.temporal_direction_moments(vecs, t, beta_s, beta_v)
            gates = gate_values(group, raw, var, k, t, subspace=True)
            r = (n - 2) // 2
            for j, i in enumerate(idx):
                p, vec = slots[i].param, sums[i]
                self.current[p] = gates[j]
                self.last[p] = {
                    "raw": raw[j],
                    "var": var[j],
                    "k": k,
                    "gates": gates[j],
                    "captured": (vec[:r].sum(), vec[2 * r]),
                }

    def moments(self, p, state, group, step, index=None):
        info = self.last[p]
        return info["raw"], info["var"], info["k"]

    def gates(self, p, state, group, step, index=None) -> Tensor:
        return self.current[p]

    def gate_(
        self, group, slots, directions, out=None, alphas=None, foreach=True, decay=1.0
    ) -> None:
        gate_trackers(self.current, group, slots, directions, out, alphas, decay)

    def refresh_jobs(self, group: dict, slots: list[Slot]) -> list[RefreshJob]:
        beta_s = self.moments_of.beta_s(slots[0].state, group) if slots else 0.0
        beta_v = self.moments_of.beta_v(group) if slots else 0.0
        jobs = []
        for s in slots:
            if not subspace.refresh_due(s.step, group["refresh_every"]):
                continue
            mean = self.moments_of.mean(s.state, group)[0]
            temporal = (self.vectors[s.param], s.step, beta_s, beta_v)
            jobs.append(refresh_job(s, mean, temporal))
        return jobs

    def info(self, p, state, group) -> dict | None:
        return self.last.get(p)
