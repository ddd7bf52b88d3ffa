"""Estimators: one module per estimator x mode, behind one interface (`base.Estimator`):
`diagonal_innovation` and `subspace_innovation` (the temporal default), their 0.1
predecessors `diagonal_second_moment` and `subspace_second_moment`, and
`diagonal_cross_sample`, `subspace_cross_sample` (README.md in this folder lists the state and
the exchange of each).

A parameter's estimator follows from its group's ``estimator``, ``noise`` (temporal only) and
``mode`` and its shape (1-D parameters are diagonal in subspace mode,
`snr_dist.options.param_mode`).
"""

from __future__ import annotations

from torch import Tensor

from snr_dist.distributors.dtensor import global_shape
from snr_dist.estimators.base import (
    Estimator,
    Moments,
    Slot,
    complement_closed,
    gate_active,
    stat_dtype,
)
from snr_dist.estimators.diagonal_cross_sample import DiagonalCrossSample
from snr_dist.estimators.diagonal_innovation import DiagonalInnovation
from snr_dist.estimators.diagonal_second_moment import DiagonalSecondMoment
from snr_dist.estimators.subspace_cross_sample import SubspaceCrossSample
from snr_dist.estimators.subspace_innovation import SubspaceInnovation
from snr_dist.estimators.subspace_second_moment import SubspaceSecondMoment
from snr_dist.options import param_mode

REGISTRY: dict[tuple[str, str], type[Estimator]] = {
    ("innovation", "diagonal"): DiagonalInnovation,
    ("innovation", "subspace"): SubspaceInnovation,
    ("second_moment", "diagonal"): DiagonalSecondMoment,
    ("second_moment", "subspace"): SubspaceSecondMoment,
    ("cross_sample", "diagonal"): DiagonalCrossSample,
    ("cross_sample", "subspace"): SubspaceCrossSample,
}
"""``(statistics, mode) -> estimator``: statistics is the temporal ``noise`` model, or
``"cross_sample"``."""


def estimator_key(p: Tensor, group: dict) -> tuple[str, str]:
    """``(statistics, mode)`` that serves ``p`` in ``group``."""
    stats = group["estimator"] if group["estimator"] == "cross_sample" else group["noise"]
    return stats, param_mode(global_shape(p), group["mode"])


def build(moments: Moments) -> dict[tuple[str, str], Estimator]:
    """One instance of each estimator, sharing the optimizer's moment source."""
    return {key: cls(moments) for key, cls in REGISTRY.items()}


__all__ = [
    "REGISTRY",
    "DiagonalCrossSample",
    "DiagonalInnovation",
    "DiagonalSecondMoment",
    "Estimator",
    "Moments",
    "Slot",
    "SubspaceCrossSample",
    "SubspaceInnovation",
    "SubspaceSecondMoment",
    "build",
    "estimator_key",
    "complement_closed",
    "gate_active",
    "stat_dtype",
]
