"""Validated SNR hyper-parameters, shared by every optimizer and integration.

They live in the optimizer's param groups (so they can differ per group and are saved in the
state_dict); `validate_options` checks one group's values and names the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from snr_dist.snr import GATE_RULES

ESTIMATORS = ("temporal", "cross_sample")
MODES = ("diagonal", "subspace")
BASIS_SIDES = ("auto", "rows", "cols")
KERNEL_CHOICES = ("auto", "torch", "triton")
"""Implementations of the hot loops: ``auto`` (Triton on CUDA when it imports, else torch, unless
``SNR_DIST_KERNELS`` says otherwise), or one forced."""

# ``snr_beta2`` is used only where the base optimizer has no second moment of its own
# (SNRPreconditioner); SNRAdamW uses ``betas[1]``.
SNR_DEFAULTS: dict[str, Any] = {
    "estimator": "temporal",
    "mode": "diagonal",
    "gate": "wiener",
    "tau": 1.0,
    "gate_a": 1.0,
    "snr_beta": 0.99,
    "snr_beta2": 0.999,
    "warmup_steps": 0,
    "rank": 32,
    "refresh_every": 50,
    "sketch_beta": 0.9,
    "basis_side": "auto",
    "seed": 0,
}
"""The SNR options and their defaults."""


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}; allowed values: {', '.join(allowed)}")


def _real(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok_type and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"Invalid {name}: {value!r}; allowed range: {lb}{lo}, {hi}{rb}")


def _int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: an integer >= {lo}")


def validate_options(opts: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key, the value and what is allowed."""
    unknown = set(opts) - set(SNR_DEFAULTS)
    if unknown:
        raise ValueError(
            f"Unknown SNR option(s): {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(SNR_DEFAULTS)}"
        )
    o = {**SNR_DEFAULTS, **opts}
    _choice("estimator", o["estimator"], ESTIMATORS)
    _choice("mode", o["mode"], MODES)
    _choice("gate", o["gate"], GATE_RULES)
    _choice("basis_side", o["basis_side"], BASIS_SIDES)
    _real("tau", o["tau"], 0.0, math.inf, True, True)
    _real("gate_a", o["gate_a"], 0.0, math.inf, False, True)
    _real("snr_beta", o["snr_beta"], 0.0, 1.0, False, True)
    _real("snr_beta2", o["snr_beta2"], 0.0, 1.0, False, True)
    _real("sketch_beta", o["sketch_beta"], 0.0, 1.0, False, True)
    _int("warmup_steps", o["warmup_steps"], 0)
    _int("rank", o["rank"], 1)
    _int("refresh_every", o["refresh_every"], 1)
    _int("seed", o["seed"], 0)
    if o["estimator"] == "temporal" and o["snr_beta"] == 0:
        # k_t = 1 at every step: one gradient carries no variance estimate.
        raise ValueError("Invalid snr_beta: 0; allowed range with estimator='temporal': (0.0, 1.0)")


def validate_kernels(value: Any, name: str = "kernels") -> None:
    """The ``kernels`` choice of an optimizer (or the ``SNR_DIST_KERNELS`` variable)."""
    _choice(name, value, KERNEL_CHOICES)


def validate_adam(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Adam's own hyper-parameters, with the same style of message."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        # A tensor lr is accepted by torch; we keep it simple and explicit.
        raise ValueError(f"Invalid lr: {lr!r}; allowed: a float >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; allowed: a pair (beta1, beta2)")
    _real("betas[0]", betas[0], 0.0, 1.0, False, True)
    _real("betas[1]", betas[1], 0.0, 1.0, False, True)
    _real("eps", eps, 0.0, math.inf, False, True)
    _real("weight_decay", weight_decay, 0.0, math.inf, False, True)


def param_mode(shape: tuple[int, ...], mode: str) -> str:
    """Subspace mode applies to matrices (and conv kernels viewed as matrices); 1-D params such
    as biases and norm scales have no matrix structure and use the diagonal estimator."""
    if mode == "subspace" and len(shape) >= 2 and min(shape[0], math.prod(shape[1:])) >= 2:
        return "subspace"
    return "diagonal"
