"""Diagonal temporal estimator, ``noise="innovation"`` (the default): right when gradients drift.

Signal: Adam's own mean ``m_hat`` (``E[m_hat^2] = mu^2 + k_t sigma^2``). Noise: the innovation of
each gradient around the previous mean, ``x = EMA_rho((g - m_hat_{t-1})^2)`` with ``rho`` the
mean's own factor, ``var = x_hat / (1 + kappa_t)`` (`snr_dist.snr.innovation_moments`). A
gradient that shrinks or grows smoothly only adds the mean's lag to the noise, so its gate stays
near 1 (the second-moment rule closes it). One state tensor beyond AdamW's (``noise_avg``);
SNRPreconditioner also keeps its own mean (``snr_avg``).

`update` runs before the optimizer folds the gradient into its own mean: the innovation is
measured against the mean of the previous step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist import snr as rule
from snr_dist.estimators.base import Estimator, Slot, stat_dtype
from snr_dist.estimators.diagonal_second_moment import FOREACH_RULES, gate_foreach_
from snr_dist.grad_mode import no_grad
from snr_dist.kernels.scratch import Scratch
from snr_dist.layout import Kind


class DiagonalInnovation(Estimator):
    name = "diagonal_innovation"
    elementwise = True

    def init_state(self, p, local_p, state, group, key) -> None:
        like = dict(device=local_p.device, dtype=stat_dtype(group))
        state["noise_avg"] = torch.zeros(local_p.shape, **like)
        if not self.moments_of.adam:
            state["snr_avg"] = torch.zeros(local_p.shape, **like)

    def state_kinds(self, state: dict) -> dict[str, Kind]:
        return {k: Kind.PARAM for k in ("noise_avg", "snr_avg") if k in state}

    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        return (
            "noise_avg" in state
            and "basis" not in state
            and state["noise_avg"].dtype == stat_dtype(group)
        )

    @no_grad
    def update(self, group: dict, slots: list[Slot], scratch: Scratch | None = None) -> None:
        innovations_(self.moments_of, group, slots, scratch)

    def moments(self, p, state, group, step, index=None):
        mean, beta = self.moments_of.mean(state, group)
        x = state["noise_avg"]
        if index is not None:
            mean, x = mean.reshape(-1)[index], x.reshape(-1)[index]
        return rule.innovation_moments(mean.float(), x.float(), step, beta, beta)

    def gate_(self, group, slots, directions, out=None, alphas=None, foreach=True) -> None:
        if not foreach or group["gate"] not in FOREACH_RULES:
            return super().gate_(group, slots, directions, out, alphas)
        gate_foreach_(self, group, slots, directions, out, alphas)

    def gates_foreach(
        self, group: dict, states: list[dict], t: int, scratch: Scratch | None = None
    ) -> tuple[list[Tensor], float]:
        """Multi-tensor `moments` + gate (wiener/clamp/paper) at step ``t``: ``(gates, scale)``
        with the true gate ``scale * gates`` (in ``scratch``'s buffers when given). Works in
        the units of ``x``: ``var' = x``, ``raw' = c m^2`` with ``c`` folding both bias
        corrections and ``kappa``."""
        beta = self.moments_of.beta_s(states[0], group)
        k = rule.ema_noise_factor(beta, t)
        var_scale = 1.0 / ((1.0 - beta ** (t - 1)) * (1.0 + rule.innovation_kappa(beta, beta, t)))
        c = 1.0 / ((1.0 - beta**t) ** 2 * var_scale)
        shift = group["gate_a"] if group["gate"] == "paper" else k
        tau = group["tau"]
        means = [self.moments_of.mean(st, group)[0] for st in states]
        xs = [st["noise_avg"] for st in states]
        if scratch is None:
            var = torch._foreach_clamp_min(xs, rule.GATE_FLOOR / var_scale)
            sig = torch._foreach_mul(var, -shift)
        else:  # the same kernels into the buffers: the same bits
            var, sig = scratch.like("var", xs), scratch.like("sig", xs)
            for x, v, s in zip(xs, var, sig):
                torch.clamp_min(x, rule.GATE_FLOOR / var_scale, out=v)
                torch.mul(v, -shift, out=s)
        torch._foreach_addcmul_(sig, means, means, value=c)
        torch._foreach_clamp_min_(sig, 0.0)  # sig' (or the paper's p')
        if group["gate"] == "clamp":
            torch._foreach_div_(sig, var)
            torch._foreach_mul_(sig, 1.0 / tau)
            torch._foreach_clamp_max_(sig, 1.0)
            return sig, 1.0
        torch._foreach_add_(var, sig, alpha=1.0 / tau)  # (sig' + tau var') / tau
        torch._foreach_div_(sig, var)
        return sig, 1.0 / tau


def innovations_(moments, group: dict, slots: list[Slot], scratch: Scratch | None = None) -> None:
    """Fold each slot's innovation into ``noise_avg`` (multi-tensor, bucketed by step; the
    innovations in ``scratch``'s buffer when given), then advance the estimator's own mean
    where it keeps one (SNRPreconditioner)."""
    by_step: dict[int, list[Slot]] = {}
    for s in slots:
        if s.step >= 2:
            by_step.setdefault(s.step, []).append(s)
    for t, batch in by_step.items():
        beta = moments.beta_s(batch[0].state, group)
        means = [moments.mean(s.state, group)[0] for s in batch]
        grads, alpha = [s.grad for s in batch], -1.0 / (1.0 - beta ** (t - 1))
        if scratch is None:
            r = torch._foreach_add(grads, means, alpha=alpha)
        else:
            r = scratch.like("innovation", means)
            for out, g, m in zip(r, grads, means):
                torch.add(g, m, alpha=alpha, out=out)
        xs = [s.state["noise_avg"] for s in batch]
        torch._foreach_mul_(xs, beta)
        torch._foreach_addcmul_(xs, r, r, value=1.0 - beta)
    own = [s for s in slots if "snr_avg" in s.state]
    if own:
        torch._foreach_lerp_(
            [s.state["snr_avg"] for s in own], [s.grad for s in own], 1.0 - group["snr_beta"]
        )
