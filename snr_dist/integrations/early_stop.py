"""The validation-free stop in framework loops: which optimizer to watch, over which group.

Frameworks wrap the optimizer a user built (Accelerate's ``AcceleratedOptimizer``, Lightning's
``LightningOptimizer``, DeepSpeed's ZeRO optimizers); the gradients a `StopMonitor` must read
are those of the innermost torch optimizer, the one whose ``step`` runs last. Under ZeRO (and
DeepSpeed's bf16 optimizer) that optimizer holds this rank's flat partitions, so its partial
sums are joined over the wrapper's data-parallel group; FSDP2's DTensors carry their mesh, and
DDP's parameters are whole on every rank. The framework callbacks
(`snr_dist.integrations.transformers.StopMonitorCallback`,
`snr_dist.integrations.lightning.StopMonitorCallback`) and ``snr-dist train`` build their
monitor here, and keep its state beside their checkpoints with `save` / `load` (one file per
rank: a sharded run's statistics differ between ranks).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from snr_dist.stopping import StopMonitor

# where wrappers keep the optimizer they wrap (snr_dist.integrations.wrappers lists the same)
_WRAPPED_ATTRS = ("_optimizer", "optimizer", "optim")


def innermost(optimizer: Any) -> tuple[torch.optim.Optimizer, Any]:
    """``(the innermost torch optimizer, the data-parallel group of a partitioning wrapper on
    the way there or None)``."""
    group = None
    seen: set[int] = set()
    opt, last = optimizer, None
    while opt is not None and id(opt) not in seen:
        seen.add(id(opt))
        if isinstance(opt, torch.optim.Optimizer):
            last = opt
        # DeepSpeed's ZeRO 1-3 and bf16 optimizers partition the fp32 state over this group
        pg = getattr(opt, "dp_process_group", None)
        if pg is not None and group is None:
            group = pg
        inner = (getattr(opt, attr, None) for attr in _WRAPPED_ATTRS)
        opt = next((o for o in inner if o is not None and o is not opt), None)
    if last is None:
        raise TypeError(
            f"no torch optimizer inside {type(optimizer).__name__}: the stop monitor reads the "
            "gradients a torch.optim.Optimizer steps"
        )
    if group is not None and (not dist.is_initialized() or dist.get_world_size(group) == 1):
        group = None
    return last, group


def build(optimizer: Any, dataset_size: int, batch_size: int, **options: Any) -> StopMonitor:
    """A `StopMonitor` on the optimizer inside ``optimizer``'s wrappers (``options``: its
    keyword arguments; ``process_group`` given there wins over the one found)."""
    inner, group = innermost(optimizer)
    options.setdefault("process_group", group)
    return StopMonitor(inner, dataset_size=dataset_size, batch_size=batch_size, **options)


def file_name() -> str:
    """This rank's file name in a checkpoint folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return f"stop-monitor.rank{rank}.pt"


def _path(folder: str | Path) -> Path:
    return Path(folder) / file_name()


def save(monitor: StopMonitor, folder: str | Path, step: int) -> Path:
    """This rank's monitor state into ``folder`` (atomically), tagged with ``step``."""
    path = _path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save({"steps": int(step), "world": world, "monitor": monitor.state_dict()}, tmp)
    os.replace(tmp, path)
    return path


def load(monitor: StopMonitor, folder: str | Path | None, step: int) -> bool:
    """Restore this rank's state saved at ``step`` from ``folder``; False (and a warning) when
    there is none for that step, or it was saved by another number of ranks (each rank's
    state covers its own share of the model), and the monitor starts afresh."""
    path = None if folder is None else _path(folder)
    saved = torch.load(path, weights_only=False) if path is not None and path.is_file() else None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if saved is not None and saved["steps"] == int(step) and saved.get("world", world) == world:
        monitor.load_state_dict(saved["monitor"])
        return True
    why = "no stop-monitor state for step"
    if saved is not None and saved["steps"] == int(step):
        why = f"stop-monitor state of {saved['world']} ranks (now {world}) for step"
    warnings.warn(
        f"{folder}: {why} {step}; the monitor starts afresh (its readings differ from an "
        "uninterrupted run's for a few hundred steps)",
        stacklevel=2,
    )
    return False
