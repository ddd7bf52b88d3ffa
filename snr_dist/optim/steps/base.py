"""What a step kernel takes and returns.

A step kernel is one implementation of SNRAdamW's hot loops: Adam's moments, the estimators'
statistics and the gated, decoupled-decay update (`snr_dist.snr.snr_adamw_reference_step` is
the readable one, and the oracle each kernel is tested against).

It takes:

- ``group``: the param group, whose hyper-parameters and SNR options it reads;
- ``params``: the parameters it steps (the optimizer's keys: DTensors under FSDP2), each with
  state from `StepContext.state` (allocated at first use);
- ``grads``: their local gradients as `SNREngine.gradients` hands them out: this rank's, with
  non-finite ones already dropped, except for kernels that `checks_finite` themselves on the
  device (those take every gradient and skip, and count, a non-finite one there).

It returns nothing: it writes each parameter and its state in place and advances its ``step``
once (a device-side kernel: by one unless the gradient was non-finite).

A kernel's `step` is a parameter's whole step, for the estimators that need nothing from the
exchange or the refreshes (``Estimator.elementwise``, the diagonal temporal rules). The torch
kernel also serves every other estimator, in two halves around the step's exchange: `moments`
(Adam's moments and the local statistics) and `update` (the gated update).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

if TYPE_CHECKING:
    from snr_dist.optim.engine import SNREngine


@dataclass
class StepContext:
    """What the kernels of one optimizer read from it."""

    engine: SNREngine
    """Its estimators, distributor, non-finite counters and the caches of its step."""
    state: Callable[[Tensor, dict], dict]
    """``state(p, group)``: ``p``'s state, allocated at first use."""
    skip_nonfinite: bool = True
    """Skip (and count) parameters whose gradient holds NaN/Inf, or apply it as it is."""
    step_bound: int = 0
    """An upper bound of every parameter's step count after this step (the device kernels'
    tables of per-step constants cover it)."""


class StepKernel(ABC):
    """One implementation of the step; see the module docstring."""

    name: ClassVar[str]
    checks_finite: ClassVar[bool] = False
    """It checks the gradients for NaN/Inf on the device itself (no host read)."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def begin_step(self) -> None:  # noqa: B027 - optional
        """Once per optimizer step, before any parameter is stepped."""

    @abstractmethod
    def step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        """The whole step of ``params`` (elementwise estimators only)."""
