"""Subspace cross-sample estimator: micro-batch spread along each tracked eigen-direction.

Each micro-batch gradient's energy along every basis direction and in total (``r + 1``
numbers per matrix, `snr_dist.cross_sample`) gives per-direction signal and noise; only those
energies are kept, so their all-reduce across data-parallel ranks is ``r + 3`` floats per matrix
per step. Under FSDP2 the micro-batch energies come from each rank's whole gradient (hooks on
the unsharded parameters) while the applied gradient is a shard of rows, so its energies are
partial sums and join the all-reduce (``2r + 4`` floats per matrix). The sketch behind the
basis is updated from the applied gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist import cross_sample, subspace
from snr_dist.distributors.base import RefreshJob
from snr_dist.distributors.dtensor import global_shape, is_row_sharded
from snr_dist.estimators.base import Estimator, Slot, gate_values, impl
from snr_dist.estimators.diagonal_cross_sample import pooled
from snr_dist.estimators.tracker import (
    TRACKER_KINDS,
    gate_trackers,
    refresh_job,
    tracker_cost,
    tracker_made,
)
from snr_dist.grad_mode import no_grad
from snr_dist.layout import Kind


class SubspaceCrossSample(Estimator):
    name = "subspace_cross_sample"
    pools_ranks = True
    tracks = True
    gate_decay = True  # gate_ takes the weight decay (decay * out + ...)

    def __init__(self, moments) -> None:
        super().__init__(moments)
        self.current: dict[Tensor, Tensor] = {}
        self.last: dict[Tensor, dict] = {}

    def init_state(self, p, local_p, state, group, key) -> None:
        subspace.init_tracker(
            state,
            global_shape(p),
            tuple(local_p.shape),
            group,
            local_p.device,
            key,
            stats="cross_sample",
            sharded_rows=is_row_sharded(p),
        )

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        own = ("raw_dir", "noise_dir", "raw_energy", "noise_energy")
        kinds = {**TRACKER_KINDS, **dict.fromkeys(own, Kind.SHARED)}
        return {k: v for k, v in kinds.items() if k in state}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        return tracker_made(state, global_shape(p), group, "raw_dir")

    def cost(self, p: Tensor, group: dict) -> float:
        return tracker_cost(p, group)

    @no_grad
    def update(self, group: dict, slots: list[Slot]) -> None:
        for s in slots:
            device = s.grad.device
            subspace.observe(s.state, s.grad, 0.0, 0.0, group["sketch_beta"], impl(group, device))

    def partial_sums(self, group: dict, slots: list[Slot]) -> list[Tensor]:
        out = []
        for s in slots:
            vec = s.micro.to_vector(True)
            if is_row_sharded(s.param):  # FSDP2: the applied gradient's energies are partial too
                raw_d, raw_e = cross_sample.applied_energies(
                    s.grad, s.state, impl(group, s.grad.device)
                )
                vec = torch.cat([vec, raw_d, raw_e.reshape(1)])
            out.append(vec)
        return out

    @no_grad
    def finish(self, group: dict, slots: list[Slot], sums: list[Tensor], world: int) -> None:
        beta = group["snr_beta"]
        for s, vec in zip(slots, sums):
            st = s.state
            energies = None
            if is_row_sharded(s.param):  # [micro-batch sums, applied energies (r + 1)]
                r = st["basis"].shape[1]
                vec, energies = vec[: -(r + 1)], (vec[-(r + 1) : -1], vec[-1])
            stats, c_sq = pooled(s, vec, world, subspace=True)
            if stats.count >= 2:  # else no spread to measure (`Engine.check_ready`): carry over
                raw_d, var_d, raw_e, var_e = cross_sample.subspace_moments(
                    stats, s.grad, c_sq, st, impl(group, s.grad.device), energies
                )
                st["raw_dir"].lerp_(raw_d, 1.0 - beta)
                st["noise_dir"].lerp_(var_d, 1.0 - beta)
                st["raw_energy"].lerp_(raw_e, 1.0 - beta)
                st["noise_energy"].lerp_(var_e, 1.0 - beta)
            raw, var = subspace.cross_direction_moments(st, s.step, beta)
            gates = gate_values(group, raw, var, 1.0, s.step, subspace=True)
            self.current[s.param] = gates
            self.last[s.param] = {
                "raw": raw,
                "var": var,
                "k": 1.0,
                "gates": gates,
                "captured": (st["raw_dir"].sum(), st["raw_energy"]),
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
        return [
            refresh_job(s, None, None)
            for s in slots
            if subspace.refresh_due(s.step, group["refresh_every"])
        ]

    def info(self, p, state, group) -> dict | None:
        return self.last.get(p)
