"""snr-dist: SNR-gated optimizers for single-process and distributed PyTorch training."""

from snr_dist.optim import SNRAdamW, SNRPreconditioner
from snr_dist.snr import finite_dataset_a

__version__ = "0.3.0"
__all__ = ["SNRAdamW", "SNRPreconditioner", "finite_dataset_a", "__version__"]
