"""Estimators: one module per estimator x mode, behind one interface (`base.Estimator`):
`diagonal_temporal`, `diagonal_cross_sample`, `subspace_temporal`, `subspace_cross_sample`
(README.md in this folder lists the state and the exchange of each).

A parameter's estimator follows from its group's ``estimator`` and ``mode`` and its shape
(1-D parameters are diagonal in subspace mode, `snr_dist.options.param_mode`).
"""

from __future__ import annotations

from torch import Tensor

from snr_dist.estimators.base import Estimator, Moments, Slot, gate_active
from snr_dist.estimators.diagonal_cross_sample import DiagonalCrossSample
from snr_dist.estimators.diagonal_temporal import DiagonalTemporal
from snr_dist.estimators.subspace_cross_sample import SubspaceCrossSample
from snr_dist.estimators.subspace_temporal import SubspaceTemporal
from snr_dist.options import param_mode

REGISTRY: dict[tuple[str, str], type[Estimator]] = {
    ("temporal", "diagonal"): DiagonalTemporal,
    ("cross_sample", "diagonal"): DiagonalCrossSample,
    ("temporal", "subspace"): SubspaceTemporal,
    ("cross_sample", "subspace"): SubspaceCrossSample,
}


def estimator_key(p: Tensor, group: dict) -> tuple[str, str]:
    """``(estimator, mode)`` that serves ``p`` in ``group``."""
    return group["estimator"], param_mode(tuple(p.shape), group["mode"])


def build(moments: Moments) -> dict[tuple[str, str], Estimator]:
    """One instance of each estimator, sharing the optimizer's moment source."""
    return {key: cls(moments) for key, cls in REGISTRY.items()}


__all__ = [
    "REGISTRY",
    "DiagonalCrossSample",
    "DiagonalTemporal",
    "Estimator",
    "Moments",
    "Slot",
    "SubspaceCrossSample",
    "SubspaceTemporal",
    "build",
    "estimator_key",
    "gate_active",
]
