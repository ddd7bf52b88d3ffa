"""The SNR machinery shared by `SNRAdamW` and `SNRPreconditioner`.

An optimizer owns the parameters and their state; `SNRGating` adds, per parameter group,
the SNR statistics (temporal EMAs, cross-sample micro-batch sums, subspace trackers) and turns a
list of base update directions into gated ones. The maths is in `snr_dist.snr` and
`snr_dist.subspace`; this module is bookkeeping plus a multi-tensor (foreach) fast path for
the common diagonal temporal case, tested against the per-tensor path.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from snr_dist import cross_sample, subspace
from snr_dist import snr as rule
from snr_dist.cross_sample import MicrobatchStats
from snr_dist.options import param_mode


@dataclass(frozen=True)
class MomentSource:
    """Where the temporal estimator finds its two EMAs for one group.

    ``mean_key``/``beta_s``: the EMA of the gradient (Adam's ``exp_avg`` is reused when its beta
    equals ``snr_beta``). ``sq_key``/``beta_v``: the EMA of the squared gradient. ``owns_*``: the
    gating engine (not the base optimizer) allocates and updates that buffer.
    """

    mean_key: str
    beta_s: float
    owns_mean: bool
    sq_key: str
    beta_v: float
    owns_sq: bool


def finite_flags(grads: list[Tensor]) -> list[bool]:
    """One host sync for all tensors: which gradients are free of NaN/Inf.

    The 2-norm is the cheapest multi-tensor reduction (the inf-norm is several times slower
    on CPU) and propagates NaN/Inf; a norm that merely overflows (elements > ~1e19) is
    re-checked elementwise, so finite gradients are never skipped.
    """
    if not grads:
        return []
    norms = torch._foreach_norm(grads, 2)
    by_device: dict = defaultdict(list)
    for i, n in enumerate(norms):
        by_device[n.device].append(i)
    flags = [True] * len(grads)
    for idx in by_device.values():  # one device-to-host copy per device
        ok = torch.isfinite(torch.stack([norms[i].float() for i in idx])).tolist()
        for i, f in zip(idx, ok):
            flags[i] = f
    return [f or bool(torch.isfinite(g).all()) for f, g in zip(flags, grads)]


def collect_gradients(
    group: dict, gating: SNRGating, skip_nonfinite: bool, who: str
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """``(params, grads, skipped)`` of a group: params with a gradient, minus non-finite ones
    (counted and warned about once) when ``skip_nonfinite``. The caller drops the skipped
    params' micro-batch statistics once the step is sure to proceed."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(
                f"{who} does not support sparse gradients (got one for a parameter of shape "
                f"{tuple(p.shape)}); use dense gradients, e.g. nn.Embedding(sparse=False)"
            )
        params.append(p)
        grads.append(p.grad)
    skipped: list[Tensor] = []
    if skip_nonfinite and params:
        ok = finite_flags(grads)
        if not all(ok):
            skipped = [p for p, f in zip(params, ok) if not f]
            for p in skipped:
                gating.record_nonfinite(p)
            params = [p for p, f in zip(params, ok) if f]
            grads = [g for g, f in zip(grads, ok) if f]
    return params, grads, skipped


class SNRGating:
    """Per-parameter SNR statistics and gates, stored in ``optimizer.state``."""

    def __init__(self, optimizer: torch.optim.Optimizer, moment_source) -> None:
        # ``moment_source(group) -> MomentSource``
        self.opt = optimizer
        self.moment_source = moment_source
        self._micro: dict[Tensor, MicrobatchStats] = {}
        self._hooked: dict[Tensor, torch.utils.hooks.RemovableHandle] = {}
        self._weight = 1.0
        self.nonfinite_skips: dict[Tensor, int] = defaultdict(int)
        self._warned_nonfinite = False
        self._keys: dict[Tensor, int] = {}
        self._group_of: dict[Tensor, dict] = {}

    # ------------------------------------------------------------------ bookkeeping
    def key(self, p: Tensor) -> int:
        """A stable per-parameter integer (its position in the optimizer), for seeding."""
        if p not in self._keys:
            self._keys = {
                q: i for i, q in enumerate(q for g in self.opt.param_groups for q in g["params"])
            }
        return self._keys[p]

    def kind(self, p: Tensor, group: dict) -> str:
        return param_mode(tuple(p.shape), group["mode"])

    def init_state(self, p: Tensor, group: dict, state: dict) -> None:
        """Allocate the SNR buffers of ``p`` (the base optimizer's own are not touched)."""
        src = self.moment_source(group)
        f32 = dict(device=p.device, dtype=torch.float32)
        cross = group["estimator"] == "cross_sample"
        if self.kind(p, group) == "subspace":
            subspace.init_tracker(state, tuple(p.shape), group, p.device, self.key(p), cross)
        elif cross:
            state["raw_avg"] = torch.zeros(p.shape, **f32)
            state["var_avg"] = torch.zeros(p.shape, **f32)
        if not cross:
            if src.owns_mean:
                state[src.mean_key] = torch.zeros(p.shape, **f32)
            if src.owns_sq and self.kind(p, group) == "diagonal":
                state[src.sq_key] = torch.zeros(p.shape, **f32)

    def record_nonfinite(self, p: Tensor) -> None:
        self.nonfinite_skips[p] += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                "snr-dist: a gradient contains NaN or Inf; that parameter's step is skipped and "
                "its state left untouched (counted in optimizer.metrics()['nonfinite_skips']). "
                "This warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ cross-sample capture
    def register_hooks(self) -> None:
        """Capture each micro-batch's gradient of cross-sample params before accumulation.

        Call again whenever ``param_groups`` are replaced (add_param_group, load_state_dict)."""
        self._group_of = {p: g for g in self.opt.param_groups for p in g["params"]}
        for group in self.opt.param_groups:
            if group["estimator"] != "cross_sample":
                continue
            for p in group["params"]:
                if p.requires_grad and p not in self._hooked:
                    self._hooked[p] = p.register_hook(self._make_hook(p))

    def remove_hooks(self) -> None:
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()

    def _make_hook(self, p: Tensor):
        def hook(grad: Tensor) -> None:
            group = self._group_of[p]
            if group["estimator"] == "cross_sample":
                self.observe(p, group, grad)

        return hook

    @torch.no_grad()
    def observe(self, p: Tensor, group: dict, grad: Tensor, weight: float | None = None) -> None:
        """Record one micro-batch gradient contribution of ``p`` (hooks call this; so can you)."""
        if grad.is_sparse:
            raise RuntimeError("snr-dist does not support sparse gradients")
        state = self.opt.state[p]
        tracker = None
        if self.kind(p, group) == "subspace":
            if "basis" not in state:
                cross = group["estimator"] == "cross_sample"
                subspace.init_tracker(state, tuple(p.shape), group, p.device, self.key(p), cross)
            tracker = state
        stats = self._micro.setdefault(p, MicrobatchStats())
        stats.observe(grad, self._weight if weight is None else weight, p.grad, tracker)

    @contextlib.contextmanager
    def microbatch(self, weight: float) -> Iterator[None]:
        if not weight > 0:
            raise ValueError(f"Invalid microbatch weight: {weight!r}; allowed: a float > 0")
        old, self._weight = self._weight, float(weight)
        try:
            yield
        finally:
            self._weight = old

    def pending_microbatches(self) -> int:
        return max((s.count for s in self._micro.values()), default=0)

    def discard_microbatches(self, params: list[Tensor] | None = None) -> None:
        """Forget recorded micro-batch gradients (of ``params``, or all of them)."""
        if params is None:
            self._micro.clear()
        for p in params or ():
            self._micro.pop(p, None)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def update_statistics(
        self, group: dict, params: list[Tensor], grads: list[Tensor], steps: list[int]
    ) -> None:
        """Fold this step's gradients (fp32, already sign-flipped for ``maximize``) into the
        SNR statistics. Called after the optimizer advanced ``state['step']``."""
        src = self.moment_source(group)
        states = [self.opt.state[p] for p in params]
        if group["estimator"] == "cross_sample":
            self._finalize_cross_sample(group, params, grads, states)
        else:
            if src.owns_mean and params:
                torch._foreach_lerp_([s[src.mean_key] for s in states], grads, 1.0 - src.beta_s)
            if src.owns_sq:
                diag = [i for i, p in enumerate(params) if self.kind(p, group) == "diagonal"]
                if diag:
                    sq = [states[i][src.sq_key] for i in diag]
                    gs = [grads[i] for i in diag]
                    torch._foreach_mul_(sq, src.beta_v)
                    torch._foreach_addcmul_(sq, gs, gs, value=1.0 - src.beta_v)
        for p, g, st in zip(params, grads, states):
            if self.kind(p, group) == "subspace":
                subspace.observe(st, g, src.beta_v, src.beta_s, group["sketch_beta"])

    def check_ready(self, group: dict, params: list[Tensor]) -> None:
        """Fail before any state changes if a cross-sample step lacks micro-batches."""
        if group["estimator"] != "cross_sample":
            return
        for p in params:
            stats = self._micro.get(p)
            count = 0 if stats is None else stats.count
            if count < 2:
                raise RuntimeError(
                    "snr-dist: estimator='cross_sample' needs >= 2 gradient contributions per "
                    "step (micro-batches of gradient accumulation or data-parallel ranks); a "
                    f"parameter of shape {tuple(p.shape)} saw {count} since the last step. Run "
                    "several backward passes before step(), or use estimator='temporal'."
                )

    def _finalize_cross_sample(self, group, params, grads, states) -> None:
        beta = group["snr_beta"]
        for p, g, st in zip(params, grads, states):
            stats = self._micro.pop(p)
            c_sq = stats.unit_scale_sq(g)
            if self.kind(p, group) == "subspace":
                raw_d, var_d, raw_e, var_e = cross_sample.subspace_moments(stats, g, c_sq, st)
                st["raw_dir"].lerp_(raw_d, 1.0 - beta)
                st["noise_dir"].lerp_(var_d, 1.0 - beta)
                st["raw_energy"].lerp_(raw_e, 1.0 - beta)
                st["noise_energy"].lerp_(var_e, 1.0 - beta)
            else:
                raw, var = cross_sample.diagonal_moments(stats, g, c_sq)
                st["raw_avg"].lerp_(raw, 1.0 - beta)
                st["var_avg"].lerp_(var, 1.0 - beta)

    # ------------------------------------------------------------------ gates
    def gate_active(self, group: dict, step: int) -> bool:
        if group["gate"] == "none" or step <= group["warmup_steps"]:
            return False
        # One gradient carries no variance estimate for the temporal estimator.
        return group["estimator"] == "cross_sample" or step >= 2

    def moments(self, p: Tensor, group: dict, state: dict, step: int, index=None):
        """``(raw, var, k)`` of ``p`` at ``step``: per coordinate (diagonal; optionally only at
        the flat ``index``) or per direction + complement (subspace)."""
        src = self.moment_source(group)
        cross = group["estimator"] == "cross_sample"
        if self.kind(p, group) == "subspace":
            if cross:
                raw, var = subspace.cross_direction_moments(state, step, group["snr_beta"])
                return raw, var, 1.0
            mean_energy = subspace.squared_norm(state[src.mean_key])
            return subspace.temporal_direction_moments(
                state, mean_energy, step, src.beta_s, src.beta_v
            )
        pick = (lambda t: t.reshape(-1)[index]) if index is not None else (lambda t: t)
        if cross:
            bc = 1.0 - group["snr_beta"] ** step
            return pick(state["raw_avg"]) / bc, pick(state["var_avg"]) / bc, 1.0
        return rule.temporal_moments(
            pick(state[src.mean_key]).float(),
            pick(state[src.sq_key]).float(),
            step,
            src.beta_s,
            src.beta_v,
        )

    def gates(self, p: Tensor, group: dict, state: dict, step: int, index=None) -> Tensor:
        raw, var, k = self.moments(p, group, state, step, index)
        if not self.gate_active(group, step):
            return torch.ones_like(raw)
        return rule.gate(raw, var, k, group["gate"], group["tau"], group["gate_a"])

    def fast_buckets(
        self, group: dict, params: list[Tensor], steps: list[int], foreach: bool
    ) -> dict[tuple, list[int]]:
        """Indices of the params whose gates the multi-tensor path computes, by (device, step):
        diagonal, temporal, gate active, rule wiener/clamp/paper."""
        buckets: dict[tuple, list[int]] = defaultdict(list)
        if not (
            foreach
            and group["estimator"] == "temporal"
            and group["gate"] in ("wiener", "clamp", "paper")
        ):
            return buckets
        for i, (p, t) in enumerate(zip(params, steps)):
            if self.kind(p, group) == "diagonal" and self.gate_active(group, t):
                buckets[(p.device, t)].append(i)
        return buckets

    @torch.no_grad()
    def gate_(
        self,
        group: dict,
        params: list[Tensor],
        directions: list[Tensor | None],
        steps: list[int],
        foreach: bool,
        skip: set[int] | frozenset[int] = frozenset(),
        out: list[Tensor] | None = None,
        alphas: list[float] | None = None,
    ) -> None:
        """Multiply the base update ``directions`` by their gates, in place, and refresh due
        trackers. Indices in ``skip`` were gated by the caller (see `fast_buckets`); a
        direction may be None where no gate is active. With ``out`` (fp32 tensors) and
        ``alphas``, add ``alpha * gated direction`` into ``out`` instead (directions are
        left untouched)."""
        src = self.moment_source(group)
        buckets = self.fast_buckets(group, params, steps, foreach)
        for idx in buckets.values():
            idx = [i for i in idx if i not in skip]
            if idx:
                t = steps[idx[0]]
                gates, scale = self.diagonal_gates_foreach(
                    group, [self.opt.state[params[i]] for i in idx], t
                )
                dirs = [directions[i] for i in idx]
                if out is None:
                    torch._foreach_mul_(dirs, gates)
                    torch._foreach_mul_(dirs, scale)
                else:
                    torch._foreach_mul_(gates, dirs)
                    torch._foreach_mul_(gates, [alphas[i] * scale for i in idx])
                    torch._foreach_add_([out[i] for i in idx], gates)
            skip = skip | set(idx)
        for i, (p, d, t) in enumerate(zip(params, directions, steps)):
            if i in skip:
                continue
            state = self.opt.state[p]
            sub = self.kind(p, group) == "subspace"
            if self.gate_active(group, t):
                g = self.gates(p, group, state, t)
                if sub:
                    o = None if out is None else out[i]
                    subspace.apply_gates(state, d, g, o, 1.0 if out is None else alphas[i])
                elif out is None:
                    d.mul_(g)
                else:
                    out[i].addcmul_(d, g, value=alphas[i])
            elif out is not None:
                out[i].add_(d, alpha=alphas[i])
            if sub and subspace.refresh_due(t, group["refresh_every"]):
                mean = None if group["estimator"] == "cross_sample" else state[src.mean_key]
                subspace.refresh(state, mean, t, src.beta_s, src.beta_v)

    def diagonal_gates_foreach(
        self, group: dict, states: list[dict], t: int
    ) -> tuple[list[Tensor], float]:
        """Multi-tensor `temporal_moments` + `gate` (wiener/clamp/paper): ``(gates, scale)``
        with the true gate ``scale * gates`` (the constant is left for the caller to fold).

        Works in units scaled by ``bc_v = 1 - beta_v^t`` so the bias corrections become
        constants: ``var' = v - c s^2`` (``c = bc_v / bc_s^2``) is ``(1-k) bc_v var``,
        ``raw' = v - var'`` is ``bc_v raw``; 7 passes over the state instead of 13.
        """
        src = self.moment_source(group)
        k = rule.ema_noise_factor(src.beta_s, t)
        one_k = max(1.0 - k, 1e-12)
        bc_v = 1.0 - src.beta_v**t
        c = bc_v / (1.0 - src.beta_s**t) ** 2
        tau_p = group["tau"] / one_k
        shift = (group["gate_a"] if group["gate"] == "paper" else k) / one_k
        s = [st[src.mean_key] for st in states]
        v = [st[src.sq_key] for st in states]
        var = torch._foreach_addcmul(v, s, s, value=-c)  # (second - raw) in primed units
        sig = torch._foreach_sub(v, var)  # raw'
        torch._foreach_clamp_min_(var, rule.GATE_FLOOR * one_k * bc_v)
        torch._foreach_add_(sig, var, alpha=-shift)
        torch._foreach_clamp_min_(sig, 0.0)  # sig' (or the paper's p')
        if group["gate"] == "clamp":
            torch._foreach_div_(sig, var)
            torch._foreach_mul_(sig, 1.0 / tau_p)
            torch._foreach_clamp_max_(sig, 1.0)
            return sig, 1.0
        torch._foreach_add_(var, sig, alpha=1.0 / tau_p)  # (sig' + tau' var') / tau'
        torch._foreach_div_(sig, var)
        return sig, 1.0 / tau_p
