"""Subnormal floats flushed to zero while an optimizer steps on the CPU.

Why: Adam's first moment of a coordinate whose gradient stays exactly zero (a dead ReLU unit, a
pixel that is blank in every image) shrinks by ``beta1`` each step into the subnormal range
(below 1.2e-38 in fp32) and then stays there for good, since ``0.9 * 2**-149`` rounds back to
``2**-149``. x86 CPUs take a slow path for arithmetic on subnormal operands; matrix products
over such state (subspace mode's projections) ran many times slower per call on the digits MLP
late in training, and its optimizer step 6.8x slower (`benchmarks/denormal_step.py`). With
Adam's ``eps`` at least `MIN_EPS`, values that small cannot move a parameter visibly, so treating
them as zero during the step gives the time back at no cost (bit-identical runs in that
benchmark and in the studies).

The switch is the calling thread's (x86 MXCSR's flush-to-zero and denormals-are-zero bits, set
by `torch.set_flush_denormal`); intra-op worker threads keep their own setting.
"""

from __future__ import annotations

import sys
from types import TracebackType

import torch

_SMALLEST_NORMAL = sys.float_info.min  # float64: CPython's float arithmetic obeys the same bits

MIN_EPS = 1e-12
"""Smallest Adam ``eps`` with which a step is flushed. Only values below 1.2e-38 are flushed:
moments of coordinates whose gradient is below that, and products of gradients below 1.1e-19
(subspace sketches hold squares). The Adam direction ``m / (sqrt(v) + eps)`` of such gradients
is at most 1.1e-19 / eps, so with ``eps >= 1e-12`` nothing flushed could have moved a parameter
by more than 1.1e-7 x lr (with 0 it would even be 0 / 0); below, the step runs unflushed."""


def flushing() -> bool:
    """Whether this thread flushes subnormal floats to zero now (torch has no getter)."""
    half = 0.5
    return _SMALLEST_NORMAL * half == 0.0


class flush_denormals:  # noqa: N801 - used like torch.no_grad
    """Flush subnormals to zero inside the block when ``enabled``, then restore the thread's
    previous setting (also on an exception). Re-entrant: an inner block that finds flushing on
    already leaves it on. Does nothing where the CPU cannot flush."""

    __slots__ = ("enabled", "_turned_on")

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._turned_on = False

    def __enter__(self) -> None:
        self._turned_on = self.enabled and not flushing() and torch.set_flush_denormal(True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._turned_on:
            torch.set_flush_denormal(False)
            self._turned_on = False


def flush_allowed(param_groups: list[dict]) -> bool:
    """Whether a step over these groups may flush: every group has a numeric ``eps`` of at least
    `MIN_EPS`. Nothing bounds what a flushed value would have changed in a group without one
    (SGD's update is proportional to the gradient, Rprop's uses only its sign): not flushed."""
    for g in param_groups:
        eps = g.get("eps")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= MIN_EPS:
            return False
    return True
