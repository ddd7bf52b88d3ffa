"""Diagonal temporal estimator, ``noise="second_moment"`` (the rule of snr-dist 0.1).

``raw = s_hat^2`` and ``var = (v_hat - s_hat^2) / (1 - k_t)`` from ``s = EMA(g)`` and
``v = EMA(g^2)`` (`snr_dist.snr.temporal_moments`). In SNRAdamW ``v`` is Adam's second moment
and ``s`` is Adam's first moment or one extra tensor (`Moments`). Exact for stationary
gradients; a gradient that shrinks within ``v``'s window reads as noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist import snr as rule
from snr_dist.estimators.base import Estimator, Slot, stat_dtype
from snr_dist.grad_mode import no_grad
from snr_dist.kernels.scratch import Scratch
from snr_dist.layout import Kind

OWN_KEYS = ("snr_avg", "snr_sq")


class DiagonalSecondMoment(Estimator):
    name = "diagonal_second_moment"
    elementwise = True

    def init_state(self, p, local_p, state, group, key) -> None:
        if self.moments_of.own_mean(group):
            like = dict(device=local_p.device, dtype=stat_dtype(group))
            state["snr_avg"] = torch.zeros(local_p.shape, **like)
        if not self.moments_of.adam:  # a second moment: float32 always
            f32 = dict(device=local_p.device, dtype=torch.float32)
            state["snr_sq"] = torch.zeros(local_p.shape, **f32)

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        return {k: Kind.PARAM for k in OWN_KEYS if k in state}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        if {"basis", "raw_avg", "noise_avg"} & set(state):
            return False
        return "snr_avg" not in state or state["snr_avg"].dtype == stat_dtype(group)

    @no_grad
    def update(self, group: dict, slots: list[Slot], scratch: Scratch | None = None) -> None:
        update_own_moments(self.moments_of, group, slots)

    def moments(self, p, state, group, step, index=None):
        s, beta_s = self.moments_of.mean(state, group)
        v, beta_v = self.moments_of.sq(state, group)
        if index is not None:
            s, v = s.reshape(-1)[index], v.reshape(-1)[index]
        return rule.temporal_moments(s.float(), v.float(), step, beta_s, beta_v)

    def gate_(self, group, slots, directions, out=None, alphas=None, foreach=True) -> None:
        if not foreach or group["gate"] not in FOREACH_RULES:
            return super().gate_(group, slots, directions, out, alphas)
        gate_foreach_(self, group, slots, directions, out, alphas)

    def gates_foreach(
        self, group: dict, states: list[dict], t: int, scratch: Scratch | None = None
    ) -> tuple[list[Tensor], float]:
        """Multi-tensor `moments` + gate (wiener/clamp/paper) for states at step ``t``:
        ``(gates, scale)`` with the true gate ``scale * gates`` (the constant is left for the
        caller to fold into its step size; the gates in ``scratch``'s buffers when given).

        Works in units scaled by ``bc_v = 1 - beta_v^t`` so the bias corrections become
        constants: ``var' = v - c s^2`` (``c = bc_v / bc_s^2``) is ``(1-k) bc_v var``,
        ``raw' = v - var'`` is ``bc_v raw``; 7 passes over the state instead of 13.
        """
        beta_s = self.moments_of.beta_s(states[0], group)
        beta_v = self.moments_of.beta_v(group)
        k = rule.ema_noise_factor(beta_s, t)
        one_k = max(1.0 - k, 1e-12)
        bc_v = 1.0 - beta_v**t
        c = bc_v / (1.0 - beta_s**t) ** 2
        tau_p = group["tau"] / one_k
        shift = (group["gate_a"] if group["gate"] == "paper" else k) / one_k
        s = [self.moments_of.mean(st, group)[0] for st in states]
        v = [self.moments_of.sq(st, group)[0] for st in states]
        if scratch is None:
            var = torch._foreach_addcmul(v, s, s, value=-c)  # (second - raw) in primed units
            sig = torch._foreach_sub(v, var)  # raw'
        else:  # the same kernels into the buffers: the same bits
            var, sig = scratch.like("var", v), scratch.like("sig", v)
            for vi, si, a, b in zip(v, s, var, sig):
                torch.addcmul(vi, si, si, value=-c, out=a)
                torch.sub(vi, a, out=b)
        torch._foreach_clamp_min_(var, rule.GATE_FLOOR * one_k * bc_v)
        torch._foreach_add_(sig, var, alpha=-shift)
        torch._foreach_clamp_min_(sig, 0.0)  # sig' (or the paper's p')
        if group["gate"] == "clamp":
            torch._foreach_div_(sig, var)
            torch._foreach_mul_(sig, 1.0 / tau_p)
            torch._foreach_clamp_max_(sig, 1.0)
            return sig, 1.0
        torch._foreach_add_(var, sig, alpha=1.0 / tau_p)  # (sig' + tau' var') / tau'
        torch._foreach_div_(sig, var)
        return sig, 1.0 / tau_p


FOREACH_RULES = ("wiener", "clamp", "paper")
"""Gate rules the diagonal temporal estimators' ``gates_foreach`` compute."""


def gate_foreach_(estimator, group, slots, directions, out=None, alphas=None) -> None:
    """`Estimator.gate_` for a diagonal temporal estimator, multi-tensor: gates from its
    ``gates_foreach`` per step count, multiplied into the directions (or added into ``out``)."""
    by_step: dict[int, list[int]] = {}
    for i, s in enumerate(slots):
        by_step.setdefault(s.step, []).append(i)
    for t, idx in by_step.items():
        gates, scale = estimator.gates_foreach(group, [slots[i].state for i in idx], t)
        dirs = [directions[i] for i in idx]
        if out is None:
            torch._foreach_mul_(dirs, gates)
            torch._foreach_mul_(dirs, scale)
        else:
            torch._foreach_mul_(gates, dirs)
            torch._foreach_mul_(gates, [alphas[i] * scale for i in idx])
            torch._foreach_add_([out[i] for i in idx], gates)


def update_own_moments(moments, group: dict, slots: list[Slot]) -> None:
    """The EMAs a temporal estimator keeps itself (``snr_avg``, ``snr_sq``), multi-tensor."""
    with_mean = [s for s in slots if "snr_avg" in s.state]
    if with_mean:
        torch._foreach_lerp_(
            [s.state["snr_avg"] for s in with_mean],
            [s.grad for s in with_mean],
            1.0 - group["snr_beta"],
        )
    with_sq = [s for s in slots if "snr_sq" in s.state]
    if with_sq:
        b2 = group["snr_beta2"]
        sq = [s.state["snr_sq"] for s in with_sq]
        gs = [s.grad for s in with_sq]
        torch._foreach_mul_(sq, b2)
        torch._foreach_addcmul_(sq, gs, gs, value=1.0 - b2)
