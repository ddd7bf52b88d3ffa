"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): model + optimizer + step.

- The same keys on every rank, values independent of the world size: a checkpoint written by
  2 ranks loads on 1 and vice versa, under DDP, FSDP2 or one process, and the eigen-trackers
  are re-assigned to the new world (`SNRAdamW.global_state` / `load_global_state`, which
  the optimizer's distributor implements).
- Nothing half-loaded: the checkpoint's description (``snr_checkpoint.json``) is checked
  against the model and optimizer first (missing or extra parameters, shapes, SNR options),
  tensors are read into fresh buffers, and only then copied in.
- Nothing lost on failure: a checkpoint is written to a temporary directory and renamed into
  place once every rank has finished, so an interrupted save leaves the previous one intact
  (interrupted between the two renames of the swap, `load` and `settle` put the newest
  complete one back in place).

Works with `snr_dist.SNRAdamW` and with plain ``torch.optim`` optimizers (through DCP's own
``get_optimizer_state_dict``). One process needs no process group.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from snr_dist.distributors.dtensor import DTensor, is_dtensor
from snr_dist.options import SNROptions, complete_saved_group

META = "snr_checkpoint.json"
FORMAT = "snr-dist-checkpoint-v1"
_SNR_KEYS = tuple(k for k in SNROptions.model_fields if k != "snr_beta2") + ("betas",)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model or optimizer it is loaded into."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _dcp(fn, state_dict, path) -> None:
    """DCP warns that it assumes one process when none is initialised: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        fn(state_dict, checkpoint_id=str(path))


def param_names(model: nn.Module) -> dict[torch.Tensor, str]:
    """Parameter -> fully qualified name without the prefixes of the wrappers around
    ``model`` (DDP's ``module.``, torch.compile's ``_orig_mod.``), as DCP names model keys: a
    submodule that happens to be called ``module`` keeps its name."""
    prefix, inner = "", model
    while True:
        if isinstance(inner, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            prefix, inner = prefix + "module.", inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), nn.Module):  # torch.compile
            prefix, inner = prefix + "_orig_mod.", inner._orig_mod
        else:
            break
    return {p: name.removeprefix(prefix) for name, p in model.named_parameters()}


def _is_snr(optimizer) -> bool:
    from snr_dist.optim.snr_adamw import SNRAdamW

    return isinstance(optimizer, SNRAdamW)


def _group_meta(optimizer, names) -> list[dict[str, Any]]:
    groups = []
    for g in optimizer.param_groups:
        meta = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in g.items()
            if k != "params" and isinstance(v, (int, float, str, bool, tuple, list, type(None)))
        }
        meta["params"] = [names[p] for p in g["params"]]
        groups.append(meta)
    return groups


def _optimizer_payload(model, optimizer, names) -> dict[str, Any]:
    if not _is_snr(optimizer):
        from snr_dist.optim.preconditioner import SNRPreconditioner

        if isinstance(optimizer, SNRPreconditioner):
            raise TypeError(
                "snr_dist.checkpoint supports SNRAdamW and torch.optim optimizers; for "
                "SNRPreconditioner save optimizer.state_dict() with torch.save (one process)"
            )
        return get_optimizer_state_dict(model, optimizer)
    gathered = optimizer.global_state()
    return {"state": {names[p]: st for p, st in gathered.items()}}


def save(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of ``model``, ``optimizer`` and ``step`` to the directory ``path``.

    A collective under torch.distributed: every rank calls it with the same ``path``.
    """
    path = Path(path)
    names = param_names(model)
    payload = {
        "model": get_model_state_dict(model),
        "optim": _optimizer_payload(model, optimizer, names),
    }
    tmp = path.with_name(f"{path.name}.tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    _dcp(dcp.save, payload, tmp)
    if _rank() == 0:
        meta = {
            "format": FORMAT,
            "step": int(step),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "model": {k: list(v.shape) for k, v in payload["model"].items() if torch.is_tensor(v)},
            "optimizer": type(optimizer).__name__,
            "groups": _group_meta(optimizer, names),
            "extra": extra or {},
        }
        (tmp / META).write_text(json.dumps(meta, indent=1))
        old = path.with_name(f"{path.name}.old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return path


def settle(path: str | os.PathLike) -> Path | None:
    """Finish a `save` interrupted between its two renames (the previous checkpoint moved to
    ``<path>.old``, the new one complete in ``<path>.tmp``): the newest complete one becomes
    ``path`` again. Returns what was moved into place, if anything (one process: rank 0)."""
    path = Path(path)
    if (path / META).is_file():
        return None
    for candidate in (path.with_name(f"{path.name}.tmp"), path.with_name(f"{path.name}.old")):
        if (candidate / META).is_file():
            if path.exists():
                shutil.rmtree(path)
            candidate.rename(path)
            return candidate
    return None


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_file = Path(path) / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete snr-dist checkpoint (no {META})")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}")
    return meta


def _check_compatible(meta: dict, model_sd: dict, optimizer, names, path) -> None:
    saved, mine = (
        meta["model"],
        {k: list(v.shape) for k, v in model_sd.items() if torch.is_tensor(v)},
    )
    missing = sorted(set(mine) - set(saved))
    extra = sorted(set(saved) - set(mine))
    if missing or extra:
        raise CheckpointError(
            f"{path} was written for a different model: parameters missing from the "
            f"checkpoint {missing[:5]}, parameters the model lacks {extra[:5]}"
        )
    shapes = [k for k in mine if mine[k] != saved[k]]
    if shapes:
        k = shapes[0]
        raise CheckpointError(
            f"{path} was written for a different model: {k} has shape {saved[k]} in the "
            f"checkpoint but {mine[k]} in the model"
        )
    if meta["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(
            f"{path} holds {meta['optimizer']} state; the optimizer is {type(optimizer).__name__}"
        )
    groups = _group_meta(optimizer, names)
    if len(groups) != len(meta["groups"]):
        raise CheckpointError(
            f"{path} has {len(meta['groups'])} param groups; the optimizer has {len(groups)}"
        )
    for i, (old, new) in enumerate(zip(meta["groups"], groups)):
        if old["params"] != new["params"]:
            raise CheckpointError(f"{path}: param group {i} holds different parameters")
        if _is_snr(optimizer):
            old = complete_saved_group(old, optimizer.defaults)  # options it predates
            for k in _SNR_KEYS:
                if old.get(k) != new.get(k):
                    raise CheckpointError(
                        f"{path} was written with a different SNR configuration: param group "
                        f"{i} has {k}={old.get(k)!r} in the checkpoint but {new.get(k)!r} now"
                    )


def _clone_like(v):
    if is_dtensor(v):
        return DTensor.from_local(
            v.to_local().clone(),
            v.device_mesh,
            v.placements,
            run_check=False,
            shape=v.shape,
            stride=v.stride(),
        )
    return v.clone() if torch.is_tensor(v) else v


def _check_tracker_sides(md: dict, optimizer, by_name: dict, path: Path) -> None:
    """A saved eigen-tracker keeps the side of its matrix it was built on (its state says
    which), and a whole matrix can be tracked on either side; a row shard (FSDP2, ZeRO) only on
    its columns. ``basis_side="auto"`` picks the smaller side of a whole matrix, so a
    one-process checkpoint can hold row-side bases that a sharded run cannot take."""
    from snr_dist.distributors.dtensor import global_shape, is_row_sharded

    wrong = []
    for key, item in md.items():
        if not (key.startswith("optim.state.") and key.endswith(".basis")):
            continue
        name = key[len("optim.state.") : -len(".basis")]
        p = by_name.get(name)
        if p is None:
            continue
        shape = global_shape(p)
        cols = math.prod(shape[1:])
        sides = (cols,) if is_row_sharded(p) else (shape[0], cols)
        if item.size[0] not in sides:
            group = optimizer._engine.group_of(p)
            wrong.append(f"{name} (basis_side={group['basis_side']!r})")
    if wrong:
        raise CheckpointError(
            f"{path}: the eigen-trackers of {', '.join(wrong)} were saved on the rows of their "
            "matrices, which this run holds as row shards and can track on the columns only "
            "(basis_side='auto' picks the smaller side of a whole matrix); nothing was loaded. "
            "Set basis_side='cols' in the run that saves as well"
        )


def load(path: str | os.PathLike, model: nn.Module, optimizer) -> int:
    """Load a checkpoint written by `save` (any world size) and return its step."""
    path = Path(path)
    if _rank() == 0:
        settle(path)
    _barrier()
    meta = read_meta(path)
    names = param_names(model)
    model_sd = get_model_state_dict(model)
    _check_compatible(meta, model_sd, optimizer, names, path)
    by_name = {n: p for p, n in names.items()}
    target: dict[str, Any] = {"model": {k: _clone_like(v) for k, v in model_sd.items()}}
    if _is_snr(optimizer):
        md = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        _check_tracker_sides(md, optimizer, by_name, path)
        state: dict[str, dict[str, Any]] = {}
        for key, item in md.items():
            if not key.startswith("optim.state."):
                continue
            name, _, sub = key[len("optim.state.") :].rpartition(".")
            tmpl = optimizer.state_template(by_name[name], sub, item.size, item.properties.dtype)
            state.setdefault(name, {})[sub] = tmpl
        target["optim"] = {"state": state}
    else:
        target["optim"] = get_optimizer_state_dict(model, optimizer)
    _dcp(dcp.load, target, path)
    # Everything was read: now, and only now, change the model and the optimizer.
    set_model_state_dict(model, target["model"], options=StateDictOptions(strict=True))
    if _is_snr(optimizer):
        for group, saved in zip(optimizer.param_groups, meta["groups"]):
            for k in ("lr", "eps", "weight_decay", "maximize", "foreach"):
                if k in saved:
                    group[k] = saved[k]
        loaded = {by_name[n]: st for n, st in target["optim"]["state"].items()}
        optimizer.load_global_state(loaded)
    else:
        set_optimizer_state_dict(model, optimizer, target["optim"])
    _barrier()
    return int(meta["step"])
