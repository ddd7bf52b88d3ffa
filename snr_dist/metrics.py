"""What the gates are doing, cheaply enough to log every step.

Gates are a deterministic function of the optimizer state, so metrics recompute them from the
state after ``step()`` rather than storing them during it. For diagonal parameters larger than
`SAMPLE` coordinates a fixed strided sample is used (exact for smaller tensors), which
bounds the cost per parameter; subspace parameters have ``rank + 1`` gates and are exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from snr_dist import snr as rule
from snr_dist import subspace
from snr_dist.distributors.dtensor import local

SAMPLE = 16384
"""Most coordinates read per diagonal parameter."""
QUANTILES = (0.1, 0.5, 0.9)


def _sample_index(numel: int, device) -> Tensor | None:
    if numel <= SAMPLE:
        return None
    stride = math.ceil(numel / SAMPLE)
    return torch.arange(0, numel, stride, device=device)


@torch.no_grad()
def param_metrics(opt, p: Tensor, group: dict, gates: bool = False) -> dict[str, Any] | None:
    """Metrics of one parameter, or None before its first step.

    Diagonal parameters: recomputed from this rank's state (its shard under FSDP2; a strided
    sample above `SAMPLE` coordinates). Subspace parameters: the gates and statistics of the
    last step. ``gates=True`` adds the gate values themselves (``"gates"``, fp32 on the CPU),
    for histograms.
    """
    state = opt.state.get(p, {})
    if "step" not in state:
        return None
    t = int(state["step"].item())
    estimator = opt.estimator_of(p, group)
    kind = "subspace" if estimator.tracks else "diagonal"
    out: dict[str, Any] = {"kind": kind, "shape": tuple(p.shape), "step": t}
    if estimator.tracks:
        info = estimator.info(p, state, group)
        if info is None:
            return None
        g = info["gates"]
        out["rank"] = int(state["basis"].shape[1])
        out["owner"] = opt.distributor.owner(p)
        out["reservoir_gate"] = float(g[-1])
        s = rule.snr(info["raw"], info["var"], info["k"]).float()
        out["captured_energy"] = subspace.captured_fraction(*info["captured"])
        out["top_eigvals"] = [float(x) for x in state["eigvals"][:4]]
    else:
        index = _sample_index(local(p).numel(), local(p).device)
        raw, var, k = estimator.moments(p, state, group, t, index)
        g = estimator.gates(p, state, group, t, index)
        s = rule.snr(raw, var, k).float()
    if gates:
        out["gates"] = g.detach().float().reshape(-1).cpu()
    out["gate_mean"] = float(g.mean())
    out["frac_gate_below_0.1"] = float((g < 0.1).float().mean())
    if s is not None and s.numel():
        qs = torch.quantile(s, torch.tensor(QUANTILES, dtype=s.dtype, device=s.device))
        out.update({f"snr_q{int(q * 100)}": float(v) for q, v in zip(QUANTILES, qs)})
    out["nonfinite_skips"] = opt.nonfinite_skips.get(p, 0)
    return out


def group_params(opt, index: int) -> list[Tensor]:
    """The parameters of param group ``index``: those in it now, and those with state that a
    framework took out of it (DeepSpeed ZeRO-3 puts its flat partitions in the client
    optimizer's groups only during ``step()``)."""
    groups = opt.param_groups
    params = list(groups[index]["params"])
    engine = getattr(opt, "_engine", None)
    if engine is None:
        return params
    present = {p for g in groups for p in g["params"]}
    return params + [p for p in opt.state if p not in present and engine.home(p) == index]


def collect_metrics(opt, names: dict[Tensor, str] | None = None) -> dict[str, Any]:
    """``{"groups": [...], "params": {name: {...}}, "nonfinite_skips": int, "parallel": {...}}``.

    Group values are averages over the group's parameters weighted by their sizes. No
    collective is run: under data parallelism every rank reports what it holds.
    """
    params_out: dict[str, Any] = {}
    groups_out = []
    idx = 0
    # built from named_parameters(), torch keeps the names in the groups; ``names`` wins
    kept = {p: n for g in opt.param_groups for p, n in zip(g["params"], g.get("param_names", ()))}
    names = {**kept, **(names or {})}
    for gi, group in enumerate(opt.param_groups):
        acc: dict[str, float] = {}
        total = 0
        energies = []
        for p in group_params(opt, gi):
            name = (names or {}).get(p, f"group{gi}.param{idx}")
            idx += 1
            if p.numel() == 0:  # an empty shard (FSDP2, ZeRO row shards): nothing to report
                continue
            m = param_metrics(opt, p, group)
            if m is None:
                continue
            params_out[name] = m
            n = p.numel()
            total += n
            for key in ("gate_mean", "frac_gate_below_0.1"):
                acc[key] = acc.get(key, 0.0) + m[key] * n
            if "captured_energy" in m and not math.isnan(m["captured_energy"]):
                energies.append(m["captured_energy"])
        g = {k: v / total for k, v in acc.items()} if total else {}
        g.update(
            estimator=group["estimator"],
            mode=group["mode"],
            gate=group["gate"],
            lr=group.get("lr"),
        )
        if energies:
            g["captured_energy_mean"] = sum(energies) / len(energies)
        groups_out.append(g)
    return {
        "groups": groups_out,
        "params": params_out,
        "nonfinite_skips": int(sum(opt.nonfinite_skips.values())),
        "parallel": parallel_metrics(opt),
    }


def state_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


def parallel_metrics(opt) -> dict[str, Any]:
    """What this rank holds and does: the trackers whose refreshes it solves, their cost, the
    bytes of optimizer state and of snr-dist's collectives."""
    dist = opt.distributor
    mine = [p for p, o in dist.owners.items() if o == dist.rank]
    return {
        "mode": dist.name,
        "rank": dist.rank,
        "world": dist.world,
        "trackers_owned": len(mine),
        "trackers_total": len(dist.owners),
        "tracker_cost_owned": float(sum(dist.costs[p] for p in mine)),
        "tracker_cost_total": float(sum(dist.costs.values())),
        "state_bytes": int(
            sum(state_bytes(st) for p, st in opt.state.items() if isinstance(p, torch.Tensor))
        ),
        "comm_bytes": dict(dist.comm.bytes),
    }
