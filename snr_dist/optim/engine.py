"""The SNR half of an optimizer step, shared by `SNRAdamW` and `SNRPreconditioner`.

An optimizer owns its parameters, its base update and its state dict; the engine adds, per
param group, the estimators (`snr_dist.estimators`) and the distributor
(`snr_dist.distributors`), and runs a step's SNR phases in order:

1. `gradients` -- this rank's gradients, minus non-finite ones (skipped and counted);
2. `slots` / `update` -- the estimators fold the gradients into their statistics;
3. `exchange` -- one bucketed all-reduce of every partial statistic of the step, then the
   estimators finish their per-step statistics;
4. `gate_` -- the base update directions are multiplied by the gates;
5. `refresh` -- tracker refreshes due this step, sequenced by the distributor.

It also keeps the state layout fixed: estimator, mode, rank and basis side may not change once
a parameter has state.

The distributor follows what the parameters *are*, not only what they were at construction:
frameworks swap the tensors in ``param_groups`` after the optimizer exists (Accelerate and HF
Trainer shard a model with ``fully_shard`` after building its optimizer and put the DTensors
in its groups; DeepSpeed puts flat partitions there). Each time the groups are re-read the
engine checks the kind of parameters it holds (plain, DTensor, ZeRO row shard) and rebuilds
the distributor when it changed; at the first step it also checks that an estimator pooling
the ranks' gradients knows their group (an optimizer built before ``torch.distributed`` was
initialised could not), and refuses otherwise.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from snr_dist import estimators as est
from snr_dist import subspace
from snr_dist.cross_sample import MicrobatchStats
from snr_dist.distributors import LocalDistributor, make_distributor
from snr_dist.distributors.dtensor import (
    global_shape,
    is_dtensor,
    is_row_sharded,
    local,
    row_shard,
)
from snr_dist.estimators.base import Slot, impl
from snr_dist.grad_mode import no_grad
from snr_dist.kernels.compiled import AliasCache
from snr_dist.kernels.scratch import Scratch
from snr_dist.layout import Kind
from snr_dist.optim.capture import MicrobatchCapture
from snr_dist.optim.moment_sqrt import MomentSqrt
from snr_dist.optim.nonfinite import NonfiniteCounter, finite_flags
from snr_dist.options import LAYOUT_KEYS, SNROptions

#: Options that must agree across data-parallel ranks.
_AGREE = tuple(SNROptions.model_fields) + ("betas",)

Work = list[tuple[dict, dict[tuple[str, str], list[Slot]]]]


class SNREngine:
    """Estimators, distributor, micro-batch capture and non-finite policy of one optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, moments: est.Moments, process_group: Any):
        self.opt = optimizer
        self.estimators = est.build(moments)
        self.process_group = process_group
        # ``dist.group.WORLD`` is None until init_process_group: a None given before then may
        # have meant the world (see `_check_resolved`)
        self.built_before_init = not _initialised()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.distributor = make_distributor(params, process_group, pools_ranks=self._pools())
        self._param_kind = _param_kind(params)
        # each parameter's param group, kept after a framework takes it out of the groups
        # (DeepSpeed ZeRO-3 puts its flat partitions there only during step())
        self.homes: dict[Tensor, int] = {}
        self.capture = MicrobatchCapture(self.observe)
        self.nonfinite = NonfiniteCounter()
        self.flat_aliases = AliasCache()  # the compiled step's aliases of params and state
        self.path_cache: dict = {}  # the optimizer's per-step routing decisions (see sync_groups)
        self.moment_sqrt = MomentSqrt()  # Adam's sqrt(v) off MKL's slow path for zeros
        self.scratch = Scratch()  # the chunked CPU step's work buffers
        self._layouts: dict[int, tuple] = {}
        self._with_matrices: set[int] = set()  # ids of subspace groups that held matrices
        self._keys: dict[Tensor, int] = {}
        self._group_of: dict[Tensor, dict] = {}
        self._said: set[str] = set()  # the once-only warnings given
        self.sync_groups()

    # ------------------------------------------------------------------ groups
    def estimator(self, p: Tensor, group: dict) -> est.Estimator:
        return self.estimators[est.estimator_key(p, group)]

    def check_group(self, group: dict) -> None:
        """What a param group must satisfy beyond its options (before it is added)."""
        for p in group["params"]:
            if p.is_complex():  # the statistics are real: the imaginary part would be dropped
                raise ValueError(
                    f"{type(self.opt).__name__} does not support complex parameters (got "
                    f"{p.dtype} of shape {tuple(p.shape)}); train torch.view_as_real(p) as a "
                    "real parameter instead"
                )
        if group["mode"] == "subspace":
            for p in group["params"]:
                if est.estimator_key(p, group)[1] == "subspace":  # fail early on a bad side
                    subspace.basis_on_rows(global_shape(p), group["basis_side"], is_row_sharded(p))

    def index(self) -> None:
        """Which group each parameter is in (torch's load_state_dict replaces the groups);
        a new distributor if the kind of parameters changed (see the module docstring)."""
        groups = self.opt.param_groups
        params = [p for g in groups for p in g["params"]]
        self._keys = {p: i for i, p in enumerate(params)}
        self._group_of = {p: g for g in groups for p in g["params"]}
        homes = {p: i for i, g in enumerate(groups) for p in g["params"]}
        state = self.opt.state
        for p, i in self.homes.items():  # out of the groups now: kept while it has state
            if p not in homes and p in state:
                homes[p] = i
        self.homes = homes
        kind = _param_kind(params)
        if kind is not None and kind != self._param_kind:
            self._param_kind = kind
            self._new_distributor(params)

    def _pools(self) -> bool:
        return any(g["estimator"] == "cross_sample" for g in self.opt.param_groups)

    def _new_distributor(self, params: list[Tensor]) -> None:
        """The parameters are now another kind (plain tensors swapped for FSDP2's DTensors,
        typically): the distributor for what they are, owners and hooks again."""
        group = self.process_group
        if group is None and self.built_before_init:
            group = "auto"  # see `_check_resolved`
        self.distributor = make_distributor(params, group, pools_ranks=self._pools())
        self.path_cache.clear()
        self.flat_aliases.clear()
        for group_ in self.opt.param_groups:
            self.check_group(group_)
        self._distribute()

    def home(self, p: Tensor) -> int | None:
        """The index of ``p``'s param group, also after a framework took ``p`` out of the
        groups (DeepSpeed ZeRO-3 outside its step); None for a tensor never in them."""
        return self.homes.get(p)

    def group_of(self, p: Tensor) -> dict:
        """``p``'s param group. Frameworks may swap the tensors in ``param_groups`` (DeepSpeed
        ZeRO hands the optimizer flat partitions), so a miss re-reads the groups."""
        if p not in self._group_of:
            self.index()
        return self._group_of[p]

    def sync_groups(self) -> None:
        """Re-derive what depends on ``param_groups`` (after add_param_group or a load)."""
        self.path_cache.clear()
        self.moment_sqrt.clear()
        self.scratch.clear()
        self.index()
        self._layouts = {}
        for i, group in enumerate(self.opt.param_groups):
            self.check_group(group)
            if _has_matrices(group):
                self._with_matrices.add(id(group))
            self._check_layout(i, group)
        self._distribute()

    def _distribute(self) -> None:
        """Tracker owners and cross-sample hooks for the parameters in the groups now."""
        trackers, hooked = [], []
        for group in self.opt.param_groups:
            for p in group["params"]:
                e = self.estimator(p, group)
                if e.tracks:
                    trackers.append((p, e.cost(p, group)))
                if e.pools_ranks:
                    hooked.append(p)
        self.distributor.assign(trackers)
        self.capture.attach(hooked)
        if self.capture.fsdp_modules:  # attached before: groups added since are observed too
            self.capture.set_fsdp_wanted(self._fsdp_wanted())

    def _check_layout(self, index: int, group: dict) -> None:
        """Layout options are fixed once a parameter of the group has state."""
        now = tuple(group[k] for k in LAYOUT_KEYS)
        was = self._layouts.get(index)
        if was is None:
            with_state = [p for p in group["params"] if "step" in self.opt.state.get(p, {})]
            if not with_state:
                return
            bad = [
                p
                for p in with_state
                if not self.estimator(p, group).made(p, self.opt.state[p], group)
            ]
            if not bad:
                self._layouts[index] = now
                return
            raise ValueError(
                f"param group {index}: its state was created with other layout options than "
                f"{', '.join(f'{k}={v!r}' for k, v in zip(LAYOUT_KEYS, now))} (a parameter of "
                f"shape {tuple(bad[0].shape)} has state keys {sorted(self.opt.state[bad[0]])}); "
                f"{', '.join(LAYOUT_KEYS)} cannot change after the first step. "
                "Build the optimizer with the options its state was created with."
            )
        if now != was:
            changed = [(k, a, b) for k, a, b in zip(LAYOUT_KEYS, was, now) if a != b]
            k, a, b = changed[0]
            raise ValueError(
                f"param group {index}: {k} changed from {a!r} to {b!r} after the first step; "
                f"{', '.join(LAYOUT_KEYS)} decide which state tensors a parameter has and "
                "are fixed once it has state. Build a new optimizer to change them."
            )

    # ------------------------------------------------------------------ state
    def init_state(self, p: Tensor, group: dict, state: dict) -> None:
        """Allocate the estimator's state of ``p`` (the optimizer's own is not touched)."""
        self.estimator(p, group).init_state(p, local(p), state, group, self.key(p))

    def state_kinds(self, p: Tensor, group: dict, state: dict) -> dict[str, Kind]:
        return self.estimator(p, group).state_kinds(state)

    def key(self, p: Tensor) -> int:
        """A stable per-parameter integer (its position in the optimizer), for seeding."""
        if p not in self._keys:
            self.index()
        return self._keys[p]

    # ------------------------------------------------------------------ phase 1: gradients
    def begin_step(self) -> None:
        """Once: every rank runs the same configuration; every step: layouts unchanged."""
        if not self.distributor._checked:
            self.index()  # frameworks swap the parameters after construction (FSDP2, ZeRO)
            self._check_resolved()
            signature = [
                (
                    i,
                    {k: repr(g[k]) for k in sorted(g) if k in _AGREE},
                    [global_shape(p) for p in g["params"]],
                )
                for i, g in enumerate(self.opt.param_groups)
            ]
            self.distributor.check_consistent(signature, _first_difference)
        for i, group in enumerate(self.opt.param_groups):
            if id(group) in self._with_matrices and group["params"] and not _has_matrices(group):
                raise RuntimeError(
                    f"snr-dist: param group {i} has mode='subspace' and held weight matrices "
                    "when the optimizer was built, but now holds only flat 1-D tensors: "
                    "DeepSpeed ZeRO (and its bf16 optimizer) hand the client optimizer flat "
                    "partitions, on which subspace trackers cannot run. " + ZERO_PATHS
                )
        for i, group in enumerate(self.opt.param_groups):
            self._check_layout(i, group)

    def gradients(
        self, group: dict, skip_nonfinite: bool, who: str, unchecked: set[Tensor] = frozenset()
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(params, grads, skipped)``: params with a gradient (grads as this rank's local
        tensors), minus non-finite ones (counted) when ``skip_nonfinite``. The caller drops
        the skipped params' micro-batch sums once the step is sure to proceed. Params in
        ``unchecked`` are not checked here (their step masks non-finite gradients on the
        device, without a host read)."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"{who} does not support sparse gradients (got one for a parameter of "
                    f"shape {tuple(p.shape)}); use dense gradients, e.g. "
                    "nn.Embedding(sparse=False)"
                )
            params.append(p)
            grads.append(local(p.grad))
        skipped: list[Tensor] = []
        check = [i for i, p in enumerate(params) if p not in unchecked]
        if skip_nonfinite and check:
            flags = finite_flags([grads[i] for i in check])
            flags = self.distributor.agree_on_skips(flags, grads[check[0]].device)
            ok = [True] * len(params)
            for i, f in zip(check, flags):
                ok[i] = f
            if not all(ok):
                skipped = [p for p, f in zip(params, ok) if not f]
                for p in skipped:
                    self.nonfinite.record(p)
                params = [p for p, f in zip(params, ok) if f]
                grads = [g for g, f in zip(grads, ok) if f]
        return params, grads, skipped

    def check_ready(self, group: dict, params: list[Tensor]) -> None:
        """Fail before any state changes if a cross-sample step lacks micro-batches.

        Two shortfalls are expected, not mistakes, and pass: a short last window of gradient
        accumulation in one process (frameworks step on an epoch's remainder), for parameters
        with statistics from earlier steps; and a parameter unfrozen since the optimizer
        hooked its parameters, whose micro-batches went unseen. Their estimators keep the
        statistics they have for this step (none yet: the gate stays closed)."""
        if group["estimator"] != "cross_sample":
            return
        world = self.distributor.world
        need = 2 if world == 1 else 1  # under data parallelism the ranks add up
        short, late = 0, 0
        for p in params:
            stats = self.capture.stats.get(p)
            count = 0 if stats is None else stats.count
            if count >= need:
                continue
            if p in self.capture.dormant and p.requires_grad:
                late += 1
                continue
            if world == 1 and self._has_statistics(p, group):
                short += 1
                continue
            if count < need:
                raise RuntimeError(
                    "snr-dist: estimator='cross_sample' needs >= 2 gradient contributions per "
                    "step (micro-batches of gradient accumulation or data-parallel ranks); a "
                    f"parameter of shape {tuple(p.shape)} saw {count} since the last step"
                    + (f" on rank {self.distributor.rank}" if world > 1 else "")
                    + self._why_unseen(p)
                )
        if late:
            self.capture.wake()
            self._say_once(
                "late",
                f"snr-dist: {late} parameter(s) of an estimator='cross_sample' group became "
                "trainable after the optimizer hooked its parameters, so this step saw none of "
                "their micro-batches: they are observed from the next step on, and until a "
                "step has measured their noise their gate is closed (unfreeze before "
                "optimizer.zero_grad(), or call optimizer.sync_param_groups(), to observe them "
                "at once)",
            )
        if short:
            self._say_once(
                "short",
                f"snr-dist: a step of estimator='cross_sample' saw fewer than 2 micro-batch "
                f"gradients of {short} parameter(s) (a short last window of gradient "
                "accumulation, e.g. at the end of an epoch): their noise statistics carry over "
                "from the previous steps (said once)",
            )

    def _why_unseen(self, p: Tensor) -> str:
        """The end of `check_ready`'s refusal: why ``p``'s micro-batches went unseen, and the
        way that works."""
        if is_dtensor(p) and id(p) not in self.capture.fsdp_wanted:
            return (
                ". Under FSDP2 the optimizer holds reduced gradient shards; each rank's own "
                "gradient is seen on FSDP2's unsharded parameters once opt.attach_fsdp(model) "
                "has run (snr_dist.fsdp.wrap, snr_dist.integrations.accelerate.prepare and "
                "snr_dist.integrations.transformers.SNRTrainer call it; with your own "
                "fully_shard call it once before training)."
            )
        hooked = p in self.capture.handles or p in self.capture.dormant
        if not is_dtensor(p) and row_shard(p) is None and not hooked:
            return (
                ": this tensor was put in the optimizer's param groups after it was built, so "
                "no gradient hook observes it. DeepSpeed ZeRO 1-3 (and its bf16 optimizer) "
                "hand the client optimizer flat partitions that cut across the model's tensors "
                "and hold only the reduced gradient; each rank's own gradients exist on the "
                "model's parameters only. " + ZERO_PATHS
            )
        return ". Run several backward passes before step(), or use estimator='temporal'."

    def _check_resolved(self) -> None:
        """At the first step: an estimator that pools the ranks' own gradients, run local to
        each rank while several ranks train plain tensors, because the optimizer was built
        before ``torch.distributed`` was initialised ("auto" could not ask for the group then,
        and ``dist.group.WORLD`` was None), is refused: each rank's statistics, and then the
        replicas' parameters, would drift apart."""
        if not isinstance(self.distributor, LocalDistributor) or self._param_kind != "plain":
            return
        if not (self._pools() and self.built_before_init and _initialised()):
            return
        capture = self.capture
        pooled = [
            p
            for g in self.opt.param_groups
            if g["estimator"] == "cross_sample"
            for p in g["params"]
        ]
        if any(p not in capture.handles and p not in capture.dormant for p in pooled):
            return  # tensors swapped in by a framework (ZeRO): `check_ready` says what to do
        world = torch_dist.get_world_size()
        if world <= 1 or self.process_group not in ("auto", None):
            return
        raise ValueError(
            "snr-dist: estimator='cross_sample' pools the gradients of the data-parallel ranks, "
            "but this optimizer was built before torch.distributed was initialised "
            f"(process_group={self.process_group!r}; dist.group.WORLD is None until "
            f"init_process_group runs), and now {world} ranks train it. Run local to each "
            "rank, its statistics and then the ranks' parameters would drift apart under DDP. "
            "Build the optimizer once the process group exists, with "
            "process_group=dist.group.WORLD (or your data-parallel group), or "
            "process_group=None for an optimizer local to its rank. HF Trainer: pass "
            "optimizer_cls_and_kwargs=snr_adamw(args, estimator='cross_sample') (or use "
            "snr_dist.integrations.transformers.SNRTrainer), which builds it then; Accelerate: "
            "create it after the Accelerator; Lightning: in configure_optimizers."
        )

    def _has_statistics(self, p: Tensor, group: dict) -> bool:
        """``p`` has finished a step of its estimator (its statistics are worth carrying)."""
        state = self.opt.state.get(p)
        if not state or "step" not in state:
            return False
        return float(state["step"]) >= 1 and self.estimator(p, group).made(p, state, group)

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            warnings.warn(message, stacklevel=4)

    def _fsdp_wanted(self) -> list[Tensor]:
        return [
            p
            for g in self.opt.param_groups
            if g["estimator"] == "cross_sample"
            for p in g["params"]
            if is_dtensor(p)
        ]

    def attach_fsdp(self, model) -> None:
        """Observe the cross-sample parameters' per-rank gradients on ``model``'s FSDP2
        modules (see `MicrobatchCapture.attach_fsdp`)."""
        wanted = self._fsdp_wanted()
        if not wanted:
            return
        if self.capture.attach_fsdp(model, wanted) == 0:
            raise ValueError(
                f"attach_fsdp: {type(model).__name__} has no fully_shard modules; shard it "
                "first (snr_dist.fsdp.shard or torch.distributed.fsdp.fully_shard)"
            )

    # ------------------------------------------------------------------ cross-sample capture
    @no_grad
    def observe(
        self, p: Tensor, grad: Tensor, weight: float | None = None, direct: bool = False
    ) -> None:
        """Record one micro-batch gradient contribution of ``p`` (hooks call this; ``direct``:
        from a hook on ``p`` itself, whose ``.grad`` then holds the sum of what was recorded)."""
        if grad.is_sparse:
            raise RuntimeError("snr-dist does not support sparse gradients")
        group = self.group_of(p)
        e = self.estimator(p, group)
        state = self.opt.state[p]
        tracker = None
        if e.tracks:
            if "basis" not in state:
                self.init_state(p, group, state)
            tracker = state
        # FSDP2 / ZeRO: ``grad`` is the whole parameter's, ``p`` holds some of its rows
        sharded = is_dtensor(p) or row_shard(p) is not None
        if direct and p.grad is None:
            # the sums describe what ``p.grad`` holds: cleared without this optimizer's
            # zero_grad (``model.zero_grad()`` after a step a loss scaler skipped), they go too
            self.capture.stats.pop(p, None)
        stats = self.capture.stats.setdefault(p, MicrobatchStats())
        prev = None if p.grad is None or sharded else local(p.grad)
        w = self.capture.weight if weight is None else weight
        kernels = "torch" if tracker is None else impl(group, grad.device)
        stats.observe(local(grad), w, prev, tracker, kernels)
        if sharded:  # no running sum to measure a rescaling against: c is the world size
            stats.total_sq = None

    # ------------------------------------------------------------------ phase 2: statistics
    def slots(
        self, group: dict, params: list[Tensor], grads: list[Tensor], steps: list[int]
    ) -> dict[tuple[str, str], list[Slot]]:
        """This step's parameters of ``group`` by estimator (micro-batch sums attached)."""
        out: dict[tuple[str, str], list[Slot]] = defaultdict(list)
        for p, g, t in zip(params, grads, steps):
            micro = self.capture.stats.pop(p, None)
            state = self.opt.state[p]
            if micro is None and self.estimator(p, group).pools_ranks:  # see `check_ready`
                micro = MicrobatchStats.none_seen(g, state if "basis" in state else None)
            out[est.estimator_key(p, group)].append(Slot(p, state, g, t, micro))
        return out

    def update(
        self, group: dict, by_est: dict[tuple[str, str], list[Slot]], scratch: Scratch | None = None
    ) -> None:
        """The estimators fold the step's gradients in (elementwise ones into ``scratch``'s
        buffers when given)."""
        for key, slots in by_est.items():
            e = self.estimators[key]
            if scratch is not None and e.elementwise:
                e.update(group, slots, scratch)
            else:
                e.update(group, slots)

    @no_grad
    def exchange(self, work: Work) -> None:
        """One bucketed all-reduce of the step's partial statistics, then the estimators
        finish. Which vectors are partial: those pooling every rank's own gradients, and,
        where ranks hold rows of each parameter, all of them."""
        dist = self.distributor
        pending, to_sum = [], []
        for group, by_est in work:
            for key, slots in by_est.items():
                e = self.estimators[key]
                vecs = e.partial_sums(group, slots)
                if not vecs:
                    continue
                partial = dist.world > 1 and (e.pools_ranks or dist.partial_statistics)
                if partial:
                    to_sum.extend(vecs)
                pending.append((e, group, slots, vecs, dist.world if partial else 1))
        dist.sum_(to_sum)
        for e, group, slots, vecs, world in pending:
            e.finish(group, slots, vecs, world)

    # ------------------------------------------------------------------ phase 3: gates
    @no_grad
    def gate_(
        self,
        group: dict,
        slots: list[Slot],
        directions: list[Tensor],
        out: list[Tensor] | None = None,
        alphas: list[float] | None = None,
        foreach: bool = True,
        decay: float = 1.0,
    ) -> None:
        """Gate the base update ``directions`` (local tensors) in place, or, with ``out`` and
        ``alphas``, ``out <- decay * out + alpha * gated direction`` (directions untouched;
        ``decay``: the decoupled weight decay, which trackers fold into a matmul)."""
        by_est: dict[tuple[str, str], list[int]] = defaultdict(list)
        closed = est.complement_closed(group)
        for i, s in enumerate(slots):
            key = est.estimator_key(s.param, group)
            if est.gate_active(group, s.step) or (closed and self.estimators[key].tracks):
                by_est[key].append(i)
            elif out is not None:
                if decay != 1.0:
                    out[i].mul_(decay)
                out[i].add_(directions[i], alpha=alphas[i])
        for key, idx in by_est.items():
            e = self.estimators[key]
            outs = None if out is None else [out[i] for i in idx]
            kw = {}
            if outs is not None and decay != 1.0:
                if getattr(e, "gate_decay", False):
                    kw["decay"] = decay
                else:
                    torch._foreach_mul_(outs, decay)
            e.gate_(
                group,
                [slots[i] for i in idx],
                [directions[i] for i in idx],
                outs,
                None if alphas is None else [alphas[i] for i in idx],
                foreach,
                **kw,
            )

    # ------------------------------------------------------------------ phase 4: refresh
    @no_grad
    def refresh(self, work: Work) -> None:
        jobs = [
            job
            for group, by_est in work
            for key, slots in by_est.items()
            for job in self.estimators[key].refresh_jobs(group, slots)
        ]
        self.distributor.refresh(jobs)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.capture.close()


ZERO_PATHS = (
    "Build the DeepSpeed engine through snr-dist, which attaches row shards after DeepSpeed "
    "has built its optimizer: snr_dist.deepspeed.initialize, "
    "snr_dist.integrations.accelerate.prepare, snr_dist.integrations.transformers.SNRTrainer "
    "(HF Trainer with TrainingArguments(deepspeed=...)) or "
    "snr_dist.integrations.lightning.SNRDeepSpeedStrategy; or call "
    "optimizer.attach_zero(engine.optimizer) right after deepspeed.initialize."
)
"""The ways to run subspace mode and the cross-sample estimator under DeepSpeed ZeRO."""


def _initialised() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def _param_kind(params: list[Tensor]) -> str | None:
    """What a framework made the parameters: "dtensor" (FSDP2), "rows" (ZeRO row shards),
    "fsdp1" (FSDP1's flat parameters), "plain", or None for no parameters."""
    if not params:
        return None
    if any(is_dtensor(p) for p in params):
        return "dtensor"
    if any(row_shard(p) is not None for p in params):
        return "rows"
    if any(getattr(p, "_fsdp_flattened", False) for p in params):
        return "fsdp1"
    return "plain"


def _has_matrices(group: dict) -> bool:
    """Whether a subspace group has a parameter its trackers serve."""
    return group["mode"] == "subspace" and any(
        est.estimator_key(p, group)[1] == "subspace" for p in group["params"]
    )


def _first_difference(a, b) -> str:
    """A short description of where two ranks' configurations differ."""
    if len(a) != len(b):
        return f"{len(a)} vs {len(b)} param groups"
    for (i, oa, sa), (_, ob, sb) in zip(a, b):
        for k in sorted(set(oa) | set(ob)):
            if oa.get(k) != ob.get(k):
                return f"param group {i} option {k!r}: {oa.get(k)} vs {ob.get(k)}"
        if sa != sb:
            return f"param group {i} parameter shapes differ"
    return "unknown"
