"""What the two device-side kernels (compiled, Triton) share: no value read on the host.

A device-side step checks the gradients for NaN/Inf on the device and masks a non-finite one
inside the same pass (the parameter, its moments and its ``step`` keep their values, its skip
counter, a tensor, advances; `snr_dist.optim.nonfinite.NonfiniteCounter` reads the counters
when asked). Each parameter's ``step`` lives on its device, as in torch's fused and capturable
Adam, and its per-step constants come from a table indexed by it
(`snr_dist.kernels.step_table`). Where ranks hold rows of one parameter (FSDP2, ZeRO row
shards) they agree on the flags with one all-reduce on the device.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from snr_dist.distributors.dtensor import local
from snr_dist.optim.steps.base import StepKernel


class DeviceStep(StepKernel):
    checks_finite = True

    def step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        ctx = self.ctx
        engine = ctx.engine
        states = [ctx.state(p, group) for p in params]
        locals_ = [local(p) for p in params]
        for st, lp in zip(states, locals_):
            if st["step"].device != lp.device:
                st["step"] = st["step"].to(lp.device)
        oks = None
        dist = engine.distributor
        if ctx.skip_nonfinite and dist.partial_statistics and dist.world > 1:
            bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).float()
            oks = dist.agree_on_skips_device(bad).eq(0)  # a rank's NaN skips every rank
        extras, options = fused_options(group, states)
        tensors = (
            locals_,
            grads,
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            extras,
            [st["step"] for st in states],
            [engine.nonfinite.device_counter(p, lp.device) for p, lp in zip(params, locals_)],
            oks,
        )
        self.launch(tensors, step_bound=ctx.step_bound, check_finite=ctx.skip_nonfinite, **options)

    @abstractmethod
    def launch(self, tensors: tuple, **options: Any) -> None:
        """Step ``tensors`` (params, grads, m, v, the third state vector, steps, skip
        counters, agreed flags) with the keyword ``options`` of `fused_options`: the Triton
        and compiled steps each implement it."""


def fused_options(group: dict, states: list[dict]) -> tuple[list[Tensor] | None, dict]:
    """What the fused steps take from a group and its states: the third state vector
    (innovation EMA, own SNR mean, or None when the mean is Adam's) and the rule's keyword
    options."""
    innovation = "noise_avg" in states[0]
    own_mean = "snr_avg" in states[0]
    extra = "noise_avg" if innovation else "snr_avg"
    extras = [st[extra] for st in states] if innovation or own_mean else None
    return extras, dict(
        lr=group["lr"],
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        snr_beta=group["snr_beta"] if own_mean else group["betas"][0],
        gate_rule=group["gate"],
        tau=group["tau"],
        gate_a=group["gate_a"],
        warmup_steps=group["warmup_steps"],
        maximize=group["maximize"],
        noise="innovation" if innovation else "second_moment",
    )
