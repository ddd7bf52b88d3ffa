"""Find snr-dist's optimizer behind the wrappers frameworks put around it."""

from __future__ import annotations

from typing import Any

from snr_dist.optim.base import SNROptimizerMixin

# Where wrappers keep the optimizer they wrap: Lightning's LightningOptimizer and Fabric's
# optimizer (``_optimizer``), DeepSpeed's and accelerate's (``optimizer``), torch's
# ZeroRedundancyOptimizer (``optim``).
_WRAPPED_ATTRS = ("_optimizer", "optimizer", "optim")


def unwrap(optimizer: Any) -> SNROptimizerMixin | None:
    """The `SNRAdamW` / `SNRPreconditioner` inside ``optimizer`` (itself, or behind any chain
    of wrappers), or None if there is none.

    The innermost match wins: Lightning's ``LightningOptimizer`` poses as a subclass of the
    optimizer it wraps (``LightningSNRAdamW``), but its own state is not the optimizer's."""
    found = None
    seen: set[int] = set()
    opt = optimizer
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, SNROptimizerMixin):
            found = opt
        inner = (getattr(opt, attr, None) for attr in _WRAPPED_ATTRS)
        opt = next((o for o in inner if o is not None), None)
    return found
