"""Optimizers: SNRAdamW and the SNRPreconditioner wrapper around any torch optimizer."""

from snr_dist.optim.preconditioner import SNRPreconditioner
from snr_dist.optim.snr_adamw import SNRAdamW

__all__ = ["SNRAdamW", "SNRPreconditioner"]
