"""Diagonal cross-sample estimator: per-coordinate spread of one step's micro-batch gradients.

The micro-batch sums (`snr_dist.cross_sample.MicrobatchStats`, filled by gradient hooks) give
``raw = g^2`` and the variance of ``g`` around its expectation (``k = 1``); both are smoothed by
EMAs with ``snr_beta``. Under data parallelism the sums of every rank are added (one all-reduce
of ``2 + numel`` floats per parameter per step). Under FSDP2 each rank observes its gradient on
FSDP2's unsharded parameter, so the sums cover the whole parameter; after the all-reduce each
rank keeps the rows it holds (a reduce-scatter would move 1/world of those bytes: not done yet).
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist import cross_sample
from snr_dist.cross_sample import MicrobatchStats
from snr_dist.distributors.dtensor import global_shape, is_row_sharded, row_chunk
from snr_dist.estimators.base import Estimator, Slot, stat_dtype
from snr_dist.grad_mode import no_grad
from snr_dist.layout import Kind


class DiagonalCrossSample(Estimator):
    name = "diagonal_cross_sample"
    pools_ranks = True

    def init_state(self, p, local_p, state, group, key) -> None:
        like = dict(device=local_p.device, dtype=stat_dtype(group))
        state["raw_avg"] = torch.zeros(local_p.shape, **like)
        state["var_avg"] = torch.zeros(local_p.shape, **like)

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        return {"raw_avg": Kind.PARAM, "var_avg": Kind.PARAM}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        return "raw_avg" in state and state["raw_avg"].dtype == stat_dtype(group)

    def partial_sums(self, group: dict, slots: list[Slot]) -> list[Tensor]:
        return [s.micro.to_vector(False) for s in slots]

    @no_grad
    def finish(self, group: dict, slots: list[Slot], sums: list[Tensor], world: int) -> None:
        w = 1.0 - group["snr_beta"]
        for s, vec in zip(slots, sums):
            if is_row_sharded(s.param):  # FSDP2, ZeRO: sums over whole parameters, keep our rows
                rows = row_chunk(vec[2:].reshape(global_shape(s.param)), s.param)
                vec = torch.cat([vec[:2], rows.reshape(-1)])
            stats, c_sq = pooled(s, vec, world, subspace=False)
            if stats.count < 2:  # no spread to measure (`Engine.check_ready`): carry over
                continue
            raw, var = cross_sample.diagonal_moments(stats, s.grad, c_sq)
            s.state["raw_avg"].lerp_(raw, w)
            s.state["var_avg"].lerp_(var, w)

    def moments(self, p, state, group, step, index=None):
        bc = 1.0 - group["snr_beta"] ** step
        raw, var = state["raw_avg"].float(), state["var_avg"].float()
        if index is not None:
            raw, var = raw.reshape(-1)[index], var.reshape(-1)[index]
        return raw / bc, var / bc, 1.0


def pooled(slot: Slot, vec: Tensor, world: int, subspace: bool) -> tuple[MicrobatchStats, float]:
    """The step's sums and ``c^2`` (``sum_i d_i = c * grad``): measured in one process; under
    data parallelism the sums are global and the reduction averaged the ranks' gradients."""
    if world == 1:
        return slot.micro, slot.micro.unit_scale_sq(slot.grad)
    return MicrobatchStats.from_vector(vec, subspace, slot.grad.shape), float(world) ** 2
