"""The non-finite gradient policy: skip, count and warn once.

A parameter whose gradient holds NaN or Inf is left untouched for that step (its moments
too), counted, and reported once by a warning. With sharded parameters a rank's NaN skips the
parameter on every rank (`snr_dist.distributors.base.Distributor.agree_on_skips`).
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch import Tensor


def finite_flags(grads: list[Tensor]) -> list[bool]:
    """One host sync for all tensors: which gradients are free of NaN/Inf.

    The 2-norm is the cheapest multi-tensor reduction (the inf-norm is several times slower
    on CPU) and propagates NaN/Inf; a norm that merely overflows (elements > ~1e19) is
    re-checked elementwise, so finite gradients are never skipped.
    """
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    by_device: dict = defaultdict(list)
    for i, n in enumerate(norms):
        by_device[n.device].append(i)
    flags = [True] * len(grads)
    for idx in by_device.values():  # one device-to-host copy per device
        ok = torch.isfinite(torch.stack([norms[i].float() for i in idx])).tolist()
        for i, f in zip(idx, ok):
            flags[i] = f
    return [f or bool(torch.isfinite(g).all()) for f, g in zip(flags, grads)]


class NonfiniteCounter:
    """Skips per parameter, and the one warning.

    Steps that check on the host (the eager path) count here at once and warn at the first
    skip. Steps that check on the device (``kernels="compile"``) count in a 0-dim tensor per
    parameter (`device_counter`), never read during a step: their skips are added, and the
    warning given, when the counts are read (`skips`: ``optimizer.nonfinite_skips``,
    ``optimizer.metrics()``).
    """

    def __init__(self) -> None:
        self._host: dict[Tensor, int] = defaultdict(int)
        self._device: dict[Tensor, Tensor] = {}
        self._warned = False

    def record(self, p: Tensor) -> None:
        self._host[p] += 1
        self._warn(stacklevel=5)

    def device_counter(self, p: Tensor, device: torch.device) -> Tensor:
        """The fp32 0-dim tensor on ``device`` that a device-side step adds ``p``'s skips to."""
        counter = self._device.get(p)
        if counter is None or counter.device != device:
            before = 0.0 if counter is None else float(counter)
            counter = self._device[p] = torch.full((), before, device=device)
        return counter

    @property
    def skips(self) -> dict[Tensor, int]:
        """Skips per parameter (reads the device counters: one host read each)."""
        out = dict(self._host)
        for p, n in self._device.items():
            k = int(n.item())
            if k:
                out[p] = out.get(p, 0) + k
                self._warn(stacklevel=4)
        return out

    def _warn(self, stacklevel: int) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                "snr-dist: a gradient contains NaN or Inf; that parameter's step is skipped and "
                "its state left untouched (counted in optimizer.metrics()['nonfinite_skips']). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def total(self) -> int:
        return int(sum(self.skips.values()))
