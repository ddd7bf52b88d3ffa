"""FSDP2 in one call: shard a model with ``fully_shard`` and build its SNRAdamW.

``SNRAdamW(model.parameters())`` already detects FSDP2's DTensor parameters by itself; this is
the one place that applies the sharding, so training code does not need to know how the model
is sharded (the torchtitan pattern). Blocks are sharded first, then the root.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from snr_dist.optim.snr_adamw import SNRAdamW


def default_mesh() -> DeviceMesh:
    """A 1-D mesh over the default process group, on CUDA if available, else CPU."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError(
            "snr_dist.fsdp.wrap needs an initialised process group: call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def _blocks(model: nn.Module, modules) -> list[nn.Module]:
    if modules is None:  # every module that owns parameters directly, e.g. Linear, Embedding
        return [
            m
            for m in model.modules()
            if m is not model and any(True for _ in m.parameters(recurse=False))
        ]
    if isinstance(modules, type) or (
        isinstance(modules, tuple) and all(isinstance(t, type) for t in modules)
    ):
        return [m for m in model.modules() if m is not model and isinstance(m, modules)]
    out = list(modules)
    bad = [type(m).__name__ for m in out if not isinstance(m, nn.Module)]
    if bad:
        raise TypeError(f"modules must be nn.Module instances or classes, got {bad}")
    return out


def shard(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    modules: Iterable[nn.Module] | type | tuple[type, ...] | None = None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """``fully_shard`` each of ``modules`` (see `wrap`), then the root; returns ``model``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = default_mesh() if mesh is None else mesh
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
    )
    for block in _blocks(model, modules):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def wrap(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    modules: Iterable[nn.Module] | type | tuple[type, ...] | None = None,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    lr: float = 1e-3,
    weight_decay: float = 1e-2,
    **snr_options: Any,
) -> tuple[nn.Module, SNRAdamW]:
    """Shard ``model`` with FSDP2 (each of ``modules``, then the root) and build SNRAdamW.

    Args:
        model: the model (already on its device); sharded in place.
        mesh: a 1-D DeviceMesh; default: all ranks of the default process group.
        modules: the blocks to shard individually: module instances, a module class (or tuple
            of classes) to match, or None for every module that holds parameters directly.
        mp_policy: a ``torch.distributed.fsdp.MixedPrecisionPolicy``, e.g. bf16 compute with
            fp32 gradient reduction; parameters, and so the optimizer's statistics, stay fp32.
        lr: passed to `snr_dist.SNRAdamW`.
        weight_decay: passed to `snr_dist.SNRAdamW`.
        **snr_options: passed to `snr_dist.SNRAdamW`.

    Returns:
        ``(model, optimizer)``.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from snr_dist.optim.snr_adamw import SNRAdamW

    mesh = default_mesh() if mesh is None else mesh
    kwargs = dict(
        mesh=mesh,
        reshard_after_forward=reshard_after_forward,
        mp_policy=mp_policy or MixedPrecisionPolicy(),
    )
    for block in _blocks(model, modules):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    opt = SNRAdamW(model.parameters(), lr=lr, weight_decay=weight_decay, **snr_options)
    opt.attach_fsdp(model)  # the cross-sample estimator observes each rank's own gradient
    return model, opt
