"""Triton kernels of snr-dist (importing this package needs Triton).

- `project_with_stats`: ``R = X Q`` with per-direction sums of squares in the epilogue;
- `gate_reconstruct`: ``Y = a X + (R * c) Q^T`` in one pass over ``X``;
- `fused_snr_adamw_step`: the diagonal temporal SNR-AdamW step in one read-modify-write;
  `fused_snr_adamw_step_device` the same with step counts and the non-finite skip on the
  device (no host read: what SNRAdamW runs).

Installed as ``snr_dist.triton_kernels`` (this folder keeps its place at the repository's top
level). Their pure-torch references and input checks live in `snr_dist.kernels.reference`, the
dispatch in `snr_dist.kernels`; nothing there imports this package at module level.
Set ``TRITON_INTERPRET=1`` before this package is first imported to run them on the CPU.
"""

from .snr_adamw import fused_snr_adamw_step, fused_snr_adamw_step_device
from .subspace import gate_reconstruct, project_with_stats

__all__ = [
    "fused_snr_adamw_step",
    "fused_snr_adamw_step_device",
    "gate_reconstruct",
    "project_with_stats",
]
