"""The torch step: multi-tensor (``foreach``, the default) and per-tensor, every estimator.

The only kernel split at the exchange: `TorchStep.moments` folds the step's gradients into the
estimators' statistics and Adam's moments, the engine sums the partial statistics over ranks,
then `TorchStep.update` applies the decoupled decay and the gated Adam update. For the
elementwise estimators `step` runs both halves at once (the chunked CPU step calls it on a
chunk at a time, its temporaries in reused buffers).

The multi-tensor update has three shapes, chosen per parameter:

- diagonal temporal gates fold into the numerator, one ``addcdiv`` per parameter as in torch's
  AdamW (no materialised direction; the bias correction of ``v`` moves into the step size);
- ungated parameters (warm-up, ``gate="none"``, a first step) take torch's AdamW update;
- the rest (trackers, cross-sample gates, the hard gate) materialise the Adam direction and
  hand it to their estimator's ``gate_``; fp32 ones straight into the parameter, one at a
  time through one buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from snr_dist.distributors.dtensor import (
    global_shape,
    is_row_sharded,
    local,
    row_chunk,
    row_shard,
)
from snr_dist.estimators import (
    DiagonalInnovation,
    DiagonalSecondMoment,
    Estimator,
    Slot,
    gate_active,
)
from snr_dist.estimators.diagonal_second_moment import FOREACH_RULES
from snr_dist.kernels import rounding
from snr_dist.kernels.scratch import Scratch
from snr_dist.optim.base import advance_steps
from snr_dist.optim.steps.base import StepKernel

BySlots = dict[tuple[str, str], list[Slot]]
BF16 = torch.bfloat16


def fp32_grads(group: dict, grads: list[Tensor]) -> list[Tensor]:
    """The gradients the rule reads: fp32, negated for ``maximize``."""
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    if group["maximize"]:
        grads = [-g for g in grads]
    return grads


def foreach(group: dict) -> bool:
    return group["foreach"] is None or group["foreach"]


class TorchStep(StepKernel):
    name = "torch"

    def step(
        self, group: dict, params: list[Tensor], grads: list[Tensor], scratch: Scratch | None = None
    ) -> None:
        self.update(group, self.moments(group, params, grads, scratch), scratch)

    # ------------------------------------------------------------------ moments
    def moments(
        self, group: dict, params: list[Tensor], grads: list[Tensor], scratch: Scratch | None = None
    ) -> BySlots:
        """The estimators' local statistics, then Adam's moments (the innovation rule measures
        each gradient against the mean of the previous step); returns the step's slots by
        estimator. ``scratch``: the chunked step's work buffers."""
        states = [self.ctx.state(p, group) for p in params]
        grads = fp32_grads(group, grads)
        steps = advance_steps(states)
        by_est = self.ctx.engine.slots(group, params, grads, steps)
        if low_precision(group):  # float32 working copies until `update` rounds them back
            widen([s for ss in by_est.values() for s in ss], scratch)
        self.fold(group, by_est, scratch)
        return by_est

    def fold(self, group: dict, by_est: BySlots, scratch: Scratch | None = None) -> None:
        """Fold the slots' gradients into the estimators' statistics, then into Adam's
        moments."""
        self.ctx.engine.update(group, by_est, scratch)
        slots = [s for ss in by_est.values() for s in ss]
        grads = [s.grad for s in slots]
        beta1, beta2 = group["betas"]
        exp_avgs = [s.state["exp_avg"] for s in slots]
        exp_avg_sqs = [s.state["exp_avg_sq"] for s in slots]
        if foreach(group):
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        else:
            for m, v, g in zip(exp_avgs, exp_avg_sqs, grads):
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

    # ------------------------------------------------------------------ update
    def update(self, group: dict, by_est: BySlots, scratch: Scratch | None = None) -> None:
        """Decoupled weight decay (not gated), then the gated Adam step of the slots (by
        estimator, as `moments` returns them; its temporaries in ``scratch``'s buffers when
        given); bfloat16 state is rounded back last."""
        slots = [s for ss in by_est.values() for s in ss]
        self._update(group, by_est, slots, scratch)
        if low_precision(group):
            narrow(group, slots, self.ctx.engine.key)

    def _update(
        self, group: dict, by_est: BySlots, slots: list[Slot], scratch: Scratch | None
    ) -> None:
        u = _Update.of(group, slots)
        if not foreach(group):
            self._per_tensor(group, slots, u)
            return
        engine = self.ctx.engine
        fast: dict[tuple[int, Estimator], list[int]] = {}  # diagonal temporal gates, by step
        plain, directed = [], []
        foreach_gate = group["gate"] in FOREACH_RULES
        i = 0
        for key, ss in by_est.items():
            e = engine.estimators[key]
            diagonal_temporal = isinstance(e, (DiagonalInnovation, DiagonalSecondMoment))
            for s in ss:
                active = gate_active(group, s.step)
                if diagonal_temporal and active and foreach_gate:
                    fast.setdefault((s.step, e), []).append(i)
                elif active or e.tracks:
                    directed.append(i)
                else:
                    plain.append(i)
                i += 1
        # fp32 directions go straight into their parameters, weight decay included (trackers
        # fold it into a matmul)
        direct = all(u.params[i].dtype == torch.float32 for i in directed)
        skip = set(directed) if direct else set()
        decayed = [i for i in range(len(slots)) if i not in skip]
        if u.wd != 0 and decayed:
            torch._foreach_mul_([u.params[i] for i in decayed], 1.0 - u.lr * u.wd)
        gated = [i for idx in fast.values() for i in idx]
        denom = self._denominators(slots, u, gated, [i for i in decayed if i not in gated], scratch)
        for (t, e), idx in fast.items():
            gates, scale = e.gates_foreach(group, [slots[i].state for i in idx], t, scratch)
            torch._foreach_mul_(gates, [u.exp_avgs[i] for i in idx])
            _addcdiv(
                [u.params[i] for i in idx],
                gates,
                [denom[i] for i in idx],
                [u.step_sizes[i] * u.bc2_sqrt[i] * scale for i in idx],
            )
        if plain:  # no gate: exactly torch's AdamW update
            _addcdiv(
                [u.params[i] for i in plain],
                [u.exp_avgs[i] for i in plain],
                [denom[i] for i in plain],
                [u.step_sizes[i] for i in plain],
            )
        if not directed:
            return
        if direct:
            self._directions_into_params(group, slots, u, directed)
            return
        sub = [slots[i] for i in directed]
        dirs = torch._foreach_div([u.exp_avgs[i] for i in directed], [denom[i] for i in directed])
        ps = [u.params[i] for i in directed]
        engine.gate_(group, sub, dirs)
        torch._foreach_mul_(dirs, [u.step_sizes[i] for i in directed])
        torch._foreach_add_(ps, [d.to(p.dtype) for d, p in zip(dirs, ps)])

    def _denominators(
        self,
        slots: list[Slot],
        u: _Update,
        gated: list[int],
        adam: list[int],
        scratch: Scratch | None,
    ) -> list[Tensor | None]:
        """Adam's denominators: ``sqrt(v) + eps bc`` for ``gated`` (the bias correction ``bc``
        moved into the step size), ``sqrt(v) / bc + eps`` as torch's AdamW for ``adam``."""
        moment_sqrt = self.ctx.engine.moment_sqrt
        denom: list[Tensor | None] = [None] * len(slots)
        if gated:
            added = [u.eps * u.bc2_sqrt[i] for i in gated]
            vs = [u.exp_avg_sqs[i] for i in gated]
            den = moment_sqrt.sqrt_foreach(
                [slots[i].cache_key for i in gated],
                vs,
                added,
                out=None if scratch is None else scratch.like("den", vs),
            )
            torch._foreach_add_(den, added)
            for i, d in zip(gated, den):
                denom[i] = d
        if adam:
            scale = max(1.0 / u.bc2_sqrt[i] for i in adam)
            vs = [u.exp_avg_sqs[i] for i in adam]
            den = moment_sqrt.sqrt_foreach(
                [slots[i].cache_key for i in adam],
                vs,
                [u.eps] * len(adam),
                scale,
                out=None if scratch is None else scratch.like("den_ungated", vs),
            )
            torch._foreach_div_(den, [u.bc2_sqrt[i] for i in adam])
            torch._foreach_add_(den, u.eps)
            for i, d in zip(adam, den):
                denom[i] = d
        return denom

    def _directions_into_params(
        self, group: dict, slots: list[Slot], u: _Update, directed: list[int]
    ) -> None:
        """The gated step (and the decay) of fp32 parameters straight into them, one
        parameter at a time through one buffer (no direction per parameter to allocate; it is
        still in cache when the gate reads it)."""
        engine = self.ctx.engine
        buffers: dict[torch.device, Tensor] = {}
        for i in directed:
            v = u.exp_avg_sqs[i]
            buf = buffers.get(v.device)
            if buf is None:
                n = max(u.exp_avg_sqs[j].numel() for j in directed)
                buf = buffers[v.device] = v.new_empty(n)
            # m / (sqrt(v) + eps bc), the bias correction bc moved into the step size
            added = u.eps * u.bc2_sqrt[i]
            out = buf[: v.numel()].view(v.shape)
            d = engine.moment_sqrt.sqrt(slots[i].cache_key, v, added, out=out)
            torch.div(u.exp_avgs[i], d.add_(added), out=d)
            size = u.step_sizes[i] * u.bc2_sqrt[i]
            engine.gate_(
                group,
                [slots[i]],
                [d],
                out=[u.params[i]],
                alphas=[size],
                decay=1.0 - u.lr * u.wd,
            )

    def _per_tensor(self, group: dict, slots: list[Slot], u: _Update) -> None:
        """``foreach=False``: the readable per-tensor update."""
        engine = self.ctx.engine
        if u.wd != 0:
            for p in u.params:
                p.mul_(1.0 - u.lr * u.wd)
        for i, (p, m, v) in enumerate(zip(u.params, u.exp_avgs, u.exp_avg_sqs)):
            root = engine.moment_sqrt.sqrt(slots[i].cache_key, v, u.eps, 1.0 / u.bc2_sqrt[i])
            d = m / (root / u.bc2_sqrt[i] + u.eps)
            engine.gate_(group, [slots[i]], [d], foreach=False)
            p.add_(d.to(p.dtype), alpha=u.step_sizes[i])


@dataclass
class _Update:
    """What the update reads per slot: the local parameter, Adam's moments, ``sqrt(1 -
    beta2^t)`` and the step size ``-lr / (1 - beta1^t)``."""

    lr: float
    eps: float
    wd: float
    params: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    bc2_sqrt: list[float]
    step_sizes: list[float]

    @classmethod
    def of(cls, group: dict, slots: list[Slot]) -> _Update:
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        return cls(
            lr=lr,
            eps=group["eps"],
            wd=group["weight_decay"],
            params=[local(s.param) for s in slots],
            exp_avgs=[s.state["exp_avg"] for s in slots],
            exp_avg_sqs=[s.state["exp_avg_sq"] for s in slots],
            bc2_sqrt=[math.sqrt(1.0 - beta2**s.step) for s in slots],
            step_sizes=[-lr / (1.0 - beta1**s.step) for s in slots],
        )


def low_precision(group: dict) -> bool:
    return group.get("state_dtype") == "bfloat16"


def widen(slots: list[Slot], scratch: Scratch | None = None) -> None:
    """Put float32 working copies of the slots' bfloat16 state entries in their place (in
    ``scratch``'s buffers when given), remembering the stored tensors in ``Slot.low``."""
    by_key: dict[str, list[Slot]] = {}
    for s in slots:
        s.low = [(k, v) for k, v in s.state.items() if torch.is_tensor(v) and v.dtype == BF16]
        for k, _ in s.low:
            by_key.setdefault(k, []).append(s)
    for k, ss in by_key.items():
        stored = [s.state[k] for s in ss]
        if scratch is None:
            work = [torch.empty(t.shape, dtype=torch.float32, device=t.device) for t in stored]
        else:
            work = scratch.like("wide_" + k, stored, torch.float32)
        torch._foreach_copy_(work, stored)  # exact
        for s, w in zip(ss, work):
            s.state[k] = w


def narrow(group: dict, slots: list[Slot], key_of) -> None:
    """Round the working copies `widen` made back into the stored bfloat16 tensors,
    stochastically: the bits of element ``i`` of a parameter are a hash of ``(seed, the
    parameter's position in the optimizer, step, i)`` (`snr_dist.kernels.rounding`), ``i``
    counted in the whole parameter (a row shard's rows where they are in it), so sharded and
    unsharded runs draw the same bits."""
    seed = group["seed"]
    for s in slots:
        if not s.low:
            continue
        p, offset = (s.param, 0) if s.key is None else s.key  # a piece: its offset
        offset += first_element(p)
        stored = s.low[0][1]
        bits = rounding.random_bits(
            stored.numel(), rounding.salt(seed, key_of(p), s.step), offset, stored.device
        )
        for (k, stored), r in zip(s.low, rounding.halves(bits, len(s.low))):
            rounding.round_into_(stored, s.state[k], r)
            s.state[k] = stored
        s.low = None


def first_element(p: Tensor) -> int:
    """Where this rank's elements of ``p`` start in the whole parameter: 0, or for a row
    shard (FSDP2's ``Shard(0)``, ZeRO's row shards) its first row's."""
    if not is_row_sharded(p):
        return 0
    shape = global_shape(p)
    marked = row_shard(p)  # ZeRO: (shape, first row)
    if marked is not None:
        return marked[1] * math.prod(shape[1:])
    rows = row_chunk(torch.arange(shape[0]), p)  # FSDP2: as Shard(0) cuts them
    return int(rows[0]) * math.prod(shape[1:]) if rows.numel() else 0


def _addcdiv(params, numerators, denominators, scales) -> None:
    if all(p.dtype == torch.float32 for p in params):
        torch._foreach_addcdiv_(params, numerators, denominators, scales)
        return
    for p, n, d, s in zip(params, numerators, denominators, scales):
        p.add_((n / d).to(p.dtype), alpha=s)
