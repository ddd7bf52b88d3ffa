"""``kernels="compile"``: each diagonal temporal parameter's whole step as one pass compiled
by ``torch.compile`` (`snr_dist.kernels.compiled`: Inductor's C++ on the CPU, Triton on CUDA),
eight parameters to a compiled call, with no host read (`snr_dist.optim.steps.device`).

What it costs and when it pays back: ``docs/kernels.md`` ("The compiled step").
"""

from __future__ import annotations

from snr_dist.kernels import compiled
from snr_dist.optim.steps.device import DeviceStep


class CompiledStep(DeviceStep):
    name = "compile"

    def begin_step(self) -> None:
        self.ctx.engine.flat_aliases.next_step()  # forget the aliases of tensors gone since

    def launch(self, tensors: tuple, **options) -> None:
        compiled.compiled_snr_adamw_step(*tensors, aliases=self.ctx.engine.flat_aliases, **options)
