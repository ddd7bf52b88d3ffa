"""Work buffers reused from step to step by the CPU's chunked elementwise step.

A multi-tensor op that returns new tensors (``torch._foreach_sqrt``, ``_foreach_add``, ...)
asks the allocator for fresh memory each step. On the CPU that memory comes from the C
library's heap, which hands large freed blocks back to the kernel and then faults them in again,
page by page, on the next step: the diagonal step's four temporaries cost more than the
arithmetic they hold. The chunked step instead writes them (``out=``) into views of a few
buffers kept here, one chunk each: the same kernels on the same values, so the results are
bit-identical, with no allocation and no fault. Not optimizer state: never saved,
rebuilt empty on a copy or a load.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Scratch:
    """Named flat buffers, grown on demand, and their views shaped like a list of tensors."""

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}
        self._views: dict[tuple, list[Tensor]] = {}

    def clear(self) -> None:
        self._buffers.clear()
        self._views.clear()

    def like(
        self, name: str, tensors: list[Tensor], dtype: torch.dtype | None = None
    ) -> list[Tensor]:
        """Contiguous views shaped like ``tensors`` (all of one dtype and device; of ``dtype``
        when given), end to end in the buffer ``name``; their contents are whatever the last
        user left. Views of one name alias each other across calls: a caller is done with them
        before it asks again."""
        first = tensors[0]
        shapes = tuple(t.shape for t in tensors)
        dtype = first.dtype if dtype is None else dtype
        key = (name, first.device, dtype, shapes)
        views = self._views.get(key)
        if views is not None:
            return views
        size = sum(t.numel() for t in tensors)
        bkey = (name, first.device, dtype)
        buf = self._buffers.get(bkey)
        if buf is None or buf.numel() < size:
            buf = self._buffers[bkey] = torch.empty(size, dtype=dtype, device=first.device)
            self._views = {k: v for k, v in self._views.items() if k[:3] != bkey}
        views, at = [], 0
        for t, shape in zip(tensors, shapes):
            n = t.numel()
            views.append(buf[at : at + n].view(shape))
            at += n
        self._views[key] = views
        return views
