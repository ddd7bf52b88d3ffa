"""Triton kernels of snr-dist (importing this package needs Triton).

- `project_with_stats`: ``R = X Q`` with per-direction sums of squares in the epilogue;
- `gate_reconstruct`: ``Y = a X + (R * c) Q^T`` in one pass over ``X``;
- `fused_snr_adamw_step`: the diagonal temporal SNR-AdamW step in one read-modify-write.

Their pure-torch references, the input checks and the dispatch live in `snr_dist.kernels`.
Set ``TRITON_INTERPRET=1`` before this package is first imported to run them on the CPU.
"""

from kernels.snr_adamw import fused_snr_adamw_step
from kernels.subspace import gate_reconstruct, project_with_stats

__all__ = ["fused_snr_adamw_step", "gate_reconstruct", "project_with_stats"]
