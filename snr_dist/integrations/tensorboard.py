"""TensorBoard event files for the main job (``snr-dist train --report-to tensorboard``).

One run directory per optimizer and seed; at every evaluation: the evaluation record's numbers
under ``eval/``, and for SNR optimizers the telemetry scalars per layer group under ``snr/``
(`snr_dist.integrations.telemetry`) and a histogram of each layer group's gates under
``gates/``; the stop monitor's ratio (any optimizer) under ``stop/``. Written with torch's own
``SummaryWriter`` (the ``tensorboard`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def require() -> None:
    """Fail early, with the fix, when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise ImportError(
            "--report-to tensorboard needs the tensorboard package: pip install "
            "'snr-dist[tensorboard]'"
        ) from None


class TensorBoardSink:
    """Writes one run's evaluations; `close` flushes."""

    def __init__(self, log_dir: str | Path) -> None:
        require()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(
        self,
        record: dict,
        step: int,
        scalars: dict[str, float] | None = None,
        histograms: dict[str, Tensor] | None = None,
    ) -> None:
        for key, value in record.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and key != "step" and math.isfinite(value):
                self.writer.add_scalar(f"eval/{key}", value, step)
        for key, value in (scalars or {}).items():
            # the stop monitor reads any optimizer: its tag is the one the HF and Lightning
            # callbacks log (stop/ratio), not under snr/
            tag = key if key.startswith("stop/") else f"snr/{key}"
            self.writer.add_scalar(tag, value, step)
        for key, values in (histograms or {}).items():
            values = values[torch.isfinite(values)]  # a diverging run's NaN must not end it here
            if values.numel():
                self.writer.add_histogram(f"gates/{key}", values, step, bins="auto")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
