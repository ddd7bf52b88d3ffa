"""Hugging Face Accelerate: `prepare`, ``accelerator.prepare`` for scripts that train with an
snr-dist optimizer.

Under DDP (``MULTI_CPU``, ``MULTI_GPU``) Accelerate wraps the model in DDP and the optimizer in
an ``AcceleratedOptimizer``; SNRAdamW needs nothing more (its temporal estimator sees the
reduced gradient, as every rank does; the cross-sample estimator needs
``process_group=torch.distributed.group.WORLD``, which `prepare` checks).

Under Accelerate's DeepSpeed plugin, ``accelerator.prepare`` calls ``deepspeed.initialize``
itself, with the optimizer as DeepSpeed's client optimizer, so it misses what
`snr_dist.deepspeed.initialize` does around that call:

- the JSON's ``"snr_preconditioner"`` block (with its ``"optimizer"`` block when the script
  passes Accelerate's ``DummyOptim``, the optimizer "from the config") configures SNRAdamW;
- DeepSpeed's unfused bf16/fp16 optimizer (ZeRO stage 0) "initialises the optimizer states"
  with one step on zero gradients while it is built; snr-dist skips that step (it would decay
  the weights and advance the bias corrections);
- ZeRO 1-3 and the bf16 optimizer hand the client optimizer flat partitions that cut across
  tensors. The diagonal temporal mode is elementwise and runs on them as is; subspace mode
  and the cross-sample estimator need whole rows and run on snr-dist's row shards, attached
  with ``optimizer.attach_zero`` after DeepSpeed has built its optimizer
  (`snr_dist.optim.zero_view`).

Under FSDP2 Accelerate shards the model after the optimizer was built and puts the DTensors
in its groups: `prepare` moves the optimizer to the sharded distributor there and, for the
cross-sample estimator, hooks FSDP2's unsharded parameters (`SNRAdamW.attach_fsdp`). FSDP1
is refused before anything is wrapped.

`prepare` does all of it; `attach` does the DeepSpeed part for an optimizer that
``accelerator.prepare`` already returned.
"""

from __future__ import annotations

from typing import Any

try:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, DummyOptim
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snr_dist.integrations.accelerate needs the accelerate package: pip install 'snr-dist[hf]'"
    ) from None

from torch import nn

from snr_dist import deepspeed as snr_ds
from snr_dist.integrations.wiring import adopt_fsdp2, attach_deepspeed, deferred_steps
from snr_dist.optim.base import SNROptimizerMixin

__all__ = ["attach", "prepare"]


def _check_group(accelerator: Accelerator, opt: SNROptimizerMixin) -> None:
    """The cross-sample estimator pools the ranks' own gradients: it needs their group."""
    world = accelerator.num_processes
    if world <= 1 or opt.distributor.world > 1:
        return
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        return  # the group comes from DeepSpeed / the DTensors' mesh
    if any(g["estimator"] == "cross_sample" for g in opt.param_groups):
        raise ValueError(
            f"snr-dist: estimator='cross_sample' under {accelerator.distributed_type} with "
            f"{world} processes needs the data-parallel group, but this optimizer runs local "
            f"to its rank (process_group={opt.process_group!r}). Create the Accelerator first, "
            "then the optimizer with process_group=torch.distributed.group.WORLD"
        )


def _check_fsdp(accelerator: Accelerator) -> None:
    plugin = accelerator.state.fsdp_plugin
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        raise ValueError(
            f"snr-dist: Accelerate's FSDP plugin with fsdp_version={version} (FSDP1) hands the "
            "optimizer flattened parameter shards, so per-matrix statistics cannot be formed. "
            "Use FullyShardedDataParallelPlugin(fsdp_version=2) (FSDP2), DDP or DeepSpeed"
        )


def _from_config(accelerator: Accelerator, objects: list[Any]) -> list[Any]:
    """The DeepSpeed config's ``"snr_preconditioner"`` block (and its ``"optimizer"`` block
    for a ``DummyOptim``): build SNRAdamW from them in the ``DummyOptim``'s place, or check
    that the SNR optimizer given agrees with the block; either way the blocks leave the
    config DeepSpeed gets."""
    cfg = accelerator.state.deepspeed_plugin.deepspeed_config
    dummies = [i for i, o in enumerate(objects) if isinstance(o, DummyOptim)]
    snrs = [o for o in objects if isinstance(o, SNROptimizerMixin)]
    if "snr_preconditioner" not in cfg or not (dummies or snrs):
        return objects
    had_adam = "optimizer" in cfg
    adam, block = snr_ds.take_blocks(cfg)
    objects = list(objects)
    for i in dummies:
        dummy = objects[i]
        if adam is None:
            raise snr_ds.DeepSpeedConfigError(
                'DummyOptim takes the optimizer from the DeepSpeed config: it needs an "optimizer" '
                'block of type "Adam" or "AdamW" beside the "snr_preconditioner" block'
            )
        kw = dict(adam)
        for key in ("lr", "weight_decay"):  # "auto": the DummyOptim's, as Accelerate fills them
            if kw.get(key) == "auto":
                kw[key] = getattr(dummy, key)
        objects[i] = snr_ds.from_blocks(cfg, dummy.params, kw, block)
    for opt in snrs:
        if had_adam:
            raise snr_ds.DeepSpeedConfigError(
                'the DeepSpeed config has an "optimizer" block and the script passes an optimizer: '
                "pass accelerate.utils.DummyOptim(model.parameters()) to build SNRAdamW from the "
                'config\'s "optimizer" and "snr_preconditioner" blocks, or remove the "optimizer" '
                "block"
            )
        snr_ds.check_agrees(
            cfg,
            opt,
            block,
            "passed to prepare",
            "build it with those options (SNRAdamW(..., snr=block)), or pass "
            'accelerate.utils.DummyOptim(model.parameters()) with an "optimizer" block to build '
            "it from the config",
        )
    cfg["zero_allow_untested_optimizer"] = True
    return objects


def attach(accelerator: Accelerator, optimizer: Any) -> None:
    """Under Accelerate's DeepSpeed plugin with ZeRO 1-3 or bf16: run ``optimizer`` (as
    returned by ``accelerator.prepare``) on snr-dist's row shards when it needs whole rows
    (subspace mode, cross-sample estimator). Elsewhere, and when already attached, a no-op.
    Call it on every rank, before the first step."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    if attach_deepspeed(optimizer) is None:
        raise TypeError(
            "attach: expected the optimizer accelerator.prepare returned for an SNRAdamW, got "
            f"{type(optimizer).__name__}"
        )


def prepare(accelerator: Accelerator, *objects: Any, **kwargs: Any) -> Any:
    """``accelerator.prepare(*objects, **kwargs)`` (same return value) that also wires every
    snr-dist optimizer among ``objects`` into what Accelerate built (see the module
    docstring); under DeepSpeed a ``DummyOptim`` with a ``"snr_preconditioner"`` block in the
    config becomes SNRAdamW. Call it on every rank, as ``accelerator.prepare``."""
    kind = accelerator.distributed_type
    deepspeed = kind == DistributedType.DEEPSPEED
    fsdp = kind == DistributedType.FSDP
    if deepspeed:
        objects = tuple(_from_config(accelerator, list(objects)))
    if fsdp:
        _check_fsdp(accelerator)
    opts = [o for o in objects if isinstance(o, SNROptimizerMixin)]
    for opt in opts:
        _check_group(accelerator, opt)
    with deferred_steps(opts if deepspeed else ()):
        out = accelerator.prepare(*objects, **kwargs)
    results = out if len(objects) > 1 else (out,)  # accelerate unpacks a single object
    model = next((r for r in results if isinstance(r, nn.Module)), None)
    for obj, res in zip(objects, results):
        if not isinstance(obj, SNROptimizerMixin):
            continue
        if deepspeed:
            attach(accelerator, res)
        elif fsdp:
            if model is None:
                raise ValueError(
                    "snr-dist under FSDP2: prepare the model and the optimizer in one call "
                    "(the optimizer's parameters become the model's DTensors there)"
                )
            adopt_fsdp2(model, res)
    return out
