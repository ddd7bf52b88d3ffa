"""What `SNRAdamW` and `SNRPreconditioner` share as torch optimizers: construction from one
`SNROptions`, copying and pickling, micro-batches, metrics, ``close()``."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from snr_dist import denormals
from snr_dist.distributors import Distributor
from snr_dist.estimators import Estimator, Moments
from snr_dist.optim.engine import SNREngine


def advance_steps(states: list[dict]) -> list[int]:
    """Add one to each state's ``step`` counter (one multi-tensor add, as torch's AdamW) and
    return the new counts."""
    counters = [st["step"] for st in states]
    torch._foreach_add_(counters, 1.0)
    if len(counters) > 1 and all(t.is_cpu for t in counters):  # one read, not one each
        return [int(t) for t in torch.stack(counters).tolist()]
    return [int(t.item()) for t in counters]


def step_tensor(value: Any) -> Tensor:
    """A saved ``step`` as the step counter (a CPU fp32 0-dim tensor); torch's optimizers also
    load state dicts whose ``step`` is a plain number."""
    return torch.as_tensor(value).to(device="cpu", dtype=torch.float32)


def param_states(state: Mapping) -> list[tuple[Tensor, dict]]:
    """The parameters' entries of an optimizer's ``state``; torch's optimizers also keep
    entries under other keys (a hook's ``optimizer.state["note"] = 1``), saved and loaded as
    they are."""
    return [(p, st) for p, st in state.items() if isinstance(p, Tensor)]


def split_tensors(values: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A parameter's state as its tensors (laid out by the distributor) and the rest."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    return tensors, {k: v for k, v in values.items() if k not in tensors}


def run_hooks(hooks: Mapping[int, Any], optimizer, state_dict: Any = None) -> Any:
    """Run torch's state-dict hooks of one kind in order: ``hook(optimizer)``, or, given a
    state dict, ``hook(optimizer, state_dict)``, whose non-None result replaces it."""
    for hook in list(hooks.values()):
        if state_dict is None:
            hook(optimizer)
            continue
        result = hook(optimizer, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


@contextlib.contextmanager
def hooks_off(optimizer: torch.optim.Optimizer, method: str) -> Iterator[None]:
    """Hold back ``optimizer``'s ``state_dict`` or ``load_state_dict`` pre- and post-hooks
    while torch's own method runs inside ours: ours runs them once, around the whole call."""
    names = [f"_optimizer_{method}_{when}_hooks" for when in ("pre", "post")]
    held = [getattr(optimizer, n) for n in names]
    for n in names:
        setattr(optimizer, n, OrderedDict())
    try:
        yield
    finally:
        for n, hooks in zip(names, held):
            setattr(optimizer, n, hooks)


class _SharedGroup:
    """An explicit process group inside a copied optimizer: the copy shares the handle (a
    process group belongs to the running job, not to one optimizer); pickling refuses."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo) -> _SharedGroup:
        return self

    def __reduce__(self):
        raise TypeError(
            "cannot pickle an snr-dist optimizer built with an explicit process_group: process "
            "groups belong to the running job. Save optimizer.state_dict() instead, or build "
            "the optimizer with process_group='auto' or None."
        )


class SNROptimizerMixin:
    """Shared machinery; the class using it sets ``self._engine`` in ``__init__`` and
    implements ``_moments()`` (where its temporal estimators find their EMAs)."""

    _engine: SNREngine
    skip_nonfinite: bool
    flush_denormals: bool
    process_group: Any

    @staticmethod
    def _moments() -> Moments:
        raise TypeError("subclasses say where their moments live")

    def _start_engine(self) -> None:
        self._engine = SNREngine(self, self._moments(), self.process_group)

    def _step_flush(self) -> denormals.flush_denormals:
        """The step's subnormal flush (`snr_dist.denormals`): on when asked for and safe for
        every param group."""
        return denormals.flush_denormals(
            self.flush_denormals and denormals.flush_allowed(self.param_groups)
        )

    # ------------------------------------------------------------------ public extras
    @property
    def distributor(self) -> Distributor:
        """The parallelism this optimizer runs in: ``.name``, ``.rank``, ``.world``,
        ``.owner(p)`` (the rank that refreshes ``p``'s tracker), ``.comm`` byte counters."""
        zero = getattr(self, "_zero", None)
        return (zero.inner if zero is not None else self)._engine.distributor

    @property
    def zero_view(self):
        """The `ZeroView` this optimizer steps through under DeepSpeed ZeRO, else None."""
        return getattr(self, "_zero", None)

    def estimator_of(self, p: Tensor, group: dict | None = None) -> Estimator:
        """The estimator serving ``p`` (its ``moments``, ``gates``, ``info`` and
        ``state_kinds``: see `snr_dist.estimators.base.Estimator`)."""
        engine = self._engine
        return engine.estimator(p, engine.group_of(p) if group is None else group)

    @property
    def nonfinite_skips(self) -> dict[Tensor, int]:
        """Steps skipped per parameter because its gradient held NaN or Inf (under DeepSpeed
        ZeRO with row shards: per model parameter)."""
        zero = getattr(self, "_zero", None)
        if zero is not None:
            lp = {p.shard: p.lp for bk in zero.buckets for p in bk.pieces}
            return {lp[s]: n for s, n in zero.inner._engine.nonfinite.skips.items()}
        return dict(self._engine.nonfinite.skips)

    def microbatch(self, weight: float = 1.0) -> contextlib.AbstractContextManager[None]:
        """Declare the number of samples in the next backward pass(es) (cross-sample estimator).

        Without it every backward pass is one micro-batch of weight 1, which is right when the
        micro-batches have equal sizes. With unequal sizes, compute each micro-batch loss as a
        *sum* over its samples (up to a common constant) and wrap its backward in
        ``with opt.microbatch(len(batch)):``.
        """
        return self._engine.capture.weighted(weight)

    def metrics(self, names: dict[Tensor, str] | None = None) -> dict[str, Any]:
        """Gate and SNR statistics per group and per parameter; see `snr_dist.metrics`. With a
        `snr_dist.stopping.StopMonitor` attached, its reading under ``"stop"``."""
        from snr_dist.metrics import collect_metrics

        zero = getattr(self, "_zero", None)
        if zero is not None:  # DeepSpeed ZeRO: the statistics live on this rank's row shards
            out = collect_metrics(zero.inner, zero.shard_names(names))
        else:
            out = collect_metrics(self, names)
        monitors = self.__dict__.get("_monitors") or []
        if monitors:
            out["stop"] = monitors[-1].metrics()
        return out

    def add_monitor(self, monitor) -> None:
        """Report ``monitor`` (a `snr_dist.stopping.StopMonitor` built on this optimizer) in
        `metrics`; its constructor calls this. Not saved with the optimizer: the monitor has
        its own state_dict."""
        self.__dict__.setdefault("_monitors", []).append(monitor)

    def sync_param_groups(self) -> None:
        """Re-read ``param_groups`` after a framework swapped the tensors in them (Megatron's
        fp32 main copies, DeepSpeed's flat partitions): tracker owners, hooks, lookups."""
        self._engine.sync_groups()

    def attach_fsdp(self, model) -> None:
        """Let the cross-sample estimator see each rank's own gradient under FSDP2: call once,
        after ``fully_shard`` and before the first backward (`snr_dist.fsdp.wrap` does it).
        FSDP2 hands the optimizer reduced gradient shards only; this hooks its unsharded
        parameters instead. A no-op without cross-sample FSDP2 parameters."""
        self._engine.attach_fsdp(model)

    def close(self) -> None:
        """Remove the gradient hooks of the cross-sample estimator (idempotent). A deleted
        optimizer removes them by itself when it is collected."""
        self._engine.close()

    # ------------------------------------------------------------------ copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        group = self.process_group
        state["skip_nonfinite"] = self.skip_nonfinite
        state["flush_denormals"] = self.flush_denormals
        state["process_group"] = (
            group if group is None or isinstance(group, str) else (_SharedGroup(group))
        )
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's own load_state_dict also ends here, with only "state" and "param_groups":
        # then the running engine stays (the caller re-syncs it).
        if "process_group" in state:
            group = state.pop("process_group")
            self.process_group = group.group if isinstance(group, _SharedGroup) else group
        if "skip_nonfinite" in state:
            self.skip_nonfinite = state.pop("skip_nonfinite")
        if "flush_denormals" in state:
            self.flush_denormals = state.pop("flush_denormals")
        super().__setstate__(state)
        if "_engine" not in self.__dict__:  # a copy or an unpickled optimizer
            self.skip_nonfinite = getattr(self, "skip_nonfinite", True)
            self.flush_denormals = getattr(self, "flush_denormals", True)
            self.process_group = getattr(self, "process_group", None)
            self._start_engine()
