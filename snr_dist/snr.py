r"""The SNR rule in one place: moments -> signal and noise -> gate -> gated update.

Notation. For one coordinate (diagonal mode) or one eigen-direction (subspace mode) let ``g_t``
be the gradient applied at step ``t``, ``mu = E[g]`` the coherent (population) part and
``sigma^2 = Var[g]`` the noise of *one step's* gradient. Memorising a single example (a flipped
label, say) produces gradient that is large but incoherent across minibatches: ``mu^2 << sigma^2``.
Learning a pattern shared by many examples produces ``mu^2 >> sigma^2``. The preconditioner
multiplies the base optimizer's update by a gate ``gamma in [0, 1]`` that is a function of
``SNR = mu^2 / sigma^2``: signal moves at full speed, noise is left to diffuse slowly.

Every estimator reduces to two statistics per coordinate/direction plus one known constant:

- ``raw``: an estimate of ``mu^2`` that is biased *upwards* by ``k * sigma^2``;
- ``var``: an unbiased estimate of ``sigma^2``;
- ``k``: that bias factor, known in closed form.

The bias matters: a noise-only coordinate has ``E[raw] = k sigma^2 > 0``, and a gate fed with the
biased ``raw / var`` never closes. So every gate sees the *debiased* signal
``sig = relu(raw - k var)``.

Temporal estimator, ``noise="innovation"`` (the default; one extra state vector in SNRAdamW).
The signal is Adam's own mean ``m_hat = EMA_{b1}(g)`` (bias-corrected): ``E[m_hat^2] = mu^2 +
k_t sigma^2`` with ``k_t = sum_i w_i^2 = (1-b)(1+b^t) / ((1+b)(1-b^t))`` for EMA weights ``w_i``
that sum to one. The noise is the *innovation* of each new gradient around the previous mean,
``r_t = g_t - m_hat_{t-1}``: the previous mean does not contain ``g_t``'s noise, so
``E[r_t^2] = sigma^2 (1 + k_{t-1})`` plus the mean's lag behind a drifting ``mu``. Averaged by
``x = EMA_rho(r^2)`` with ``rho = b1`` (the mean's own window, so that first-order drift biases
of signal and noise cancel): ``var = x_hat / (1 + kappa_t)`` with ``kappa_t`` the same EMA of
``k_{t-1}``. Smooth drift only enters through the lag, ``~ (b1 / (1 - b1) dmu/dt)^2``: a gradient
that shrinks as the loss falls keeps its gate near 1.

Temporal estimator, ``noise="second_moment"`` (the 0.1 rule, kept by name so earlier results
reproduce). With ``s = EMA_{beta_s}(g)`` and the Adam second moment ``v = EMA_{beta_v}(g^2)``,
both bias-corrected: ``E[v - s^2] = (1 - k_t) sigma^2``, hence ``raw = s^2``,
``var = (v - s^2) / (1 - k_t)``. Right for stationary gradients only: ``v`` remembers ~1000
steps of ``mu^2``, so a gradient that shrinks over that window reads as noise and its gate
closes (a noiseless gradient decaying as ``exp(-t/100)`` gets a gate of 0.05 at step 400).

``k_1 = 1``: one gradient carries no variance estimate, so the gate is 1 at a parameter's first
step.

Cross-sample estimator (McCandlish et al. 2018, needs >= 2 gradients per step: micro-batches of
gradient accumulation or data-parallel ranks). With micro-batch gradients ``G_i`` of ``w_i``
samples and their weighted mean ``G`` over ``W = sum w_i`` samples,
``sigma_e^2 = sum_i w_i (G_i - G)^2 / (M - 1)`` is unbiased for the per-sample variance, so the
noise of the applied gradient is ``var = sigma_e^2 / W`` and ``raw = G^2`` has ``k = 1``. Both are
smoothed by EMAs with the same ``beta`` (so bias corrections cancel in their ratio).

Gate rules on ``sig`` and ``var`` (``var`` floored at a tiny ``GATE_FLOOR``, ``tau > 0``):

- ``wiener``: ``sig / (sig + tau var)``, the optimal linear shrinkage ``SNR / (SNR + tau)``;
- ``clamp``: ``min(1, sig / (tau var))``;
- ``hard``: ``sig > tau var``;
- ``paper``: Litman & Guo's Algorithm 1, ``p / (p + tau var)`` with ``p = relu(raw - a var)``,
  ``a = 1`` online or ``b / (n - b)`` for a finite dataset of n examples and batch b;
- ``none``: 1 (the base optimizer unchanged, for ablations and parity tests).

In subspace mode the same formulas run on the energies of the gradient projected onto a tracked
eigenbasis ``Q`` plus one "reservoir" direction for the orthogonal complement; see
`snr_dist.subspace`.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

GATE_RULES = ("wiener", "clamp", "hard", "paper", "none")

GATE_FLOOR = 1e-16
"""Floor of the noise variance, in squared-gradient units (Adam's eps squared): coordinates
whose gradients are this small barely move under Adam anyway."""


def ema_noise_factor(beta: float, step: int) -> float:
    """``k_t = sum_i w_i^2`` for the bias-corrected EMA after ``step`` updates.

    It is the fraction of one gradient's variance that survives in the EMA mean:
    1 at step 1, ``(1-beta)/(1+beta)`` in the long run.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if beta == 0.0:
        return 1.0
    bt = beta**step
    return (1.0 - beta) * (1.0 + bt) / ((1.0 + beta) * (1.0 - bt))


def finite_dataset_a(dataset_size: int, batch_size: int) -> float:
    """The paper gate's ``a = b / (n - b)`` for sampling batches of ``b`` from ``n`` examples."""
    if not 0 < batch_size < dataset_size:
        raise ValueError(
            f"need 0 < batch_size < dataset_size, got batch_size={batch_size}, "
            f"dataset_size={dataset_size}"
        )
    return batch_size / (dataset_size - batch_size)


@functools.cache
def _innovation_k_table(beta: float, rho: float) -> list[float]:
    return [0.0, 0.0]  # kappa at steps 0 and 1 (no innovation before step 2)


def innovation_kappa(beta: float, rho: float, step: int) -> float:
    """``kappa_t / (1 - rho^(t-1))``: the bias-corrected ``EMA_rho`` of ``k_{i-1}`` over the
    innovations ``i = 2..t`` (``k`` with the mean's ``beta``); the noise inflation of ``x``."""
    table = _innovation_k_table(beta, rho)
    while len(table) <= step:
        n = len(table)  # the innovation of step n uses the mean after n - 1 gradients
        table.append(rho * table[-1] + (1.0 - rho) * ema_noise_factor(beta, n - 1))
    if step < 2:
        return 0.0
    return table[step] / (1.0 - rho ** (step - 1))


def innovation_(x: Tensor, grad: Tensor, mean: Tensor, step: int, beta: float, rho: float) -> None:
    """Fold this step's innovation ``g - m_hat_{t-1}`` into ``x = EMA_rho(r^2)``, in place;
    ``mean`` is the raw EMA *before* it takes ``grad`` (nothing to do at step 1)."""
    if step < 2:
        return
    r = grad - mean / (1.0 - beta ** (step - 1))
    x.mul_(rho).addcmul_(r, r, value=1.0 - rho)


def innovation_moments(
    mean: Tensor, x: Tensor, step: int, beta: float, rho: float
) -> tuple[Tensor, Tensor, float]:
    """``(raw, var, k)`` from Adam's raw mean (after this step's gradient) and the innovation
    EMA ``x`` (see the module docstring)."""
    k = ema_noise_factor(beta, step)
    raw = (mean / (1.0 - beta**step)).square()
    if step < 2:  # no innovation yet: no noise estimate (the gate is 1 at the first step)
        return raw, torch.zeros_like(x), k
    scale = 1.0 / ((1.0 - rho ** (step - 1)) * (1.0 + innovation_kappa(beta, rho, step)))
    return raw, x * scale, k


def temporal_moments(
    s: Tensor, v: Tensor, step: int, beta_s: float, beta_v: float
) -> tuple[Tensor, Tensor, float]:
    """``(raw, var, k)`` from the raw (not bias-corrected) EMAs ``s = EMA(g)``, ``v = EMA(g^2)``."""
    k = ema_noise_factor(beta_s, step)
    raw = (s / (1.0 - beta_s**step)).square_()
    var = v / (1.0 - beta_v**step)
    var.sub_(raw).div_(max(1.0 - k, 1e-12)).clamp_(min=0.0)
    return raw, var, k


def cross_sample_moments(
    total: Tensor, sum_sq_over_w: Tensor, weight: float, count: int
) -> tuple[Tensor, Tensor]:
    """``(raw, var)`` for one step from micro-batch contributions ``d_i = c * w_i * G_i``.

    ``total = sum_i d_i`` (the accumulated gradient), ``sum_sq_over_w = sum_i d_i^2 / w_i``,
    ``weight = W = sum_i w_i``, ``count = M >= 2``. The common scale ``c`` cancels in the SNR.
    """
    if count < 2:
        raise ValueError(f"the cross-sample estimator needs >= 2 micro-batches, got {count}")
    raw = total.square() / (weight * weight)
    var = (sum_sq_over_w - total.square() / weight) / ((count - 1) * weight)
    return raw, var.clamp_(min=0.0)


def gate(
    raw: Tensor,
    var: Tensor,
    k: float,
    rule: str,
    tau: float,
    a: float = 1.0,
    floor: float = GATE_FLOOR,
) -> Tensor:
    """The gate in ``[0, 1]`` for signal ``raw`` (biased up by ``k var``) and noise ``var``.

    ``var`` is floored at ``floor`` first, so no rule divides by zero."""
    if rule == "none":
        return torch.ones_like(raw)
    var = var.clamp(min=floor)
    if rule == "paper":
        p = (raw - a * var).clamp_(min=0.0)
        return p / (p + tau * var)
    sig = (raw - k * var).clamp_(min=0.0)
    if rule == "wiener":
        return sig / (sig + tau * var)
    if rule == "clamp":
        return (sig / (tau * var)).clamp_(max=1.0)
    if rule == "hard":
        return (sig > tau * var).to(raw.dtype)
    raise ValueError(f"gate must be one of {GATE_RULES}, got {rule!r}")


def snr(raw: Tensor, var: Tensor, k: float, floor: float = GATE_FLOOR) -> Tensor:
    """The debiased signal-to-noise ratio ``relu(raw - k var) / var`` (for metrics and gates)."""
    var = var.clamp(min=floor)
    return (raw - k * var).clamp_(min=0.0) / var


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's ``1 - beta1^t`` and ``sqrt(1 - beta2^t)``."""
    return 1.0 - beta1**step, math.sqrt(1.0 - beta2**step)


@torch.no_grad()
def snr_adamw_reference_step(
    param: Tensor,
    grad: Tensor,
    state: dict,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    snr_beta: float,
    gate_rule: str,
    tau: float,
    gate_a: float = 1.0,
    warmup_steps: int = 0,
    noise: str = "innovation",
) -> Tensor:
    """One SNR-AdamW step for one tensor, diagonal temporal mode, written for reading.

    The optimizer's per-tensor and foreach paths are alternative implementations of this
    function and are tested against it. Returns the gate that was applied. ``snr_beta`` is
    used by ``noise="second_moment"`` only (the innovation rule averages with ``betas[0]``).
    """
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(param)
        state["exp_avg_sq"] = torch.zeros_like(param)
        state["noise_avg" if noise == "innovation" else "snr_avg"] = torch.zeros_like(param)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    # 1. moments (the innovation is measured against the mean *before* this gradient)
    if noise == "innovation":
        innovation_(state["noise_avg"], grad, m, t, beta1, beta1)
    else:
        state["snr_avg"].lerp_(grad, 1.0 - snr_beta)
    m.lerp_(grad, 1.0 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    # 2. signal and noise, 3. gate
    if t < 2 or t <= warmup_steps:
        g = torch.ones_like(param)
    else:
        if noise == "innovation":
            raw, var, k = innovation_moments(m, state["noise_avg"], t, beta1, beta1)
        else:
            raw, var, k = temporal_moments(state["snr_avg"], v, t, snr_beta, beta2)
        g = gate(raw, var, k, gate_rule, tau, gate_a)
    # 4. update: decoupled weight decay is not gated
    bc1, bc2_sqrt = bias_corrections(t, beta1, beta2)
    direction = (m / bc1) / (v.sqrt() / bc2_sqrt + eps)
    param.mul_(1.0 - lr * weight_decay)
    param.sub_(lr * g * direction)
    return g
