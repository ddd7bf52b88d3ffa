"""The Triton step (``kernels="auto"`` on CUDA, ``"triton"`` anywhere Triton runs): each
diagonal temporal parameter's whole step in one read-modify-write, one launch per device and
dtypes, with no host read (`snr_dist.optim.steps.device`; the kernel:
`snr_dist.triton_kernels.fused_snr_adamw_step_device`)."""

from __future__ import annotations

from snr_dist.optim.steps.device import DeviceStep


class TritonStep(DeviceStep):
    name = "triton"

    def launch(self, tensors: tuple, **options) -> None:
        from snr_dist import triton_kernels  # imports Triton: only where it runs

        triton_kernels.fused_snr_adamw_step_device(*tensors, **options)
