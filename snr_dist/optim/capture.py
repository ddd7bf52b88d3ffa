"""Micro-batch capture for the cross-sample estimators: gradient hooks that hold nothing.

Each backward pass through a parameter hands its gradient contribution to a tensor hook
*before* it is accumulated into ``p.grad`` (and, under DDP, before the data-parallel
reduction). The hooks reach the optimizer through a weak reference, so a deleted optimizer is
collected (and its hooks removed by a finalizer); ``close()`` removes them at once.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from snr_dist.cross_sample import MicrobatchStats


def _remove_all(handles: dict[Tensor, RemovableHandle]) -> None:
    for h in handles.values():
        h.remove()
    handles.clear()


def _hook(target: weakref.WeakMethod, p: Tensor) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        observe = target()
        if observe is not None:
            observe(p, grad)

    return hook


class MicrobatchCapture:
    """Hooks on the cross-sample parameters and the sums they collect between two steps."""

    def __init__(self, observe: Callable[[Tensor, Tensor], None]) -> None:
        """``observe``: a bound method (held weakly) called as ``observe(param, grad)``."""
        self._target = weakref.WeakMethod(observe)
        self.handles: dict[Tensor, RemovableHandle] = {}
        self.stats: dict[Tensor, MicrobatchStats] = {}
        self.weight = 1.0
        self._finalizer = weakref.finalize(observe.__self__, _remove_all, self.handles)

    def attach(self, params: Iterable[Tensor]) -> None:
        """Hook exactly ``params`` (those with ``requires_grad``); unhook any others."""
        wanted = {p for p in params if p.requires_grad}
        for p in [p for p in self.handles if p not in wanted]:
            self.handles.pop(p).remove()
        for p in wanted:
            if p not in self.handles:
                self.handles[p] = p.register_hook(_hook(self._target, p))

    def close(self) -> None:
        _remove_all(self.handles)
        self.stats.clear()

    @contextlib.contextmanager
    def weighted(self, weight: float) -> Iterator[None]:
        if not (isinstance(weight, (int, float)) and weight > 0):
            raise ValueError(f"Invalid microbatch weight: {weight!r}; allowed: a float > 0")
        old, self.weight = self.weight, float(weight)
        try:
            yield
        finally:
            self.weight = old

    def discard(self, params: Iterable[Tensor] | None = None) -> None:
        """Forget recorded micro-batches (of ``params``, or all of them)."""
        if params is None:
            self.stats.clear()
            return
        for p in params:
            self.stats.pop(p, None)
