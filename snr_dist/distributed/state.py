"""SNRAdamW state in a world-size-independent form, and back.

At run time a rank holds only what it needs: FSDP2 shards of the full-size moments, partial
sums of tracker statistics, or (under DDP) the trackers it owns. A checkpoint wants the
opposite: the same keys on every rank with values that do not depend on how many ranks wrote
them, so that it can be loaded by another world size or another kind of parallelism.
`global_state` produces that (DTensors where the data is sharded, plain tensors otherwise);
`install_state` turns a loaded global state back into this rank's runtime layout, with the
trackers re-assigned to the current world.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snr_dist.distributed.context import DTensor, Shard, is_dtensor, local

#: Parameter-shaped state (sharded like the parameter under FSDP2).
FULL_KEYS = ("exp_avg", "exp_avg_sq", "snr_avg", "snr_sq", "raw_avg", "var_avg")
#: Tracker state that only its owner (DDP) or every shard, as partial sums (FSDP2), holds.
PARTIAL_KEYS = ("sketch", "proj_cov", "energy")
OWNER_KEYS = ("sketch", "sketch_weight", "eigvals", "proj_avg", "proj_cov", "energy")


def _full_shape(p: Tensor) -> tuple[int, ...]:
    return tuple(p.shape)


def _as_dtensor(local_t: Tensor, p: Tensor, dim: int, global_shape: tuple[int, ...]) -> Tensor:
    mesh = p.device_mesh
    stride = tuple(math.prod(global_shape[i + 1 :]) for i in range(len(global_shape)))
    return DTensor.from_local(
        local_t,
        mesh,
        [Shard(dim)],
        run_check=False,
        shape=torch.Size(global_shape),
        stride=stride,
    )


def _scratch_tracker(gating, p: Tensor, group: dict) -> dict:
    """Zero tracker state with the owner's shapes (what a non-owner receives into)."""
    st: dict = {}
    gating._init_tracker(p, group, st, participant=True)
    src = gating.moment_source(group)
    if group["estimator"] == "temporal" and src.owns_mean:
        st[src.mean_key] = torch.zeros(local(p).shape, device=local(p).device)
    return st


@torch.no_grad()
def global_state(opt, gating) -> dict[Tensor, dict[str, Tensor]]:
    """Per parameter, its state with identical keys and world-independent values on every rank
    (a collective under data parallelism: every rank must call it)."""
    ctx = gating.ctx
    out: dict[Tensor, dict[str, Tensor]] = {}
    to_broadcast: dict[int, list[Tensor]] = {r: [] for r in range(ctx.world)}
    to_sum: list[Tensor] = []
    for group in opt.param_groups:
        src = gating.moment_source(group)
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or "step" not in st:
                continue
            sub = gating.kind(p, group) == "subspace"
            g: dict[str, Tensor] = {}
            if sub and ctx.mode == "replicated":
                scratch = _scratch_tracker(gating, p, group)
                for k, v in scratch.items():
                    if k in OWNER_KEYS or k == src.mean_key and k not in ("exp_avg",):
                        g[k] = st[k].clone() if ctx.owns(p) else v
                        to_broadcast[ctx.owner(p)].append(g[k])
            for k, v in st.items():
                if k in g:
                    continue
                if ctx.sharded and k in FULL_KEYS:
                    g[k] = _as_dtensor(v, p, 0, _full_shape(p))
                elif ctx.sharded and sub and k == "proj_avg":
                    r = v.shape[0]
                    g[k] = _as_dtensor(v, p, 1, (r, p.shape[0]))
                elif ctx.sharded and sub and k in PARTIAL_KEYS:
                    g[k] = v.clone()
                    to_sum.append(g[k])
                else:
                    g[k] = v
            out[p] = g
    if ctx.world > 1:
        if to_sum:
            ctx.comm.all_reduce_(to_sum)
        for owner, tensors in to_broadcast.items():
            ctx.comm.broadcast_(tensors, owner)
    return out


def template(opt, gating, p: Tensor, group: dict, key: str, size, dtype) -> Tensor:
    """An empty tensor to load the global value of ``state[key]`` of ``p`` into."""
    if gating.ctx.sharded and key in FULL_KEYS:
        return _as_dtensor(torch.zeros(local(p).shape, dtype=dtype), p, 0, _full_shape(p))
    if gating.ctx.sharded and key == "proj_avg":
        return _as_dtensor(torch.zeros(size[0], local(p).shape[0], dtype=dtype), p, 1, tuple(size))
    return torch.zeros(tuple(size), dtype=dtype)


@torch.no_grad()
def install_state(opt, gating, loaded: dict[Tensor, dict[str, Tensor]]) -> None:
    """Make ``loaded`` (global values, from `template` tensors) this rank's runtime state."""
    ctx = gating.ctx
    gating.refresh_groups()  # owners for the *current* world
    for group in opt.param_groups:
        src = gating.moment_source(group)
        for p in group["params"]:
            if p not in loaded:
                continue
            sub = gating.kind(p, group) == "subspace"
            device = local(p).device
            st: dict[str, Tensor] = {}
            for k, v in loaded[p].items():
                v = local(v) if is_dtensor(v) else v
                v = v.to(device) if k != "step" else v.cpu()
                if (
                    sub
                    and ctx.mode == "replicated"
                    and not ctx.owns(p)
                    and (k in OWNER_KEYS or k == src.mean_key and k != "exp_avg")
                ):
                    continue  # another rank owns this tracker now
                if sub and ctx.sharded and k in PARTIAL_KEYS and not ctx.owns(p):
                    v = torch.zeros_like(v)  # partial sums: the owner carries the total
                st[k] = v.clone()
            opt.state[p] = st


def drop_unowned(opt, gating) -> None:
    """Under replicated data parallelism, forget tracker state another rank owns (after a load
    of a full state)."""
    ctx = gating.ctx
    for group in opt.param_groups:
        src = gating.moment_source(group)
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or gating.kind(p, group) != "subspace" or ctx.owns(p):
                continue
            for k in list(st):
                if k in OWNER_KEYS or (k == src.mean_key and k != "exp_avg"):
                    del st[k]
