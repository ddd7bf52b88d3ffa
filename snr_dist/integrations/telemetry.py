"""What every integration logs: gate and SNR statistics per layer group, as flat scalars.

A *layer group* is a module: the parameter's name without its last component
(``transformer.h.0.attn.c_attn.weight`` -> ``transformer.h.0.attn.c_attn``). Per group:

- ``gate_mean``: mean gate, weighted by parameter size;
- ``closed_frac``: share of gates below 0.1 (directions the rule all but stops);
- ``snr_q10``, ``snr_q50``, ``snr_q90``: SNR quantiles of the group's parameters, averaged
  weighted by size (each parameter's quantiles are exact for subspace gates and small tensors,
  from a strided sample above `snr_dist.metrics.SAMPLE` coordinates);

plus the same over the whole model under ``all``. Nothing here runs a collective: under data
parallelism each rank reports what it holds (log from rank 0, as loggers do). An optimizer that
holds none of the model's parameters (DeepSpeed ZeRO 1-3's flat partitions, in the elementwise
diagonal mode) reports ``all`` only, over what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from snr_dist.metrics import group_params, param_metrics

KEYS = ("gate_mean", "closed_frac", "snr_q10", "snr_q50", "snr_q90")


def layer_groups(named: nn.Module | Iterable[tuple[str, Tensor]]) -> dict[Tensor, str]:
    """``{parameter: layer group}`` from a module or its ``named_parameters()``."""
    items = named.named_parameters() if isinstance(named, nn.Module) else named
    out = {}
    for name, p in items:
        out[p] = name.rsplit(".", 1)[0] if "." in name else name
    return out


def _params_of(opt, groups: dict[Tensor, str]):
    """``(optimizer, param, group dict, layer group)`` for every parameter with a name; under
    DeepSpeed ZeRO's row shards (`snr_dist.optim.zero_view`) the statistics live on the
    shards, named after their model parameters."""
    zero = getattr(opt, "zero_view", None)
    if zero is not None:
        inner = zero.inner
        for bk in zero.buckets:
            group = inner.param_groups[bk.group]
            for piece in bk.pieces:
                if piece.lp in groups:
                    yield inner, piece.shard, group, groups[piece.lp]
        return
    held = [(group, group_params(opt, i)) for i, group in enumerate(opt.param_groups)]
    named = False
    for group, params in held:
        for p in params:
            if p in groups:
                named = True
                yield opt, p, group, groups[p]
    if not named:
        # no parameter of the model in the optimizer: ZeRO 1-3 hand an elementwise SNRAdamW
        # flat partitions cutting across layers (ZeRO-3 only during step()); their statistics
        # still make ``all``
        for group, params in held:
            for p in params:
                yield opt, p, group, None


def collect(
    opt, groups: dict[Tensor, str], gates: bool = False
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``(scalars, histograms)``: scalars keyed ``"<layer group>/<key>"`` (and ``"all/<key>"``);
    with ``gates=True`` also every layer group's gate values (for histograms)."""
    acc: dict[str, dict[str, float]] = {}
    weight: dict[str, float] = {}
    hist: dict[str, list[Tensor]] = {}
    for o, p, group, name in _params_of(opt, groups):
        m = param_metrics(o, p, group, gates=gates)
        if m is None:
            continue
        n = float(p.numel())
        if n == 0:
            continue
        m["closed_frac"] = m["frac_gate_below_0.1"]
        for key in ("all",) if name is None else (name, "all"):
            a = acc.setdefault(key, {})
            weight[key] = weight.get(key, 0.0) + n
            for k in KEYS:
                if k in m:
                    a[k] = a.get(k, 0.0) + m[k] * n
            if gates:
                hist.setdefault(key, []).append(m["gates"])
    scalars = {
        f"{key}/{k}": v / weight[key] for key, a in acc.items() for k, v in sorted(a.items())
    }
    histograms = {key: torch.cat(v) for key, v in hist.items()}
    return scalars, histograms


def scalars(opt, groups: dict[Tensor, str], prefix: str = "snr/") -> dict[str, Any]:
    """The flat scalars of `collect`, each key prefixed (``"snr/transformer.h.0.mlp.c_fc/
    gate_mean"``): what the Trainer, Lightning and TensorBoard callbacks log."""
    values, _ = collect(opt, groups)
    return {prefix + k: v for k, v in values.items()}
