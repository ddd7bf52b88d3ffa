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

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from snr_dist.cross_sample import MicrobatchStats
from snr_dist.distributors.dtensor import is_dtensor


def _remove_all(*handle_dicts: dict) -> None:
    for handles in handle_dicts:
        for h in handles.values():
            h.remove()
        handles.clear()


def _fsdp_forward_hook(capture: MicrobatchCapture, get_state, wanted: dict[int, Tensor]):
    ref = weakref.ref(capture)

    def hook(module, args, output) -> None:  # after FSDP2's pre-forward all-gather
        owner = ref()
        if owner is None:
            return
        for group in get_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                sharded = wanted.get(id(fsdp_param.sharded_param))
                if sharded is not None:
                    owner._hook_unsharded(fsdp_param, sharded)

    return hook


def _hook(target: weakref.WeakMethod, p: Tensor, direct: bool) -> Callable[[Tensor], None]:
    """``direct``: the hook is on ``p`` itself, so ``p.grad`` is the running sum of what it
    reports (a proxy's gradient accumulates on another tensor: the model's parameter)."""

    def hook(grad: Tensor) -> None:
        observe = target()
        if observe is not None:
            observe(p, grad, direct=direct)

    return hook


class MicrobatchCapture:
    """Hooks on the cross-sample parameters and the sums they collect between two steps."""

    def __init__(self, observe: Callable[[Tensor, Tensor], None]) -> None:
        """``observe``: a bound method (held weakly) called as ``observe(param, grad)``."""
        self._target = weakref.WeakMethod(observe)
        self.handles: dict[Tensor, RemovableHandle] = {}
        self.fsdp_handles: dict[object, RemovableHandle] = {}  # module and unsharded-param hooks
        self.stats: dict[Tensor, MicrobatchStats] = {}
        # params left unhooked because they did not require grad when last attached: torch's
        # optimizers train a parameter unfrozen later (``requires_grad_(True)``), so `wake`
        # hooks them once they do
        self.dormant: dict[Tensor, None] = {}
        self.fsdp_wanted: dict[int, Tensor] = {}  # sharded params observed through FSDP2
        self.fsdp_modules = 0  # FSDP2 modules hooked by `attach_fsdp`
        self.weight = 1.0
        self._finalizer = weakref.finalize(
            observe.__self__, _remove_all, self.handles, self.fsdp_handles
        )

    def attach(self, params: Iterable[Tensor]) -> None:
        """Hook exactly ``params`` (those with ``requires_grad``; the others once `wake` finds
        them unfrozen); unhook any others. FSDP2's
        sharded (DTensor) parameters only ever see reduced gradients: see `attach_fsdp`."""
        params = [p for p in params if not is_dtensor(p)]
        wanted = {p for p in params if p.requires_grad}
        self.dormant = {p: None for p in params if not p.requires_grad}
        for p in [p for p in self.handles if p not in wanted]:
            self.handles.pop(p).remove()
        for p in wanted:
            if p not in self.handles:
                self.handles[p] = p.register_hook(_hook(self._target, p, True))

    def wake(self) -> list[Tensor]:
        """Hook the dormant params that require grad now (unfrozen since); returns them."""
        woken = [p for p in self.dormant if p.requires_grad]
        for p in woken:
            del self.dormant[p]
            self.handles[p] = p.register_hook(_hook(self._target, p, True))
        return woken

    def attach_fsdp(self, model: nn.Module, wanted: Iterable[Tensor]) -> int:
        """Observe ``wanted`` sharded FSDP2 parameters through their *unsharded* counterparts.

        ``fully_shard`` reduce-scatters each gradient inside backward and hands the optimizer
        only the reduced shard, so a rank's own gradient exists only on FSDP2's unsharded
        parameter (one `nn.Parameter` per sharded one, created at its first all-gather and
        reused after). A forward hook on every FSDP module hooks those as they appear; the
        hook reports each contribution under the sharded parameter. Returns how many FSDP
        modules were found."""
        self.fsdp_wanted.clear()
        self.fsdp_wanted.update({id(p): p for p in wanted})
        wanted = self.fsdp_wanted  # the hooks read it: `set_fsdp_wanted` updates it in place
        found = 0
        for module in model.modules():
            get_state = getattr(module, "_get_fsdp_state", None)
            if get_state is None:
                continue
            found += 1
            handle = module.register_forward_hook(_fsdp_forward_hook(self, get_state, wanted))
            self.fsdp_handles[handle] = handle
        self.fsdp_modules += found
        return found

    def set_fsdp_wanted(self, wanted: Iterable[Tensor]) -> None:
        """The sharded params to observe after the groups changed (``add_param_group``)."""
        self.fsdp_wanted.clear()
        self.fsdp_wanted.update({id(p): p for p in wanted})

    def attach_proxies(self, pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
        """Hook each model parameter of ``(model_param, key)`` and report its gradients under
        ``key``: DeepSpeed ZeRO hands the optimizer flat partitions, and snr-dist keeps its
        state on row shards of its own (`snr_dist.optim.zero_view`), so a rank's own gradient
        exists only on the model's parameter, before ZeRO reduces it."""
        for model_param, key in pairs:
            if model_param.requires_grad and model_param not in self.fsdp_handles:
                handle = model_param.register_hook(_hook(self._target, key, False))
                self.fsdp_handles[model_param] = handle

    def _hook_unsharded(self, fsdp_param, sharded: Tensor) -> None:
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is None or not unsharded.requires_grad:  # frozen: nothing to observe yet
            return
        if unsharded not in self.fsdp_handles:
            self.fsdp_handles[unsharded] = unsharded.register_hook(
                _hook(self._target, sharded, False)
            )

    def close(self) -> None:
        self.dormant.clear()
        self.fsdp_wanted.clear()
        self.fsdp_modules = 0
        _remove_all(self.handles)
        _remove_all(self.fsdp_handles)
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
