"""The SNR machinery shared by `SNRAdamW` and `SNRPreconditioner`.

An optimizer owns the parameters and their state; `SNRGating` adds, per parameter group,
the SNR statistics (temporal EMAs, cross-sample micro-batch sums, subspace trackers) and turns a
list of base update directions into gated ones. A step runs in phases, the same in one process
and under data parallelism (`snr_dist.distributed`): statistics (`update_statistics`), one
bucketed all-reduce of ``O(rank)`` numbers per tracked matrix (`exchange`), gates (`gate_`),
and, every so often, basis refreshes by the trackers' owners (`refresh`). The maths is in
`snr_dist.snr` and
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
from snr_dist import kernels as kernel_dispatch
from snr_dist import snr as rule
from snr_dist.cross_sample import MicrobatchStats
from snr_dist.distributed.assignment import assign_owners
from snr_dist.distributed.context import detect_context, is_row_sharded, local
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


SNR_KEYS = frozenset(
    (
        "estimator",
        "mode",
        "gate",
        "tau",
        "gate_a",
        "snr_beta",
        "snr_beta2",
        "warmup_steps",
        "rank",
        "refresh_every",
        "sketch_beta",
        "basis_side",
        "seed",
        "betas",
    )
)


def _first_difference(a, b) -> str:
    """A short description of where two rank signatures differ."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} param groups"
    for (i, oa, sa), (_, ob, sb) in zip(a, b):
        for k in sorted(set(oa) | set(ob)):
            if oa.get(k) != ob.get(k):
                return f"param group {i} option {k!r}: {oa.get(k)} vs {ob.get(k)}"
        if sa != sb:
            return f"param group {i} parameter shapes differ"
    return "unknown"


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
    """``(params, grads, skipped)`` of a group: params with a gradient (grads as this rank's
    local tensors), minus non-finite ones (counted and warned about once) when
    ``skip_nonfinite``. The caller drops the skipped params' micro-batch statistics once the
    step is sure to proceed."""
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
        grads.append(local(p.grad))
    skipped: list[Tensor] = []
    if skip_nonfinite and params:
        ok = finite_flags(grads)
        if gating.ctx.sharded:  # a NaN in one shard must skip the parameter on every rank
            flags = torch.tensor([0.0 if f else 1.0 for f in ok], device=grads[0].device)
            gating.ctx.comm.all_reduce_([flags])
            ok = [bool(f == 0) for f in flags.tolist()]
        if not all(ok):
            skipped = [p for p, f in zip(params, ok) if not f]
            for p in skipped:
                gating.record_nonfinite(p)
            params = [p for p, f in zip(params, ok) if f]
            grads = [g for g, f in zip(grads, ok) if f]
    return params, grads, skipped


class SNRGating:
    """Per-parameter SNR statistics and gates, stored in ``optimizer.state``."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, moment_source, process_group="auto"
    ) -> None:
        # ``moment_source(group) -> MomentSource``
        self.opt = optimizer
        self.moment_source = moment_source
        self.ctx = detect_context(optimizer.param_groups, process_group)
        self._micro: dict[Tensor, MicrobatchStats] = {}
        self._hooked: dict[Tensor, torch.utils.hooks.RemovableHandle] = {}
        self._weight = 1.0
        self.nonfinite_skips: dict[Tensor, int] = defaultdict(int)
        self._warned_nonfinite = False
        self._keys: dict[Tensor, int] = {}
        self._group_of: dict[Tensor, dict] = {}
        self._gates: dict[Tensor, Tensor] = {}  # subspace gates of the current step
        self._vec: dict[Tensor, Tensor] = {}  # all-reduced temporal vectors of this step
        self._pending_stats: dict[Tensor, MicrobatchStats] = {}
        self.last: dict[Tensor, dict] = {}  # per subspace param: raw, var, k, gates, captured
        self.refresh_groups()

    # ------------------------------------------------------------------ bookkeeping
    def refresh_groups(self) -> None:
        """Re-derive everything that depends on ``param_groups`` (after add/load)."""
        self._keys = {}
        self._group_of = {p: g for g in self.opt.param_groups for p in g["params"]}
        for group in self.opt.param_groups:
            if self.ctx.sharded and group["estimator"] == "cross_sample":
                raise ValueError(
                    "estimator='cross_sample' is not supported with FSDP2 (DTensor) "
                    "parameters: fully_shard reduce-scatters gradients inside backward, before "
                    "snr-dist can observe a rank's own gradient. Use estimator='temporal' "
                    "(it needs no communication), or DistributedDataParallel."
                )
            for p in group["params"]:
                if self.kind(p, group) == "subspace":  # fail early on an impossible side
                    subspace.basis_on_rows(tuple(p.shape), group["basis_side"], is_row_sharded(p))
        self.assign()
        self.register_hooks()

    def assign(self) -> None:
        """Owners of the subspace trackers: longest job (m * n * r) first, least loaded rank."""
        tracked, costs = [], []
        for group in self.opt.param_groups:
            for p in group["params"]:
                if self.kind(p, group) == "subspace":
                    shape = tuple(p.shape)
                    rows = subspace.basis_on_rows(shape, group["basis_side"], is_row_sharded(p))
                    tracked.append(p)
                    costs.append(p.numel() * subspace.effective_rank(shape, rows, group["rank"]))
        owners = assign_owners(costs, self.ctx.world)
        self.ctx.owners = dict(zip(tracked, owners))
        self.costs = dict(zip(tracked, costs))

    def key(self, p: Tensor) -> int:
        """A stable per-parameter integer (its position in the optimizer), for seeding."""
        if p not in self._keys:
            self._keys = {
                q: i for i, q in enumerate(q for g in self.opt.param_groups for q in g["params"])
            }
        return self._keys[p]

    def kind(self, p: Tensor, group: dict) -> str:
        return param_mode(tuple(p.shape), group["mode"])

    @staticmethod
    def impl(group: dict, device) -> str:
        """``"torch"`` or ``"triton"`` for the hot loops of this group on ``device``."""
        return kernel_dispatch.resolve(group.get("kernels", "auto"), device)

    def _init_tracker(
        self, p: Tensor, group: dict, state: dict, participant: bool | None = None
    ) -> None:
        """Tracker buffers of ``p`` for this rank (``participant``: override, e.g. to get the
        owner's shapes on a rank that does not own it)."""
        if participant is None:
            participant = self.ctx.participates(p)
        subspace.init_tracker(
            state,
            tuple(p.shape),
            tuple(local(p).shape),
            group,
            local(p).device,
            self.key(p),
            cross=group["estimator"] == "cross_sample",
            participant=participant,
            sharded_rows=is_row_sharded(p),
        )

    def init_state(self, p: Tensor, group: dict, state: dict) -> None:
        """Allocate the SNR buffers of ``p`` (the base optimizer's own are not touched)."""
        src = self.moment_source(group)
        lp = local(p)
        f32 = dict(device=lp.device, dtype=torch.float32)
        cross = group["estimator"] == "cross_sample"
        sub = self.kind(p, group) == "subspace"
        if sub and "basis" not in state:
            self._init_tracker(p, group, state)
        elif not sub and cross:
            state["raw_avg"] = torch.zeros(lp.shape, **f32)
            state["var_avg"] = torch.zeros(lp.shape, **f32)
        if not cross:
            if src.owns_mean and (not sub or self.ctx.participates(p)):
                state[src.mean_key] = torch.zeros(lp.shape, **f32)
            if src.owns_sq and not sub:
                state[src.sq_key] = torch.zeros(lp.shape, **f32)

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

    def check_consistent(self) -> None:
        """Every rank must run the same SNR configuration on the same parameter shapes."""
        if self.ctx.world == 1:
            return
        mine = [
            (
                i,
                {k: repr(g[k]) for k in sorted(g) if k in SNR_KEYS},
                [tuple(p.shape) for p in g["params"]],
            )
            for i, g in enumerate(self.opt.param_groups)
        ]
        everyone = self.ctx.comm.all_gather_object(mine)
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                diff = _first_difference(everyone[0], theirs)
                raise ValueError(
                    f"snr-dist: the SNR configuration differs across data-parallel ranks "
                    f"(rank 0 vs rank {rank}: {diff}); every rank must build the optimizer "
                    "with the same options and parameters"
                )

    # ------------------------------------------------------------------ cross-sample capture
    def register_hooks(self) -> None:
        """Capture each micro-batch's gradient of cross-sample params before accumulation
        (and before DDP's all-reduce)."""
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
                self._init_tracker(p, group, state)
            tracker = state
        stats = self._micro.setdefault(p, MicrobatchStats())
        prev = None if p.grad is None else local(p.grad)
        w = self._weight if weight is None else weight
        impl = "torch" if tracker is None else self.impl(group, grad.device)
        stats.observe(local(grad), w, prev, tracker, impl)

    @contextlib.contextmanager
    def microbatch(self, weight: float) -> Iterator[None]:
        if not weight > 0:
            raise ValueError(f"Invalid microbatch weight: {weight!r}; allowed: a float > 0")
        old, self._weight = self._weight, float(weight)
        try:
            yield
        finally:
            self._weight = old

    def discard_microbatches(self, params: list[Tensor] | None = None) -> None:
        """Forget recorded micro-batch gradients (of ``params``, or all of them)."""
        if params is None:
            self._micro.clear()
        for p in params or ():
            self._micro.pop(p, None)

    def check_ready(self, group: dict, params: list[Tensor]) -> None:
        """Fail before any state changes if a cross-sample step lacks micro-batches."""
        if group["estimator"] != "cross_sample":
            return
        need = 2 if self.ctx.world == 1 else 1  # under data parallelism the ranks add up
        for p in params:
            stats = self._micro.get(p)
            count = 0 if stats is None else stats.count
            if count < need:
                raise RuntimeError(
                    "snr-dist: estimator='cross_sample' needs >= 2 gradient contributions per "
                    "step (micro-batches of gradient accumulation or data-parallel ranks); a "
                    f"parameter of shape {tuple(p.shape)} saw {count} since the last step"
                    + (f" on rank {self.ctx.rank}" if self.ctx.world > 1 else "")
                    + ". Run several backward passes before step(), or use "
                    "estimator='temporal'."
                )

    # ------------------------------------------------------------------ phase 1: statistics
    @torch.no_grad()
    def update_statistics(
        self, group: dict, params: list[Tensor], grads: list[Tensor], steps: list[int]
    ) -> None:
        """Fold this step's gradients (local fp32 tensors, sign-flipped for ``maximize``) into
        the local statistics. Called after the optimizer advanced ``state['step']``."""
        src = self.moment_source(group)
        states = [self.opt.state[p] for p in params]
        if group["estimator"] == "temporal":
            mine = [
                i
                for i, p in enumerate(params)
                if self.kind(p, group) == "diagonal" or self.ctx.participates(p)
            ]
            if src.owns_mean and mine:
                torch._foreach_lerp_(
                    [states[i][src.mean_key] for i in mine],
                    [grads[i] for i in mine],
                    1.0 - src.beta_s,
                )
            if src.owns_sq:
                diag = [i for i, p in enumerate(params) if self.kind(p, group) == "diagonal"]
                if diag:
                    sq = [states[i][src.sq_key] for i in diag]
                    gs = [grads[i] for i in diag]
                    torch._foreach_mul_(sq, src.beta_v)
                    torch._foreach_addcmul_(sq, gs, gs, value=1.0 - src.beta_v)
        for p, g, st in zip(params, grads, states):
            if self.kind(p, group) == "subspace" and self.ctx.participates(p):
                subspace.observe(
                    st, g, src.beta_v, src.beta_s, group["sketch_beta"], self.impl(group, g.device)
                )

    # ------------------------------------------------------------------ phase 2: exchange
    @torch.no_grad()
    def exchange(self, work: list[tuple[dict, list[Tensor], list[Tensor], list[int]]]) -> None:
        """One bucketed all-reduce for the whole step, then the subspace gates and the
        cross-sample statistics. ``work``: (group, params, local fp32 grads, steps)."""
        items = []  # (kind, group, p, g, t, vector)
        owned = []  # DDP owners' trackers: gates computed locally, before the all-reduce
        for group, params, grads, steps in work:
            cross = group["estimator"] == "cross_sample"
            src = self.moment_source(group)
            for p, g, t in zip(params, grads, steps):
                state = self.opt.state[p]
                sub = self.kind(p, group) == "subspace"
                if cross:
                    stats = self._micro.pop(p)
                    self._pending_stats[p] = stats
                    vec = stats.to_vector(sub)
                    items.append(("cross_sub" if sub else "cross_diag", group, p, g, t, vec))
                elif sub and self.ctx.mode == "replicated":
                    if self.ctx.owns(p):  # the owner has the whole statistics: gates locally
                        owned.append(
                            (p, group, subspace.temporal_vector(state, state[src.mean_key]), t)
                        )
                    gates = torch.zeros(state["basis"].shape[1] + 1, device=g.device)
                    items.append(("gates", group, p, g, t, gates))
                elif sub:
                    vec = subspace.temporal_vector(state, state[src.mean_key])
                    items.append(("temporal", group, p, g, t, vec))
        if not items:
            return
        if owned:
            gates_of = self._temporal_gates(owned)
            for it in items:
                if it[0] == "gates" and it[2] in gates_of:
                    it[5].copy_(gates_of[it[2]])
        self.ctx.comm.all_reduce_([it[5] for it in items])
        c_sq = None if self.ctx.world == 1 else float(self.ctx.world) ** 2
        temporal = [(p, group, vec, t) for kind, group, p, _, t, vec in items if kind == "temporal"]
        if temporal:
            for p, _, vec, _ in temporal:
                self._vec[p] = vec
            self._gates.update(self._temporal_gates(temporal))
        for kind, group, p, g, t, vec in items:
            state = self.opt.state[p]
            if kind == "gates":
                self._gates[p] = vec
                if not self.ctx.owns(p):
                    self.last[p] = {"gates": vec}
            elif kind == "temporal":
                continue
            else:
                stats = self._pending_stats.pop(p)
                if c_sq is None:  # one process: the sums are already global; c is measured
                    scale = stats.unit_scale_sq(g)
                else:  # data parallel: global sums, and the reduction averaged the ranks' sums
                    stats = MicrobatchStats.from_vector(vec, kind == "cross_sub", g.shape)
                    scale = c_sq
                beta = group["snr_beta"]
                if kind == "cross_sub":
                    raw_d, var_d, raw_e, var_e = cross_sample.subspace_moments(
                        stats, g, scale, state, self.impl(group, g.device)
                    )
                    state["raw_dir"].lerp_(raw_d, 1.0 - beta)
                    state["noise_dir"].lerp_(var_d, 1.0 - beta)
                    state["raw_energy"].lerp_(raw_e, 1.0 - beta)
                    state["noise_energy"].lerp_(var_e, 1.0 - beta)
                    raw, var = subspace.cross_direction_moments(state, t, beta)
                    gates = self._gate_values(group, raw, var, 1.0, t)
                    self._gates[p] = gates
                    self.last[p] = {
                        "raw": raw,
                        "var": var,
                        "k": 1.0,
                        "gates": gates,
                        "captured": (state["raw_dir"].sum(), state["raw_energy"]),
                    }
                else:
                    raw, var = cross_sample.diagonal_moments(stats, g, scale)
                    state["raw_avg"].lerp_(raw, 1.0 - beta)
                    state["var_avg"].lerp_(var, 1.0 - beta)

    def _gate_values(self, group: dict, raw: Tensor, var: Tensor, k: float, t: int) -> Tensor:
        if not self.gate_active(group, t):
            return torch.ones_like(raw)
        return rule.gate(raw, var, k, group["gate"], group["tau"], group["gate_a"])

    def _temporal_gates(self, entries: list[tuple]) -> dict[Tensor, Tensor]:
        """Gates of temporal subspace trackers from their (all-reduced) vectors, computed for
        all trackers of a group with the same rank and step at once (one batch of small ops
        instead of one per matrix). ``entries``: (param, group, vector, step)."""
        batches: dict[tuple, list] = defaultdict(list)
        for p, group, vec, t in entries:
            batches[(id(group), vec.numel(), t)].append((p, group, vec))
        out: dict[Tensor, Tensor] = {}
        for (_, n, t), batch in batches.items():
            group = batch[0][1]
            src = self.moment_source(group)
            vecs = torch.stack([vec for _, _, vec in batch])
            raw, var, k = subspace.temporal_direction_moments(vecs, t, src.beta_s, src.beta_v)
            gates = self._gate_values(group, raw, var, k, t)
            r = (n - 2) // 2
            for i, (p, _, vec) in enumerate(batch):
                out[p] = gates[i]
                self.last[p] = {
                    "raw": raw[i],
                    "var": var[i],
                    "k": k,
                    "gates": gates[i],
                    "captured": (vec[:r].sum(), vec[2 * r]),
                }
        return out

    # ------------------------------------------------------------------ phase 4: refresh
    @torch.no_grad()
    def refresh(self, work: list[tuple[dict, list[Tensor], list[Tensor], list[int]]]) -> None:
        """Refresh the due trackers: partial sketches summed to each owner, the owner solves,
        bases (and what the other shards need) broadcast from it, bucketed per owner."""
        due = []
        for group, params, _, steps in work:
            for p, t in zip(params, steps):
                if self.kind(p, group) == "subspace" and subspace.refresh_due(
                    t, group["refresh_every"]
                ):
                    due.append((group, p, t))
        if not due:
            return
        ctx, comm = self.ctx, self.ctx.comm
        solved: dict[Tensor, tuple] = {}
        if ctx.mode == "sharded":
            partials = {p: subspace.refresh_partials(self.opt.state[p]) for _, p, _ in due}
            for owner in range(ctx.world):
                mine = [t for _, p, _ in due if ctx.owner(p) == owner for t in partials[p]]
                comm.reduce_(mine, owner)
        for group, p, t in due:
            state = self.opt.state[p]
            src = self.moment_source(group)
            if ctx.mode != "sharded" and ctx.owns(p):
                subspace.refresh(state, self._mean(state, group), t, src.beta_s, src.beta_v)
                solved[p] = (state["basis"], state["eigvals"], None)
            elif ctx.mode == "sharded" and ctx.owns(p):
                temporal = (self._vec[p], t, src.beta_s, src.beta_v)
                solved[p] = subspace.refresh_solve(
                    state["basis"], partials[p], float(state["sketch_weight"]), temporal
                )
            else:
                q = state["basis"]
                r = q.shape[1]
                cov = torch.zeros(r, r, device=q.device) if ctx.mode == "sharded" else None
                solved[p] = (torch.zeros_like(q), torch.zeros(r, device=q.device), cov)
        if ctx.world > 1:
            for owner in range(ctx.world):
                mine = [
                    t
                    for _, p, _ in due
                    if ctx.owner(p) == owner
                    for t in solved[p]
                    if t is not None
                ]
                comm.broadcast_(mine, owner)
        for group, p, t in due:
            if ctx.mode != "sharded" and ctx.owns(p):
                continue  # refreshed in place above
            src = self.moment_source(group)
            state = self.opt.state[p]
            q_new, evals, cov_rot = solved[p]
            subspace.refresh_apply(
                state,
                q_new.clone(),
                evals.clone(),
                cov_rot,
                self._mean(state, group),
                ctx.owns(p),
                t,
                src.beta_s,
                src.beta_v,
            )

    def _mean(self, state: dict, group: dict) -> Tensor | None:
        if group["estimator"] == "cross_sample":
            return None
        return state.get(self.moment_source(group).mean_key)

    # ------------------------------------------------------------------ phase 3: gates
    def gate_active(self, group: dict, step: int) -> bool:
        if group["gate"] == "none" or step <= group["warmup_steps"]:
            return False
        # One gradient carries no variance estimate for the temporal estimator.
        return group["estimator"] == "cross_sample" or step >= 2

    def moments(self, p: Tensor, group: dict, state: dict, step: int, index=None):
        """``(raw, var, k)`` of a diagonal parameter at ``step`` (optionally only at the flat
        ``index``); subspace parameters: see ``last``."""
        src = self.moment_source(group)
        pick = (lambda t: t.reshape(-1)[index]) if index is not None else (lambda t: t)
        if group["estimator"] == "cross_sample":
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
        """Gates of ``p``: recomputed for diagonal parameters, this step's for subspace ones."""
        if self.kind(p, group) == "subspace":
            return self._gates[p]
        raw, var, k = self.moments(p, group, state, step, index)
        return self._gate_values(group, raw, var, k, step)

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
        """Multiply the base update ``directions`` (local tensors) by their gates, in place.
        Indices in ``skip`` were gated by the caller (see `fast_buckets`); a direction may be
        None where no gate is active. With ``out`` (fp32 tensors) and ``alphas``, add
        ``alpha * gated direction`` into ``out`` instead (directions are left untouched)."""
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
                    alpha = 1.0 if out is None else alphas[i]
                    subspace.apply_gates(state, d, g, o, alpha, self.impl(group, d.device))
                elif out is None:
                    d.mul_(g)
                else:
                    out[i].addcmul_(d, g, value=alphas[i])
            elif out is not None:
                out[i].add_(d, alpha=alphas[i])

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
