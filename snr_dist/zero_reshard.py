"""DeepSpeed ZeRO 1-3 checkpoints loaded on another number of data-parallel ranks.

DeepSpeed (0.19) refuses to load ZeRO optimizer state that another data-parallel world size
saved; its way round is an offline conversion to a "universal checkpoint", which knows Adam's
two moments and nothing else. `load_checkpoint` is ``engine.load_checkpoint`` with one step
replaced when the world size changed, the step that reads the per-rank optimizer files:

1. every saved rank's file is read, and each parameter's fp32 master weights and each tensor
   of elementwise optimizer state on ZeRO's flat partitions (torch's AdamW, SNRAdamW's
   diagonal mode) are joined whole, as DeepSpeed's own ``zero_to_fp32`` joins the weights;
2. this rank's partitions are cut from them as ZeRO partitions now;
3. state on snr-dist's row shards (subspace mode and the cross-sample estimator,
   `snr_dist.optim.zero_view`) is rebuilt by `ZeroView.resharded`: each parameter's rows
   where this world cuts them, each tracker's partial sums whole on its owner here;
4. DeepSpeed's own loader receives the result as this rank's state dict of the current world,
   and does the rest as for a checkpoint of this world (fp16/bf16 copies, ZeRO-3's persistent
   parameters, the learning-rate scheduler, the client state).

On the same world size nothing changes: DeepSpeed's loader reads the files as it always did.
Supported: ``DeepSpeedZeroOptimizer`` (stages 1, 2) and ``DeepSpeedZeroOptimizer_Stage3``,
data parallelism only, without ``round_robin_gradients``, ``elastic_checkpoint`` or parameter
alignment padding; anything else is refused before anything is loaded.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

# DeepSpeed's checkpoint keys (deepspeed.checkpoint.constants), spelled here so that this
# module imports without DeepSpeed
_BASE = "base_optimizer_state"
_FP32 = "single_partition_of_fp32_groups"
_OPTIM = "optimizer_state_dict"
_FP32_FLAT = "fp32_flat_groups"


class ReshardError(ValueError):
    """A ZeRO checkpoint that snr-dist cannot load on this number of ranks, with the reason."""


def saved_world(engine, load_dir: str | os.PathLike, tag: str) -> int:
    """How many data-parallel ranks wrote the ZeRO checkpoint ``load_dir/tag`` (one optimizer
    file each); 0 when there are none."""
    n = 0
    bf16 = engine.bfloat16_enabled()
    while any(
        os.path.isfile(
            engine._get_rank_zero_ckpt_name(str(load_dir), tag, engine.checkpoint_mp_rank, n, b)
        )
        for b in (bf16, not bf16)
    ):
        n += 1
    return n


def _latest(load_dir: str | os.PathLike) -> str | None:
    path = os.path.join(str(load_dir), "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip()


def load_checkpoint(
    engine,
    load_dir: str | os.PathLike,
    tag: str | None = None,
    load_module_strict: bool = True,
    load_optimizer_states: bool = True,
    load_lr_scheduler_states: bool = True,
    load_module_only: bool = False,
    custom_load_fn=None,
):
    """``engine.load_checkpoint`` (same arguments, same return value) that also loads a ZeRO
    checkpoint written by another number of data-parallel ranks (see the module docstring).
    A collective: every rank calls it."""
    original = type(engine).load_checkpoint
    kwargs = dict(
        load_module_strict=load_module_strict,
        load_optimizer_states=load_optimizer_states,
        load_lr_scheduler_states=load_lr_scheduler_states,
        load_module_only=load_module_only,
        custom_load_fn=custom_load_fn,
    )
    tag = tag if tag is not None else _latest(load_dir)
    zero = engine.zero_optimization() and not engine.load_universal_checkpoint()
    if tag is None or not zero or not load_optimizer_states or load_module_only:
        return original(engine, load_dir, tag, **kwargs)
    opt = engine.optimizer
    group = opt.dp_process_group
    world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
    old = saved_world(engine, load_dir, tag)
    if old in (0, world):
        return original(engine, load_dir, tag, **kwargs)
    _check_supported(engine, opt)
    names = [
        engine._get_rank_zero_ckpt_name(str(load_dir), tag, engine.checkpoint_mp_rank, r, bf16)
        for r in range(old)
        for bf16 in (engine.bfloat16_enabled(), not engine.bfloat16_enabled())
    ]
    files = [n for n in names if os.path.isfile(n)]
    saved = [
        torch.load(f, map_location="cpu", weights_only=False, mmap=True)["optimizer_state_dict"]
        for f in files
    ]
    mine = _stage3_state(opt, saved) if _is_stage3(opt) else _stage12_state(opt, saved)

    def load_zero(load_dir_, tag_, load_optimizer_states=True):
        states: list[Any] = [None] * world
        states[rank] = mine
        opt.load_state_dict(
            state_dict_list=states,
            load_optimizer_states=True,
            load_from_fp32_weights=engine.zero_load_from_fp32_weights(),
            checkpoint_folder=None,
            load_serial=None,
            param_shapes=engine._get_zero_param_shapes(),
        )
        return True

    # ZeRO-3 writes its model-states file per rank; a rank the old world did not have reads
    # rank 0's, as DeepSpeed does for universal checkpoints (the module's own parameters are
    # placeholders there: they come from the fp32 partitions above)
    patched = {"_load_zero_checkpoint": load_zero}
    if _is_stage3(opt):
        patched["_get_all_ckpt_names"] = lambda path, tag_: _model_files(engine, path, tag_)
    for name, fn in patched.items():
        setattr(engine, name, fn)
    try:
        return original(engine, load_dir, tag, **kwargs)
    finally:
        for name in patched:
            delattr(engine, name)


def _model_files(engine, path, tag) -> list[str]:
    import glob

    pattern = engine._get_ckpt_name(path, tag, mp_placeholder="*", pp_placeholder="0")
    return sorted(glob.glob(pattern))


def _is_stage3(opt) -> bool:
    return hasattr(opt, "fp32_partitioned_groups_flat")


def _check_supported(engine, opt) -> None:
    why = None
    if not (_is_stage3(opt) or hasattr(opt, "single_partition_of_fp32_groups")):
        why = f"DeepSpeed's {type(opt).__name__} (snr-dist reshards ZeRO stages 1-3)"
    elif engine.mp_world_size > 1:
        why = "model parallelism (snr-dist reshards data-parallel ZeRO checkpoints)"
    elif getattr(opt, "round_robin_gradients", False):
        why = "zero_optimization.round_robin_gradients (its order depends on the world size)"
    elif getattr(opt, "elastic_checkpoint", False):
        why = "zero_optimization.elastic_checkpoint"
    elif any(any(p) for p in getattr(opt, "round_robin_bit16_padding", [])):
        why = "zero_optimization.parameter_alignment padding"
    elif getattr(opt, "swap_optimizer", False) or getattr(opt, "offload_optimizer", False):
        why = "optimizer offload"
    elif _is_stage3(opt) and any(not p.requires_grad for p in engine.module.parameters()):
        why = "frozen parameters under ZeRO-3 (each rank's file holds its fragments of them)"
    if why is not None:
        raise ReshardError(
            f"this DeepSpeed checkpoint was written by another number of data-parallel ranks, "
            f"and snr-dist cannot reshard it with {why}: resume on the number of ranks that "
            "wrote it"
        )


# ---------------------------------------------------------------------- flat partitions
def _params(opt) -> list[tuple[Tensor, str, int]]:
    """``(parameter, name, numel)`` in the order ZeRO lays parameters out in its flat
    partitions, group by group (the same order on every world size)."""
    groups = opt.fp16_groups if _is_stage3(opt) else opt.bit16_groups
    return [
        (lp, opt.param_names[lp], int(getattr(lp, "ds_numel", lp.numel())))
        for group in groups
        for lp in group
    ]


def _cut(opt, whole: dict[str, Tensor], like: list[Tensor]) -> list[Tensor]:
    """This rank's flat partitions (shaped like ``like``, padding zero) of the parameters'
    ``whole`` flattened values."""
    from snr_dist.optim.zero_view import discover

    out = []
    for (_, _, entries), shape_like in zip(discover(opt), like):
        part = torch.zeros(shape_like.numel(), dtype=torch.float32)
        for lp, start, count, hp_offset in entries:
            if count > 0:
                src = whole[opt.param_names[lp]]
                part[hp_offset : hp_offset + count] = src[start : start + count]
        out.append(part)
    return out


def _joined_stage12(opt, chunks: list[list[Tensor]], lengths: list[list[int]]) -> dict:
    """Whole flattened values per parameter name from every saved rank's per-group chunks
    (``chunks[rank][group]``, of which the first ``lengths[rank][group]`` elements hold
    parameters: ZeRO pads the end of a group)."""
    whole = {}
    for g, group in enumerate(opt.bit16_groups):
        stream = torch.cat([c[g].reshape(-1)[: n[g]].float() for c, n in zip(chunks, lengths)])
        offset = 0
        for lp in group:
            numel = lp.numel()
            whole[opt.param_names[lp]] = stream[offset : offset + numel]
            offset += numel
        if offset != stream.numel():
            raise ReshardError(
                f"param group {g}: the checkpoint holds {stream.numel()} values, the model "
                f"{offset}: resume with the model that saved it"
            )
    return whole


def _joined_stage3(opt, streams: list[Tensor]) -> dict:
    """Whole flattened values per parameter name from every saved rank's concatenated
    sub-group partitions (ZeRO-3 gives each rank ``ceil(numel / world)`` of each parameter,
    the last rank's padded)."""
    world = len(streams)
    whole, offset = {}, 0
    for _, name, numel in _params(opt):
        size = math.ceil(numel / world)
        whole[name] = torch.cat([s[offset : offset + size].float() for s in streams])[:numel]
        offset += size
    if any(offset != s.numel() for s in streams):
        raise ReshardError(
            f"the checkpoint's ZeRO-3 partitions hold {streams[0].numel()} values per rank, "
            f"the model {offset} for {world} ranks: resume with the model that saved it"
        )
    return whole


def _client_state(opt, saved_client: list[dict], whole_of, like: list[Tensor]) -> dict:
    """The client optimizer's state dict for this rank's flat partitions (``like``), from every
    saved rank's: tensors the size of a partition are elementwise state (joined and cut as the
    weights are), everything else is the same on every rank (step counts)."""
    zero_view = getattr(opt.optimizer, "zero_view", None)
    if zero_view is not None:  # snr-dist's row shards
        return zero_view.resharded(saved_client)
    first = saved_client[0]
    keys = list(dict.fromkeys(k for st in first["state"].values() for k in st))
    state: dict[int, dict[str, Any]] = {i: {} for i in range(len(like))}
    group_of = _group_of_partition(opt, len(like))
    old_groups = _old_group_of(first)
    for key in keys:
        values = [[st["state"][i].get(key) for i in sorted(st["state"])] for st in saved_client]
        sample = values[0][0]
        if any(v is None for vs in values for v in vs):
            raise ReshardError(
                f"optimizer state {key!r} is missing for some partitions of the checkpoint"
            )
        if torch.is_tensor(sample) and sample.dim() > 0:
            for new, part in enumerate(_cut(opt, whole_of(values), like)):
                state[new][key] = part
        else:  # the same for every partition of a group: the group's first (a copy each:
            # a step count shared by two partitions would count twice)
            for new in range(len(like)):
                index = old_groups.index(group_of[new]) if group_of[new] in old_groups else 0
                value = values[0][index]
                state[new][key] = value.clone() if torch.is_tensor(value) else value
    groups = []
    for g, old in enumerate(first["param_groups"]):
        groups.append({**old, "params": [i for i in range(len(like)) if group_of[i] == g]})
    return {"state": state, "param_groups": groups}


def _group_of_partition(opt, n: int) -> list[int]:
    if _is_stage3(opt):
        return [opt.sub_group_to_group_id[i] for i in range(n)]
    return list(range(n))


def _old_group_of(client_sd: dict) -> list[int]:
    """The param group of each saved state index."""
    out: dict[int, int] = {}
    for g, group in enumerate(client_sd["param_groups"]):
        for i in group["params"]:
            out[i] = g
    return [out[i] for i in sorted(out)]


def _stage12_state(opt, saved: list[dict]) -> dict:
    fp32 = [sd[_FP32] for sd in saved]
    lengths = [[t.numel() for t in ranks] for ranks in fp32]
    like = list(opt.single_partition_of_fp32_groups)
    whole = _joined_stage12(opt, fp32, lengths)

    def whole_of(values: list[list[Tensor]]) -> dict:
        return _joined_stage12(opt, values, lengths)

    client = _client_state(opt, [sd[_BASE] for sd in saved], whole_of, like)
    if not isinstance(saved[0][_BASE], dict):
        raise ReshardError("an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint)")
    mine = dict(saved[0])
    mine[_BASE] = client
    mine[_FP32] = _cut(opt, whole, like)
    mine["group_paddings"] = opt.groups_padding
    mine["partition_count"] = opt.partition_count
    mine.pop("param_alignment_paddings", None)
    mine.pop("param_slice_mappings", None)
    return mine


def _stage3_state(opt, saved: list[dict]) -> dict:
    streams = [torch.cat([t.reshape(-1) for t in sd[_FP32_FLAT]]) for sd in saved]
    like = list(opt.fp32_partitioned_groups_flat)
    whole = _joined_stage3(opt, streams)

    def whole_of(values: list[list[Tensor]]) -> dict:
        return _joined_stage3(opt, [torch.cat([v.reshape(-1) for v in vs]) for vs in values])

    client = _client_state(opt, [sd[_OPTIM] for sd in saved], whole_of, like)
    mine = dict(saved[0])
    mine[_OPTIM] = client
    mine[_FP32_FLAT] = _cut(opt, whole, like)
    mine["partition_count"] = opt.partition_count
    mine.pop("ds_zero_partition_groups", None)
    return mine
