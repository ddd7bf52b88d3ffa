"""Hugging Face Accelerate: `prepare`, ``accelerator.prepare`` for scripts that train with an
snr-dist optimizer.

Under DDP (``MULTI_CPU``, ``MULTI_GPU``) Accelerate wraps the model in DDP and the optimizer in
an ``AcceleratedOptimizer``; SNRAdamW needs nothing more (its temporal estimator sees the
reduced gradient, as every rank does; the cross-sample estimator needs
``process_group=torch.distributed.group.WORLD``, which `prepare` checks).

Under Accelerate's DeepSpeed plugin, ``accelerator.prepare`` calls ``deepspeed.initialize``
itself, with the optimizer as DeepSpeed's client optimizer, so it misses the two things
`snr_dist.deepspeed.initialize` adds around that call:

- DeepSpeed's unfused bf16/fp16 optimizer (ZeRO stage 0) "initialises the optimizer states"
  with one step on zero gradients while it is built; snr-dist skips that step (it would decay
  the weights and advance the bias corrections);
- ZeRO 1-3 and the bf16 optimizer hand the client optimizer flat partitions that cut across
  tensors. The diagonal temporal mode is elementwise and runs on them as is; subspace mode
  and the cross-sample estimator need whole rows and run on snr-dist's row shards, attached
  with ``optimizer.attach_zero`` after DeepSpeed has built its optimizer
  (`snr_dist.optim.zero_view`).

`prepare` does both; `attach` does the second for an optimizer that ``accelerator.prepare``
already returned.
"""

from __future__ import annotations

from typing import Any

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snr_dist.integrations.accelerate needs the accelerate package: pip install 'snr-dist[hf]'"
    ) from None

from snr_dist.optim.base import SNROptimizerMixin
from snr_dist.optim.snr_adamw import SNRAdamW

__all__ = ["attach", "prepare"]


def _needs_rows(opt: SNROptimizerMixin) -> bool:
    """Subspace mode or the cross-sample estimator in any param group: whole rows needed."""
    return any(
        g["mode"] == "subspace" or g["estimator"] == "cross_sample" for g in opt.param_groups
    )


def _check_group(accelerator: Accelerator, opt: SNROptimizerMixin) -> None:
    """The cross-sample estimator pools the ranks' own gradients: it needs their group."""
    world = accelerator.num_processes
    if world <= 1 or opt.distributor.world > 1:
        return
    if any(g["estimator"] == "cross_sample" for g in opt.param_groups):
        raise ValueError(
            f"snr-dist: estimator='cross_sample' under {accelerator.distributed_type} with "
            f"{world} processes needs the data-parallel group, but this optimizer runs local "
            f"to its rank (process_group={opt.process_group!r}). Create the Accelerator first, "
            "then the optimizer with process_group=torch.distributed.group.WORLD"
        )


def attach(accelerator: Accelerator, optimizer: Any) -> None:
    """Under Accelerate's DeepSpeed plugin with ZeRO 1-3 or bf16: run ``optimizer`` (as
    returned by ``accelerator.prepare``) on snr-dist's row shards when it needs whole rows
    (subspace mode, cross-sample estimator). Elsewhere, and when already attached, a no-op.
    Call it on every rank, before the first step."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    wrapper = getattr(optimizer, "optimizer", optimizer)  # DeepSpeedOptimizerWrapper
    client = getattr(wrapper, "optimizer", None)
    if isinstance(wrapper, SNROptimizerMixin):  # ZeRO stage 0, fp32: the client optimizer
        return
    if not isinstance(client, SNRAdamW):
        raise TypeError(
            "attach: expected the optimizer accelerator.prepare returned for an SNRAdamW, got "
            f"{type(optimizer).__name__} wrapping {type(wrapper).__name__}"
        )
    if client.zero_view is not None or not _needs_rows(client):
        return
    client.attach_zero(wrapper, getattr(wrapper, "dp_process_group", None))


def prepare(accelerator: Accelerator, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)`` (same return value) that also wires every
    snr-dist optimizer among ``objects`` into what Accelerate built (see the module
    docstring). Call it on every rank, as ``accelerator.prepare``."""
    opts = [o for o in objects if isinstance(o, SNROptimizerMixin)]
    for opt in opts:
        _check_group(accelerator, opt)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    deferred = [o for o in opts if isinstance(o, SNRAdamW)] if deepspeed else []
    for opt in deferred:
        opt._defer_steps = True  # see snr_dist.deepspeed.initialize
    try:
        out = accelerator.prepare(*objects, **kwargs)
    finally:
        for opt in deferred:
            opt._defer_steps = False
    if deepspeed:
        results = out if len(objects) > 1 else (out,)  # accelerate unpacks a single object
        for obj, res in zip(objects, results):
            if isinstance(obj, SNRAdamW):
                attach(accelerator, res)
    return out
