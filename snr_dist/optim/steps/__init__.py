"""SNRAdamW's step kernels: implementations of its hot loops behind one interface
(`base.StepKernel`: what a kernel takes and returns), and the choice between them
(`routing.Kernels`). README.md in this folder lists them."""

from snr_dist.optim.steps.base import StepContext, StepKernel
from snr_dist.optim.steps.routing import Kernels

__all__ = ["Kernels", "StepContext", "StepKernel"]
