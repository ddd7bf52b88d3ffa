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

SAMPLE = 16384
"""Most coordinates read per diagonal parameter."""
QUANTILES = (0.1, 0.5, 0.9)


def _sample_index(numel: int, device) -> Tensor | None:
    if numel <= SAMPLE:
        return None
    stride = math.ceil(numel / SAMPLE)
    return torch.arange(0, numel, stride, device=device)


@torch.no_grad()
def param_metrics(opt, gating, p: Tensor, group: dict) -> dict[str, Any] | None:
    """Metrics of one parameter, or None before its first step."""
    state = opt.state.get(p, {})
    if "step" not in state:
        return None
    t = int(state["step"].item())
    kind = gating.kind(p, group)
    index = None if kind == "subspace" else _sample_index(p.numel(), p.device)
    raw, var, k = gating.moments(p, group, state, t, index)
    g = gating.gates(p, group, state, t, index)
    s = rule.snr(raw, var, k).float()
    out: dict[str, Any] = {
        "kind": kind,
        "shape": tuple(p.shape),
        "step": t,
        "gate_mean": float(g.mean()),
        "frac_gate_below_0.1": float((g < 0.1).float().mean()),
        **{
            f"snr_q{int(q * 100)}": float(v)
            for q, v in zip(
                QUANTILES,
                torch.quantile(s, torch.tensor(QUANTILES, dtype=s.dtype, device=s.device)),
            )
        },
        "nonfinite_skips": gating.nonfinite_skips.get(p, 0),
    }
    if kind == "subspace":
        out["rank"] = int(state["basis"].shape[1])
        out["reservoir_gate"] = float(g[-1])
        out["captured_energy"] = subspace.captured_energy(state)
        out["top_eigvals"] = [float(x) for x in state["eigvals"][:4]]
    return out


def collect_metrics(opt, gating, names: dict[Tensor, str] | None = None) -> dict[str, Any]:
    """``{"groups": [...], "params": {name: {...}}, "nonfinite_skips": int}``.

    Group values are averages over the group's parameters weighted by their sizes.
    """
    params_out: dict[str, Any] = {}
    groups_out = []
    idx = 0
    for gi, group in enumerate(opt.param_groups):
        acc: dict[str, float] = {}
        total = 0
        energies = []
        for p in group["params"]:
            name = (names or {}).get(p, f"group{gi}.param{idx}")
            idx += 1
            m = param_metrics(opt, gating, p, group)
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
        "nonfinite_skips": int(sum(gating.nonfinite_skips.values())),
    }
