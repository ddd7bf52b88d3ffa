"""SNRAdamW: AdamW whose update is gated by a per-coordinate or per-eigendirection SNR.

Same shape as ``torch.optim.AdamW``: hyper-parameters validated in ``__init__``, per-tensor and
multi-tensor (foreach, the default) implementations of one algorithm, a state_dict that
round-trips bit-exactly. The algorithm is `snr_dist.snr.snr_adamw_reference_step` plus the
subspace and cross-sample estimators; the step below reads like it: Adam's moments, the
estimators' statistics, one exchange, the gated update, the tracker refreshes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from snr_dist import kernels as kernel_dispatch
from snr_dist.distributors.dtensor import local
from snr_dist.estimators import (
    DiagonalInnovation,
    DiagonalSecondMoment,
    Moments,
    Slot,
    gate_active,
)
from snr_dist.estimators import estimator_key as est_key
from snr_dist.estimators.diagonal_second_moment import FOREACH_RULES
from snr_dist.kernels import step_kernels, warn_no_compile
from snr_dist.kernels.compiled import COMPILED_RULES, compilable, compiled_snr_adamw_step
from snr_dist.kernels.compiled import prepare as prepare_compiled
from snr_dist.kernels.reference import FLOAT_DTYPES as TRITON_DTYPES
from snr_dist.kernels.scratch import Scratch
from snr_dist.layout import Kind
from snr_dist.optim.base import (
    SNROptimizerMixin,
    advance_steps,
    hooks_off,
    param_states,
    run_hooks,
    split_tensors,
    step_tensor,
)
from snr_dist.optim.zero_view import ZeroView, per_tensor_copies
from snr_dist.options import (
    SNROptions,
    complete_saved_group,
    gives_snr_beta2,
    validate_adam,
    validate_kernels,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_ADAM_KINDS = {"step": Kind.SHARED, "exp_avg": Kind.PARAM, "exp_avg_sq": Kind.PARAM}

#: Elements per chunk of the elementwise step on the CPU (1 MB per fp32 vector: the step's
#: ~8 live vectors of a chunk stay in the last-level cache; `benchmarks/step_floor.py`).
CPU_CHUNK_ELEMENTS = 1 << 18
#: Chunks from this size on (up to `CPU_CHUNK_ELEMENTS`) keep their temporaries in reused
#: buffers (`snr_dist.kernels.scratch`): the C library's heap faults large fresh blocks in page by
#: page; below it the buffers save less than their bookkeeping costs.
SCRATCH_MIN_ELEMENTS = 1 << 17


class SNRAdamW(SNROptimizerMixin, torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with an SNR gate on its update.

    Args:
        params: parameters or param groups (a group may set any SNR option of its own).
        lr: learning rate.
        betas: Adam's EMA factors of the gradient and of its square.
        eps: Adam's denominator floor.
        weight_decay: decoupled weight decay (never gated).
        snr: an `snr_dist.options.SNROptions` (or a mapping of its fields).
        **snr_options: SNR options as keywords (``estimator``, ``mode``, ``gate``, ``tau``,
            ``gate_a``, ``snr_beta``, ``warmup_steps``, ``rank``, ``refresh_every``,
            ``sketch_beta``, ``basis_side``, ``seed``; see `SNROptions`), overriding ``snr``.
            If ``snr_beta`` equals ``betas[0]`` when the state is created, the temporal
            estimator reuses Adam's first moment and needs no extra memory.
        maximize: maximise the objective instead.
        foreach: use the multi-tensor path (None or True) or the per-tensor path (False).
        kernels: "auto" (default: the Triton kernels for CUDA parameters when Triton imports,
            unless the SNR_DIST_KERNELS environment variable says "torch" or "triton"),
            "torch" or "triton" (forced; on the CPU only under TRITON_INTERPRET=1).
        skip_nonfinite: skip, and count, parameters whose gradient holds NaN/Inf.
        flush_denormals: treat subnormal floats (below 1.2e-38) as zero during the step on the
            CPU (`snr_dist.denormals`): state that decays into that range otherwise slows the
            step several-fold late in training. Off while a group's ``eps`` is below 1e-12
            (`snr_dist.denormals.MIN_EPS`).
        process_group: the data-parallel group. "auto" (default): the DTensor parameters'
            mesh under FSDP2, else local to this rank (right for DDP too, where every rank
            holds the same reduced gradient; the cross-sample estimator, which pools the
            ranks' own gradients, then asks for the group). A process group: replicated data
            parallelism over it (DDP). None: local to this rank.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        snr: SNROptions | Mapping[str, Any] | None = None,
        maximize: bool = False,
        foreach: bool | None = None,
        kernels: str = "auto",
        skip_nonfinite: bool = True,
        flush_denormals: bool = True,
        process_group: ProcessGroup | str | None = "auto",
        **snr_options: Any,
    ) -> None:
        if gives_snr_beta2(snr, snr_options):
            raise ValueError(
                "snr_beta2 applies to SNRPreconditioner; SNRAdamW's squared-gradient EMA is "
                "Adam's own: set betas[1]"
            )
        options = SNROptions.parse(snr, **snr_options).model_dump(exclude={"snr_beta2"})
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            **options,
            maximize=bool(maximize),
            foreach=foreach,
            kernels=kernels,
        )
        self._validate_group(defaults)
        self.skip_nonfinite = skip_nonfinite
        self.flush_denormals = bool(flush_denormals)
        self.process_group = process_group
        super().__init__(params, defaults)
        self._start_engine()

    @staticmethod
    def _moments() -> Moments:
        return Moments(adam=True)

    # ------------------------------------------------------------------ groups and state
    @staticmethod
    def _validate_group(group: dict) -> None:
        validate_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        validate_kernels(group.get("kernels", "auto"))
        SNROptions.parse({k: group[k] for k in SNROptions.model_fields if k in group})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate the group (options, and what the engine needs) before adding it."""
        param_group = dict(param_group)
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif params is not None and not isinstance(params, set):
            param_group["params"] = list(params)
        candidate = {**self.defaults, **param_group}
        self._validate_group(candidate)
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.check_group(candidate)
        super().add_param_group(param_group)
        if engine is not None:
            engine.sync_groups()

    def init_state(self) -> None:
        """Allocate every parameter's state now (frameworks that load into existing state,
        such as Megatron's distributed checkpointing, call this before a load)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p, group)

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            lp = local(p)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(lp.shape, dtype=torch.float32, device=lp.device)
            state["exp_avg_sq"] = torch.zeros(lp.shape, dtype=torch.float32, device=lp.device)
            self._engine.init_state(p, group, state)
        return state

    def state_kinds(self, p: Tensor, keys: Iterable[str] | None = None) -> dict[str, Kind]:
        """The layout (`snr_dist.layout.Kind`) of each state tensor of ``p`` (or of ``keys``,
        e.g. the keys a checkpoint holds, before ``p`` has state)."""
        state = self.state.get(p, {}) if keys is None else dict.fromkeys(keys)
        group = self._engine.group_of(p)
        kinds = {k: v for k, v in _ADAM_KINDS.items() if k in state}
        return {**kinds, **self._engine.state_kinds(p, group, state)}

    # ------------------------------------------------------------------ checkpoint view
    def global_state(self) -> dict[Tensor, dict[str, Tensor]]:
        """Each parameter's state with values that do not depend on the world size
        (DTensors with the global shape where the data is sharded). Under FSDP2 with
        trackers, a collective: every rank must call it."""
        items = [(p, st, self.state_kinds(p)) for p, st in param_states(self.state) if "step" in st]
        values = self._engine.distributor.global_state(items)
        return {p: v for (p, _, _), v in zip(items, values)}

    def load_global_state(self, values: Mapping[Tensor, Mapping[str, Tensor]]) -> None:
        """Make world-size-independent ``values`` (from `global_state`, possibly written by
        another world size) this rank's state."""
        dist = self._engine.distributor
        self._engine.index()
        self._step_bound = None
        self._engine.flat_aliases.clear()  # they alias the state being replaced
        for p, st in values.items():
            kinds = self.state_kinds(p, st.keys())
            device = local(p).device
            st = {k: (step_tensor(v) if k == "step" else v) for k, v in st.items()}
            tensors, _ = split_tensors(st)  # other entries (a user's, torch allows) as they are
            installed = dist.install_state(p, tensors, kinds)
            installed = {k: v if k == "step" else v.to(device) for k, v in installed.items()}
            self.state[p] = {k: installed.get(k, v) for k, v in st.items()}
        self._engine.sync_groups()

    def state_template(self, p: Tensor, key: str, size, dtype: torch.dtype) -> Tensor:
        """An empty tensor to read the global value of ``state[key]`` of ``p`` into (DCP)."""
        kind = self.state_kinds(p, [key]).get(key, Kind.SHARED)
        return self._engine.distributor.template(p, kind, size, dtype)

    def state_dict(self) -> dict[str, Any]:
        """Like torch's, with values that do not depend on the world size (DTensors under
        FSDP2); complete on every rank. Where that needs a collective (FSDP2 with subspace
        trackers, whose statistics are partial sums), it raises on every rank. Hooks
        registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as in torch's,
        the post-hooks on the finished state dict."""
        dist = self._engine.distributor
        zero = getattr(self, "_zero", None)
        if zero is not None:  # DeepSpeed ZeRO: this rank's row shards (saved per rank)
            sd = zero.inner.state_dict()
            sd["zero_layout"] = zero.layout()
            return sd
        run_hooks(self._optimizer_state_dict_pre_hooks, self)
        params = [p for p, _ in param_states(self.state)]
        if any(dist.state_needs_collective(self.state_kinds(p)) for p in params):
            raise RuntimeError(
                "SNRAdamW.state_dict(): under FSDP2 the subspace trackers hold partial sums "
                "over ranks, and a plain state_dict cannot complete them without a "
                "collective. Save with snr_dist.checkpoint.save(path, model, optimizer, step) "
                "on every rank (DCP, reshardable), or call optimizer.global_state() on every "
                "rank."
            )
        with hooks_off(self, "state_dict"):  # they run once, around the whole state_dict
            sd = super().state_dict()
        index = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        for p, values in self.global_state().items():
            sd["state"][index[p]] = values
        return run_hooks(self._optimizer_state_dict_post_hooks, self, sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps the fp32 statistics fp32 for low-precision parameters,
        keeps this optimizer's ``kernels`` choice, and accepts state written by another world
        size or parallelism, or by an earlier release (options its groups predate are filled
        in as that release ran them: `snr_dist.options.SAVED_BEFORE`). Load hooks run as in
        torch's, the post-hooks once the state is loaded."""
        zero = getattr(self, "_zero", None)
        if zero is not None:
            zero.load_state_dict(state_dict)
            return
        # torch's hooks run once, around the whole load (a post-hook sees the loaded state)
        state_dict = run_hooks(self._optimizer_load_state_dict_pre_hooks, self, dict(state_dict))
        self._step_bound = None  # re-read from the loaded steps at the next step
        groups = [complete_saved_group(g, self.defaults) for g in state_dict["param_groups"]]
        state_dict = {**state_dict, "param_groups": groups}  # the caller's dict stays as it was
        saved = state_dict["state"]
        # Which kernels run is this process's choice (a GPU checkpoint may resume on a CPU).
        impls = [g.get("kernels", "auto") for g in self.param_groups]
        with hooks_off(self, "load_state_dict"):
            super().load_state_dict(state_dict)
        for group, choice in zip(self.param_groups, impls):
            group["kernels"] = choice
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        by_id = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))
        loaded = {}
        for idx, st in saved.items():
            p = by_id.get(idx)
            if p is None:  # not a parameter's state: torch copied it as it was
                continue
            cur = dict(self.state[p])
            for k, v in st.items():
                # torch cast every tensor but `step` to the parameter's dtype: fp32
                # statistics of bf16 parameters, the trackers' bool `basis_rows`
                if k != "step" and torch.is_tensor(v) and cur[k].dtype != v.dtype:
                    cur[k] = v.clone()
            loaded[p] = cur
        self.load_global_state(loaded)
        run_hooks(self._optimizer_load_state_dict_post_hooks, self)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets micro-batch gradients recorded since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._engine.capture.discard()
        self._engine.capture.wake()  # parameters unfrozen since: observed from this backward

    # ------------------------------------------------------------------ DeepSpeed ZeRO
    def attach_zero(self, zero_optimizer, group=None) -> None:
        """Run on DeepSpeed ZeRO's partitions through row shards (`snr_dist.optim.zero_view`):
        `snr_dist.deepspeed.initialize` calls it, on every rank, for subspace mode and the
        cross-sample estimator under ZeRO 1-3 and DeepSpeed's bf16 optimizer."""
        pairs = per_tensor_copies(zero_optimizer)
        if pairs is not None:  # whole fp32 copies of each tensor (bf16 at stage 0)
            self._engine.sync_groups()
            cross = {
                id(p)
                for g in self.param_groups
                if g["estimator"] == "cross_sample"
                for p in g["params"]
            }
            self._engine.capture.attach_proxies([(lp, hp) for lp, hp in pairs if id(hp) in cross])
            return
        self._zero = ZeroView(self, zero_optimizer, group)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the loss (and backward) first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if getattr(self, "_defer_steps", False):  # inside deepspeed.initialize: no real step
            return loss
        with self._step_flush():
            zero = getattr(self, "_zero", None)
            if zero is not None:  # DeepSpeed ZeRO: step the row shards of its partitions
                zero.step()
            else:
                self._step()
        return loss

    def _step(self) -> None:
        """The step itself: gradients checked, statistics, all-reduce, gated update, refresh."""
        engine = self._engine
        engine.begin_step()
        engine.flat_aliases.next_step()
        self._step_bound = self._current_step_bound() + 1
        fused = [self._fused_paths(group) for group in self.param_groups]
        collected = [
            (group, *engine.gradients(group, self.skip_nonfinite, "SNRAdamW", unchecked=f), f)
            for group, f in zip(self.param_groups, fused)
        ]
        for group, params, _, _, _ in collected:  # fail before any state changes
            engine.check_ready(group, params)
        work = []
        for group, params, grads, skipped, paths in collected:
            engine.capture.discard(skipped)
            params, grads = self._fused_step(group, params, grads, paths)
            params, grads = self._elementwise_step(group, params, grads)
            if params:
                work.append((group, self._update_moments(group, params, grads)))
        engine.exchange(work)  # one all-reduce of SNR statistics for the whole step
        for group, by_est in work:
            self._apply_update(group, [s for slots in by_est.values() for s in slots])
        engine.refresh(work)
        engine.capture.wake()

    def _current_step_bound(self) -> int:
        """An upper bound of every parameter's step (read from the state once after a
        construction or a load, then counted on the host: no per-step read)."""
        bound = getattr(self, "_step_bound", None)
        if bound is None:
            steps = [st["step"] for _, st in param_states(self.state) if "step" in st]
            bound = int(max(float(t) for t in steps)) if steps else 0
        return bound

    def _fused_paths(self, group: dict) -> dict[Tensor, str]:
        """The params of ``group`` whose diagonal temporal step runs fused, and how:
        ``"compile"`` (`snr_dist.kernels.compiled`) or ``"triton"`` (the Triton kernel). Both
        check gradients on the device and keep ``step`` there: no host read."""
        if group["estimator"] != "temporal" or group["foreach"] is False:
            return {}
        out: dict[Tensor, str] = {}
        choice = group.get("kernels", "auto")
        # Routing is decided once per parameter and options (a few µs per parameter per step
        # otherwise; the engine clears the cache when the groups change).
        cache = self._engine.path_cache
        options = (choice, os.environ.get(kernel_dispatch.ENV_VAR), self.skip_nonfinite)
        options += tuple(group[k] for k in ("mode", "noise", "gate", "maximize"))
        for p in group["params"]:
            g = p.grad
            if g is None or g.is_sparse:
                continue
            lp = local(p)
            # the parameter's own device and dtype too: Module.to() keeps the Parameter object
            first = (p, lp.device, lp.dtype, options)
            kind = cache.get(first)
            if kind is None:
                kind = cache[first] = self._kind(group, p, lp, choice)
            if kind == "torch":  # the CPU default: nothing about the gradient matters
                continue
            lg = local(g)
            flat = compilable(lp, lg)
            key = (*first, lg.dtype, flat)
            path = cache.get(key)
            if path is None:
                path = cache[key] = self._path(group, kind, lp.device, lp.dtype, lg.dtype, flat)
            if path != "torch":
                out[p] = path
        return out

    def _kind(self, group: dict, p: Tensor, lp: Tensor, choice: str) -> str:
        """Which fused step ``p``'s device and estimator allow: "compile", "triton" or
        "torch" (`_path` then checks the gradient's dtype and layout)."""
        kind = step_kernels(choice, lp.device)
        if kind == "torch" or not isinstance(
            self._engine.estimator(p, group), (DiagonalInnovation, DiagonalSecondMoment)
        ):
            return "torch"
        if kind == "triton" and (lp.dtype not in TRITON_DTYPES or lp.numel() == 0):
            return "torch"  # the kernel's dtypes; an empty tensor has nothing to step
        return kind

    def _path(self, group: dict, kind: str, device, pdt, gdt, flat: bool) -> str:
        """``kind`` (`step_kernels`' answer) for these dtypes: a configuration that cannot be
        compiled runs where ``"auto"`` would."""
        if kind == "compile":
            if flat and group["gate"] in COMPILED_RULES and self._prepare(group, device, pdt, gdt):
                return "compile"  # compiled (on scratch buffers) before any real step
            kind = kernel_dispatch.resolve("auto", device)
        return kind

    def _prepare(self, group: dict, device, pdt, gdt) -> bool:
        with_state = [self.state[p] for p in group["params"] if "step" in self.state.get(p, {})]
        if with_state:
            own_mean = "snr_avg" in with_state[0]
        else:
            own_mean = group["noise"] != "innovation" and self._moments().own_mean(group)
        config = (group["noise"], own_mean, group["gate"], group["maximize"], self.skip_nonfinite)
        why = prepare_compiled(config, device, pdt, gdt)
        if why is not None:
            warn_no_compile(why)
        return why is None

    def _device_step(self, group: dict, params: list[Tensor], grads: list[Tensor], kind: str):
        """The fused step (``kind``: "compile" or "triton") of ``params``, reading nothing on
        the host: non-finite gradients are masked on the device and counted there, each
        ``step`` lives with its parameter (as in torch's fused and capturable Adam)."""
        engine = self._engine
        states = [self._init_state(p, group) for p in params]
        locals_ = [local(p) for p in params]
        for st, lp in zip(states, locals_):
            if st["step"].device != lp.device:
                st["step"] = st["step"].to(lp.device)
        oks = None
        dist = engine.distributor
        if self.skip_nonfinite and dist.partial_statistics and dist.world > 1:
            bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).float()
            oks = dist.agree_on_skips_device(bad).eq(0)  # a rank's NaN skips every rank
        extras, options = _fused_options(group, states)
        tensors = (
            locals_,
            grads,
            [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states],
            extras,
            [st["step"] for st in states],
            [engine.nonfinite.device_counter(p, lp.device) for p, lp in zip(params, locals_)],
            oks,
        )
        common = dict(step_bound=self._step_bound, check_finite=self.skip_nonfinite, **options)
        if kind == "compile":
            compiled_snr_adamw_step(*tensors, aliases=engine.flat_aliases, **common)
        else:
            from snr_dist import triton_kernels

            triton_kernels.fused_snr_adamw_step_device(*tensors, **common)

    def _fused_step(
        self, group: dict, params: list[Tensor], grads: list[Tensor], paths: dict[Tensor, str]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The whole step of the diagonal temporal params in ``paths`` (compiled, or one
        Triton launch per device and dtypes); returns the params (and grads) left to the
        torch path. They need nothing from the exchange or refresh phases."""
        if not paths or not params:
            return params, grads
        for kind in ("compile", "triton"):
            idx = [i for i, p in enumerate(params) if paths.get(p) == kind]
            if idx:
                self._device_step(group, [params[i] for i in idx], [grads[i] for i in idx], kind)
        rest = [i for i, p in enumerate(params) if p not in paths]
        return [params[i] for i in rest], [grads[i] for i in rest]

    def _elementwise_step(
        self, group: dict, params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The whole step of the CPU params whose estimator is elementwise (the diagonal
        temporal rules), a cache-sized chunk of parameters at a time; returns the params (and
        grads) left for the exchange.

        The step runs ~17 elementwise passes over the parameters' bytes where AdamW's runs
        ~8. Over the whole model each pass streams from memory and its temporaries are
        model-sized (freed and faulted back in by the allocator every step); over
        `CPU_CHUNK_ELEMENTS` at a time the passes after the first read from cache and the
        temporaries live in buffers reused from step to step (`Scratch`). Every element goes
        through the same kernels as in one multi-tensor call: the result is bit-identical."""
        engine = self._engine
        cache = engine.path_cache  # cleared when the groups change
        options = ("elementwise", group["estimator"], group["noise"], group["mode"])
        mine, sizes, rest = [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            ok = cache.get((p, options))
            if ok is None:
                ok = cache[(p, options)] = engine.estimator(p, group).elementwise
            if ok and g.is_cpu:
                mine.append(i)
                sizes.append(g.numel())
            else:
                rest.append(i)
        if not mine:
            return params, grads
        for idx, size in _chunks(mine, sizes, CPU_CHUNK_ELEMENTS):
            if size > CPU_CHUNK_ELEMENTS:  # one large tensor: a chunk-sized piece at a time
                self._pieces_step(group, params[idx[0]], grads[idx[0]])
                continue
            if len(idx) == len(params):
                ps, gs = params, grads
            else:
                ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
            scratch = engine.scratch if size >= SCRATCH_MIN_ELEMENTS else None
            by_est = self._update_moments(group, ps, gs, scratch)
            self._apply_update(group, [s for slots in by_est.values() for s in slots], scratch)
        if not rest:
            return [], []
        return [params[i] for i in rest], [grads[i] for i in rest]

    def _pieces_step(self, group: dict, p: Tensor, g: Tensor) -> None:
        """The elementwise step of one parameter larger than a chunk, on flat pieces of
        `CPU_CHUNK_ELEMENTS` of it and of its gradient and state (views: nothing is copied);
        its step count advances once. Bit-identical to the whole tensor's step for fp32
        parameters; for bf16 at one thread (with more, ATen's split of a tensor across threads
        already moves bf16 roundings, whole or in pieces). The pieces' slots key per-parameter
        caches on ``(p, offset)``."""
        lp = local(p)
        state = self._init_state(p, group)
        (step,) = advance_steps([state])
        (g32,) = self._fp32_grads(group, [g])
        key = est_key(p, group)
        if not (lp.is_contiguous() and g32.is_contiguous()):  # no flat views: whole, as before
            slots = [Slot(p, state, g32, step)]
            self._fold_moments(group, {key: slots})
            self._apply_update(group, slots)
            return
        # pieces start at multiples of 64 elements: every element then sits where it sits in
        # the whole tensor's vectorised loops (a loop's scalar tail rounds bf16 differently)
        n, limit = lp.numel(), max(64, CPU_CHUNK_ELEMENTS // 64 * 64)
        whole = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == lp.shape]
        for at in range(0, n, limit):
            end = min(at + limit, n)
            piece = dict(state)
            for k in whole:
                piece[k] = state[k].view(-1)[at:end]
            slots = [Slot(lp.view(-1)[at:end], piece, g32.view(-1)[at:end], step, key=(p, at))]
            scratch = self._engine.scratch if end - at >= SCRATCH_MIN_ELEMENTS else None
            self._fold_moments(group, {key: slots}, scratch)
            self._apply_update(group, slots, scratch)

    @staticmethod
    def _fp32_grads(group: dict, grads: list[Tensor]) -> list[Tensor]:
        """The gradients the rule reads: fp32, negated for ``maximize``."""
        grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
        if group["maximize"]:
            grads = [-g for g in grads]
        return grads

    def _update_moments(
        self, group: dict, params: list[Tensor], grads: list[Tensor], scratch: Scratch | None = None
    ):
        """The estimators' local statistics, then Adam's moments (the innovation rule measures
        each gradient against the mean of the previous step); returns the step's slots by
        estimator. ``scratch``: the chunked step's work buffers."""
        states = [self._init_state(p, group) for p in params]
        grads = self._fp32_grads(group, grads)
        steps = advance_steps(states)
        by_est = self._engine.slots(group, params, grads, steps)
        self._fold_moments(group, by_est, scratch)
        return by_est

    def _fold_moments(self, group: dict, by_est: dict, scratch: Scratch | None = None) -> None:
        """Fold the slots' gradients into the estimators' statistics, then into Adam's
        moments."""
        self._engine.update(group, by_est, scratch)
        slots = [s for ss in by_est.values() for s in ss]
        grads = [s.grad for s in slots]
        beta1, beta2 = group["betas"]
        exp_avgs = [s.state["exp_avg"] for s in slots]
        exp_avg_sqs = [s.state["exp_avg_sq"] for s in slots]
        if group["foreach"] is None or group["foreach"]:
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        else:
            for m, v, g in zip(exp_avgs, exp_avg_sqs, grads):
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)

    def _apply_update(self, group: dict, slots: list[Slot], scratch: Scratch | None = None) -> None:
        """Decoupled weight decay (not gated), then the gated Adam step (its temporaries in
        ``scratch``'s buffers when given)."""
        foreach = group["foreach"] is None or group["foreach"]
        engine = self._engine
        params = [local(s.param) for s in slots]
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [s.state["exp_avg"] for s in slots]
        exp_avg_sqs = [s.state["exp_avg_sq"] for s in slots]
        bc2_sqrt = [math.sqrt(1.0 - beta2**s.step) for s in slots]
        step_sizes = [-lr / (1.0 - beta1**s.step) for s in slots]
        if not foreach:
            if wd != 0:
                for p in params:
                    p.mul_(1.0 - lr * wd)
            for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
                root = engine.moment_sqrt.sqrt(slots[i].cache_key, v, eps, 1.0 / bc2_sqrt[i])
                d = m / (root / bc2_sqrt[i] + eps)
                engine.gate_(group, [slots[i]], [d], foreach=False)
                p.add_(d.to(p.dtype), alpha=step_sizes[i])
            return
        # Diagonal temporal gates are elementwise: fold them into the numerator, one
        # addcdiv per parameter as in torch's AdamW (no materialised direction).
        fast: dict[tuple[int, str], list[int]] = {}
        plain, needs_direction = [], []
        for i, s in enumerate(slots):
            e = engine.estimator(s.param, group)
            active = gate_active(group, s.step)
            diagonal_temporal = isinstance(e, (DiagonalInnovation, DiagonalSecondMoment))
            if diagonal_temporal and active and group["gate"] in FOREACH_RULES:
                fast.setdefault((s.step, e.name), []).append(i)
            elif active or e.tracks:
                needs_direction.append(i)
            else:
                plain.append(i)
        # fp32 directions go straight into their parameters, weight decay included (trackers
        # fold it into a matmul), one parameter at a time through one scratch buffer (no
        # direction per parameter to allocate; it is still in cache when the gate reads it).
        direct = all(params[i].dtype == torch.float32 for i in needs_direction)
        skip = set(needs_direction) if direct else set()
        other = [i for i in range(len(slots)) if i not in skip]
        if wd != 0 and other:
            torch._foreach_mul_([params[i] for i in other], 1.0 - lr * wd)
        denom: list[Tensor | None] = [None] * len(slots)
        gated = [i for idx in fast.values() for i in idx]
        if gated:  # sqrt(v) + eps bc, the bias correction bc moved into the step size
            added = [eps * bc2_sqrt[i] for i in gated]
            vs = [exp_avg_sqs[i] for i in gated]
            den = engine.moment_sqrt.sqrt_foreach(
                [slots[i].cache_key for i in gated],
                vs,
                added,
                out=None if scratch is None else scratch.like("den", vs),
            )
            torch._foreach_add_(den, added)
            for i, d in zip(gated, den):
                denom[i] = d
        rest = [i for i in other if denom[i] is None]
        if rest:  # as torch's AdamW: sqrt(v) / bc + eps
            scale = max(1.0 / bc2_sqrt[i] for i in rest)
            vs = [exp_avg_sqs[i] for i in rest]
            den = engine.moment_sqrt.sqrt_foreach(
                [slots[i].cache_key for i in rest],
                vs,
                [eps] * len(rest),
                scale,
                out=None if scratch is None else scratch.like("den_ungated", vs),
            )
            torch._foreach_div_(den, [bc2_sqrt[i] for i in rest])
            torch._foreach_add_(den, eps)
            for i, d in zip(rest, den):
                denom[i] = d
        for (t, _), idx in fast.items():
            e = engine.estimator(slots[idx[0]].param, group)
            gates, scale = e.gates_foreach(group, [slots[i].state for i in idx], t, scratch)
            torch._foreach_mul_(gates, [exp_avgs[i] for i in idx])
            self._addcdiv(
                [params[i] for i in idx],
                gates,
                [denom[i] for i in idx],
                [step_sizes[i] * bc2_sqrt[i] * scale for i in idx],
            )
        if plain:  # no gate: exactly torch's AdamW update
            self._addcdiv(
                [params[i] for i in plain],
                [exp_avgs[i] for i in plain],
                [denom[i] for i in plain],
                [step_sizes[i] for i in plain],
            )
        if needs_direction:
            sub = [slots[i] for i in needs_direction]
            if direct:  # gated step (and decay) straight into p
                scratch: dict[torch.device, Tensor] = {}
                for i in needs_direction:
                    v = exp_avg_sqs[i]
                    buf = scratch.get(v.device)
                    if buf is None:
                        n = max(exp_avg_sqs[j].numel() for j in needs_direction)
                        buf = scratch[v.device] = v.new_empty(n)
                    # m / (sqrt(v) + eps bc), the bias correction bc moved into the step size
                    added = eps * bc2_sqrt[i]
                    out = buf[: v.numel()].view(v.shape)
                    d = engine.moment_sqrt.sqrt(slots[i].cache_key, v, added, out=out)
                    torch.div(exp_avgs[i], d.add_(added), out=d)
                    size = step_sizes[i] * bc2_sqrt[i]
                    engine.gate_(
                        group, [slots[i]], [d], out=[params[i]], alphas=[size], decay=1.0 - lr * wd
                    )
                return
            dirs = torch._foreach_div(
                [exp_avgs[i] for i in needs_direction], [denom[i] for i in needs_direction]
            )
            sizes = [step_sizes[i] for i in needs_direction]
            ps = [params[i] for i in needs_direction]
            engine.gate_(group, sub, dirs)
            torch._foreach_mul_(dirs, sizes)
            torch._foreach_add_(ps, [d.to(p.dtype) for d, p in zip(dirs, ps)])

    @staticmethod
    def _addcdiv(params, numerators, denominators, scales) -> None:
        if all(p.dtype == torch.float32 for p in params):
            torch._foreach_addcdiv_(params, numerators, denominators, scales)
            return
        for p, n, d, s in zip(params, numerators, denominators, scales):
            p.add_((n / d).to(p.dtype), alpha=s)


def _chunks(items: list[int], sizes: list[int], limit: int) -> list[tuple[list[int], int]]:
    """``items`` in consecutive runs whose sizes add up to at most ``limit`` (a larger one
    alone), each with its total size."""
    total = sum(sizes)
    if total <= limit:
        return [(items, total)]
    out: list[tuple[list[int], int]] = []
    run: list[int] = []
    total = 0
    for i, n in zip(items, sizes):
        if run and total + n > limit:
            out.append((run, total))
            run, total = [], 0
        run.append(i)
        total += n
    if run:
        out.append((run, total))
    return out


def _fused_options(group: dict, states: list[dict]) -> tuple[list[Tensor] | None, dict]:
    """What the fused steps (Triton, compiled) take from a group and its states: the third
    state vector (innovation EMA, own SNR mean, or None when the mean is Adam's) and the
    rule's keyword options."""
    innovation = "noise_avg" in states[0]
    own_mean = "snr_avg" in states[0]
    extra = "noise_avg" if innovation else "snr_avg"
    extras = [st[extra] for st in states] if innovation or own_mean else None
    return extras, dict(
        lr=group["lr"],
        betas=group["betas"],
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        snr_beta=group["snr_beta"] if own_mean else group["betas"][0],
        gate_rule=group["gate"],
        tau=group["tau"],
        gate_a=group["gate_a"],
        warmup_steps=group["warmup_steps"],
        maximize=group["maximize"],
        noise="innovation" if innovation else "second_moment",
    )
