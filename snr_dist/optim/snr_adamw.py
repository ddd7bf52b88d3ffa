"""SNRAdamW: AdamW whose update is gated by a per-coordinate or per-eigendirection SNR.

Same shape as ``torch.optim.AdamW``: hyper-parameters validated in ``__init__``, a state_dict
that round-trips bit-exactly, and implementations of one algorithm behind one interface. The
algorithm is `snr_dist.snr.snr_adamw_reference_step` plus the subspace and cross-sample
estimators, and `SNRAdamW._step` reads like it: Adam's moments, the estimators' statistics,
one exchange, the gated update, the tracker refreshes. The hot loops are step kernels
(`snr_dist.optim.steps`: torch, chunked CPU, compiled, Triton), chosen per parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from snr_dist.distributors.dtensor import local
from snr_dist.estimators import Moments, stat_dtype
from snr_dist.layout import Kind
from snr_dist.optim.base import (
    SNROptimizerMixin,
    hooks_off,
    param_states,
    run_hooks,
    split_tensors,
    step_tensor,
)
from snr_dist.optim.steps import Kernels, StepContext
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


class SNRAdamW(SNROptimizerMixin, torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with an SNR gate on its update.

    Args:
        params: parameters or param groups (a group may set any SNR option of its own).
        lr: learning rate.
        betas: Adam's EMA factors of the gradient and of its square.
        eps: Adam's denominator floor.
        weight_decay: decoupled weight decay (never gated).
        snr: an `snr_dist.options.SNROptions` (or a mapping of its fields).
        **snr_options: SNR options as keywords (``estimator``, ``noise``, ``mode``, ``gate``,
            ``tau``, ``gate_a``, ``snr_beta``, ``warmup_steps``, ``rank``, ``refresh_every``,
            ``sketch_beta``, ``basis_side``, ``complement``, ``seed``, ``state_dtype``; see
            `SNROptions`), overriding ``snr``. If ``snr_beta`` equals ``betas[0]`` when the
            state is created, the temporal estimator reuses Adam's first moment and needs no
            extra memory. ``state_dtype="bfloat16"`` keeps Adam's first moment and the SNR
            statistics in bfloat16 (stochastically rounded): AdamW's state bytes.
        maximize: maximise the objective instead.
        foreach: use the multi-tensor path (None or True) or the per-tensor path (False).
        kernels: "auto" (default: the Triton step for CUDA parameters when Triton imports;
            on the CPU the uncompiled step, compiled for a param group of at least
            `snr_dist.kernels.AUTO_COMPILE_ELEMENTS` diagonal elements, where compiling pays
            back; unless the SNR_DIST_KERNELS environment variable says otherwise), "torch",
            "triton" (forced; on the CPU only under TRITON_INTERPRET=1) or "compile" (the
            diagonal step compiled by torch.compile: docs/kernels.md says when it pays back).
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

    def _start_engine(self) -> None:
        super()._start_engine()
        self._kernels = Kernels(StepContext(self._engine, self._init_state), self._moments())

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
            state["exp_avg"] = torch.zeros(lp.shape, dtype=stat_dtype(group), device=lp.device)
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
        FSDP2); complete on every rank. Under FSDP2 with subspace trackers, whose statistics
        are partial sums over the ranks, it sums them (an all-reduce): every rank calls it
        then, as every FSDP2 save path does (``torch.distributed.checkpoint.state_dict.
        get_optimizer_state_dict``, `snr_dist.checkpoint`, Accelerate, Lightning). Hooks
        registered with ``register_state_dict_pre_hook`` / ``_post_hook`` run as in torch's,
        the post-hooks on the finished state dict."""
        zero = getattr(self, "_zero", None)
        if zero is not None:  # DeepSpeed ZeRO: this rank's row shards (saved per rank)
            sd = zero.inner.state_dict()
            sd["zero_layout"] = zero.layout()
            return sd
        run_hooks(self._optimizer_state_dict_pre_hooks, self)
        with hooks_off(self, "state_dict"):  # they run once, around the whole state_dict
            sd = super().state_dict()
        index = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
        for p, values in self.global_state().items():
            sd["state"][index[p]] = values
        return run_hooks(self._optimizer_state_dict_post_hooks, self, sd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps every state entry's saved dtype (float32 statistics of
        low-precision parameters, bfloat16 ones of ``state_dtype="bfloat16"``, where torch
        casts to the parameter's dtype), keeps this optimizer's ``kernels`` choice, and
        accepts state written by another world size or parallelism, or by an earlier release
        (options its groups predate are filled in as that release ran them:
        `snr_dist.options.SAVED_BEFORE`). Load hooks run as in
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
        """Moments -> statistics -> exchange -> gated update -> refresh."""
        engine, kernels = self._engine, self._kernels
        engine.begin_step()
        self._step_bound = self._current_step_bound() + 1
        kernels.begin_step(self.skip_nonfinite, self._step_bound)
        batches = []
        for group in self.param_groups:
            on_device = kernels.device_paths(group)  # these check their gradients themselves
            found = engine.gradients(group, self.skip_nonfinite, "SNRAdamW", unchecked=on_device)
            batches.append((group, on_device, *found))
        for group, _, params, _, _ in batches:  # fail before any state changes
            engine.check_ready(group, params)
        work = []
        for group, on_device, params, grads, skipped in batches:
            engine.capture.discard(skipped)
            # elementwise estimators need nothing from the exchange: their whole step now
            params, grads = kernels.whole(group, params, grads, on_device)
            if params:  # Adam's moments and the estimators' local statistics
                work.append((group, kernels.torch.moments(group, params, grads)))
        engine.exchange(work)  # one all-reduce of SNR statistics for the whole step
        for group, by_est in work:  # the gated update
            kernels.torch.update(group, by_est)
        engine.refresh(work)  # the trackers' refreshes due this step
        engine.capture.wake()

    def _current_step_bound(self) -> int:
        """An upper bound of every parameter's step (read from the state once after a
        construction or a load, then counted on the host: no per-step read)."""
        bound = getattr(self, "_step_bound", None)
        if bound is None:
            steps = [st["step"] for _, st in param_states(self.state) if "step" in st]
            bound = int(max(float(t) for t in steps)) if steps else 0
        return bound
