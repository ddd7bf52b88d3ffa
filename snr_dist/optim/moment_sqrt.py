"""Adam's ``sqrt(v)`` on the CPU without MKL's slow path for zeros.

On the CPU torch computes ``sqrt`` of a contiguous fp32 or fp64 tensor with MKL's vector math
library (VML, high-accuracy mode, its own denormal flushing off), which treats zero and
subnormal inputs as special values and takes a slow path for them: on this machine ``sqrt`` of
a 65,536-entry tensor takes 1.7x as long with 1% zeros scattered through it, 15x with 12%, 30x
with only zeros (`benchmarks/moment_sqrt.py`). Adam's second moment is exactly zero at every
coordinate whose gradient has always been zero (pixels blank in every image, units dead from
the start, embedding rows of tokens not seen yet): 10-15% of the digits MLP's ``v``, where the
step's ``sqrt`` then took most of its elementwise time. torch's own AdamW pays the same.

Raising ``v`` to the smallest normal number first (one pass into the output, then an in-place
``sqrt``) keeps VML on its fast path and changes nothing the step computes: the caller adds
``added`` (Adam's ``eps``, scaled) to ``sqrt(v) * scale`` next, and when
``added >= 2**-36 * scale`` the floor's root (``2**-63 * scale`` in fp32) lies below half an
ulp of ``added``, so ``sqrt(max(v, floor)) * scale + added`` equals ``sqrt(v) * scale + added``
bit for bit for every ``v`` (zero and subnormal ``v`` give ``added`` either way; a NaN stays
NaN). The extra pass costs 0.6-0.8x a plain ``sqrt`` where there are no zeros, so it runs only
for tensors of which at least `MIN_SHARE` (2%) was zero or subnormal when last looked at: one
comparison pass and host read per tensor every `RECHECK` calls (on the CPU a host read costs no
device sync). Where the bound fails (an ``eps`` near zero), off the CPU, without MKL or for
other dtypes, the plain ``sqrt`` runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The smallest normal number of each dtype VML serves, and the smallest ``added / scale`` whose
# half ulp still exceeds the floor's root (fp32: 2**-63 against 2**-38, with a margin of 4 for
# the rounding of the scaling; fp64: 2**-511 against 2**-457, likewise).
_FLOORS = {
    torch.float32: (torch.finfo(torch.float32).tiny, 2.0**-36),
    torch.float64: (torch.finfo(torch.float64).tiny, 2.0**-455),
}
_MKL = torch.backends.mkl.is_available()
RECHECK = 100
MIN_SHARE = 0.02


def floor_of(v: Tensor) -> tuple[float, float] | None:
    """``(floor, smallest added / scale)`` when ``sqrt`` of ``v`` runs in VML (a CPU tensor of
    a VML dtype, torch built with MKL), else None."""
    if not _MKL or v.device.type != "cpu":
        return None
    return _FLOORS.get(v.dtype)


def share_below(v: Tensor, floor: float) -> float:
    """The share of ``v``'s entries below ``floor`` (zero or subnormal, for ``v >= 0``)."""
    return float(torch.lt(v, floor).sum()) / max(v.numel(), 1)


class MomentSqrt:
    """``sqrt`` of each parameter's second moment, raised to the floor where that pays.

    One per optimizer (not in its state dict): for each parameter, whether its ``v`` gets the
    floor, looked at again every `RECHECK` calls (zeros come and go slowly: a gradient that was
    always zero starts, a long-silent moment underflows)."""

    def __init__(self) -> None:
        self._seen: dict[Tensor, list] = {}  # param -> [calls left, floor or None]

    def clear(self) -> None:
        self._seen.clear()

    def _floor(self, p: Tensor, v: Tensor, added: float, scale: float) -> float | None:
        entry = self._seen.get(p)
        if entry is None or entry[0] <= 0:
            f = floor_of(v)
            use = f is not None and share_below(v, f[0]) >= MIN_SHARE
            entry = self._seen[p] = [RECHECK, f if use else None]
        entry[0] -= 1
        f = entry[1]
        # the floor changes nothing only when ``added`` absorbs its root
        return f[0] if f is not None and added >= f[1] * scale else None

    def sqrt(
        self, p: Tensor, v: Tensor, added: float, scale: float = 1.0, out: Tensor | None = None
    ) -> Tensor:
        """``sqrt(v)`` (into ``out`` when given) for a caller that computes
        ``sqrt(v) * scale + added`` next: bit-identical to ``torch.sqrt(v)`` there."""
        floor = self._floor(p, v, added, scale)
        if floor is None:
            return torch.sqrt(v) if out is None else torch.sqrt(v, out=out)
        return torch.clamp_min(v, floor, out=out).sqrt_()

    def sqrt_foreach(
        self,
        params: list[Tensor],
        vs: list[Tensor],
        added: list[float],
        scale: float = 1.0,
        out: list[Tensor] | None = None,
    ) -> list[Tensor]:
        """`sqrt` of each ``vs[i]`` (new tensors, or ``out``) as multi-tensor ops;
        ``added[i]`` goes with ``vs[i]``, ``scale`` with all."""
        floors = [self._floor(p, v, a, scale) for p, v, a in zip(params, vs, added)]
        if out is not None:  # the same kernels into ``out``: the same bits
            for v, o, f in zip(vs, out, floors):
                if f is None:
                    torch.sqrt(v, out=o)
                else:
                    torch.clamp_min(v, f, out=o).sqrt_()
            return out
        raised = [i for i, f in enumerate(floors) if f is not None]
        if not raised:
            return torch._foreach_sqrt(vs)
        plain = [i for i, f in enumerate(floors) if f is None]
        roots = torch._foreach_clamp_min([vs[i] for i in raised], [floors[i] for i in raised])
        torch._foreach_sqrt_(roots)
        if plain:
            roots += torch._foreach_sqrt([vs[i] for i in plain])
        result: list[Tensor] = [None] * len(vs)  # type: ignore[list-item]
        for i, t in zip(raised + plain, roots):
            result[i] = t
        return result
