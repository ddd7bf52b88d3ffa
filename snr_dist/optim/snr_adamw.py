"""SNRAdamW: AdamW whose update is gated by a per-coordinate or per-eigendirection SNR.

Same shape as ``torch.optim.AdamW``: hyper-parameters validated in ``__init__``, per-tensor and
multi-tensor (foreach, the default) implementations of one algorithm, a state_dict that
round-trips bit-exactly. The algorithm is `snr_dist.snr.snr_adamw_reference_step` plus the
subspace and cross-sample estimators.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from snr_dist import kernels as kernel_dispatch
from snr_dist.distributed.context import local
from snr_dist.optim.gating import MomentSource, SNRGating, collect_gradients
from snr_dist.options import SNR_DEFAULTS, validate_adam, validate_kernels, validate_options

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


class SNRAdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with an SNR gate on its update.

    Any SNR option may also be set per param group.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: Adam's EMA factors of the gradient and of its square.
        eps: Adam's denominator floor.
        weight_decay: decoupled weight decay (never gated).
        estimator: "temporal" (EMAs over steps, no extra communication) or "cross_sample"
            (spread across the micro-batches / data-parallel ranks of one step; needs >= 2
            backward passes per step).
        mode: "diagonal" (per coordinate) or "subspace" (per eigen-direction of each matrix's
            gradient covariance, plus one complement direction). 1-D parameters always use
            diagonal mode.
        gate: "wiener" (default), "clamp", "hard", "paper" or "none".
        tau: gate threshold; the paper gate's lambda.
        gate_a: the paper gate's a (1 online, `finite_dataset_a(n, b)` for a finite dataset).
        snr_beta: EMA factor of the SNR statistics. If it equals `betas[0]` the temporal
            estimator reuses Adam's first moment and needs no extra memory.
        warmup_steps: gates are 1 for the first `warmup_steps` steps.
        rank: subspace rank per matrix.
        refresh_every: steps between basis refreshes (plus refreshes at steps 1, 2, 4, ...).
        sketch_beta: EMA factor of the subspace sketch.
        basis_side: "auto" (the smaller side), "rows" or "cols".
        seed: seed of the random initial bases (identical on every rank).
        maximize: maximise the objective instead.
        foreach: use the multi-tensor path (None or True) or the per-tensor path (False).
        kernels: "auto" (default: the Triton kernels for CUDA parameters when Triton imports,
            unless the SNR_DIST_KERNELS environment variable says "torch" or "triton"),
            "torch" or "triton" (forced; on the CPU only under TRITON_INTERPRET=1). Diagonal
            temporal parameters then take one fused step kernel; subspace projections and
            gated reconstructions use the thin-matmul kernels.
        skip_nonfinite: skip, and count, parameters whose gradient holds NaN/Inf.
        process_group: the data-parallel group. "auto" (default): the DTensor parameters'
            mesh (FSDP2), else the default group when torch.distributed is initialised with
            more than one rank (DDP), else none. None: behave as a single process.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        estimator: str = SNR_DEFAULTS["estimator"],
        mode: str = SNR_DEFAULTS["mode"],
        gate: str = SNR_DEFAULTS["gate"],
        tau: float = SNR_DEFAULTS["tau"],
        gate_a: float = SNR_DEFAULTS["gate_a"],
        snr_beta: float = SNR_DEFAULTS["snr_beta"],
        warmup_steps: int = SNR_DEFAULTS["warmup_steps"],
        rank: int = SNR_DEFAULTS["rank"],
        refresh_every: int = SNR_DEFAULTS["refresh_every"],
        sketch_beta: float = SNR_DEFAULTS["sketch_beta"],
        basis_side: str = SNR_DEFAULTS["basis_side"],
        seed: int = SNR_DEFAULTS["seed"],
        maximize: bool = False,
        foreach: bool | None = None,
        kernels: str = "auto",
        skip_nonfinite: bool = True,
        process_group: ProcessGroup | str | None = "auto",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            estimator=estimator,
            mode=mode,
            gate=gate,
            tau=tau,
            gate_a=gate_a,
            snr_beta=snr_beta,
            warmup_steps=warmup_steps,
            rank=rank,
            refresh_every=refresh_every,
            sketch_beta=sketch_beta,
            basis_side=basis_side,
            seed=seed,
            maximize=bool(maximize),
            foreach=foreach,
            kernels=kernels,
        )
        self._validate_group(defaults)
        self.skip_nonfinite = skip_nonfinite
        self.process_group = process_group
        #: When True, ``state_dict()`` is a collective that returns every rank's trackers
        #: (world-size independent values): for frameworks that call it on every rank and save
        #: rank 0's copy (DeepSpeed's engine.save_checkpoint). Off by default, so a plain
        #: ``if rank == 0: torch.save(opt.state_dict())`` never hangs.
        self.gather_state_dict = False
        super().__init__(params, defaults)
        self._gating = SNRGating(self, self._moment_source, process_group)
        self._gating.check_consistent()

    # ------------------------------------------------------------------ groups and state
    @staticmethod
    def _validate_group(group: dict) -> None:
        validate_adam(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        validate_kernels(group.get("kernels", "auto"))
        validate_options({k: group[k] for k in SNR_DEFAULTS if k in group and k != "snr_beta2"})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate_group(self.param_groups[-1])
        if hasattr(self, "_gating"):
            self._gating.refresh_groups()

    @staticmethod
    def _moment_source(group: dict) -> MomentSource:
        beta1, beta2 = group["betas"]
        shared = group["snr_beta"] == beta1
        return MomentSource(
            mean_key="exp_avg" if shared else "snr_avg",
            beta_s=group["snr_beta"],
            owns_mean=not shared,
            sq_key="exp_avg_sq",
            beta_v=beta2,
            owns_sq=False,
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.skip_nonfinite = getattr(self, "skip_nonfinite", True)
        self._gating = SNRGating(self, self._moment_source, getattr(self, "process_group", None))

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self.gather_state_dict and self._gating.ctx.world > 1:
            from snr_dist.distributed.state import global_state

            index = {p: i for i, p in enumerate(q for g in self.param_groups for q in g["params"])}
            for p, st in global_state(self, self._gating).items():
                sd["state"][index[p]] = {
                    k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in st.items()
                }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps the fp32 statistics fp32 for low-precision parameters, keeps
        this optimizer's ``kernels`` choice, and under data parallelism keeps only the trackers
        this rank owns."""
        saved = state_dict["state"]
        # Which kernels run is this process's choice (a GPU checkpoint may resume on a CPU).
        impls = [g.get("kernels", "auto") for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, impl in zip(self.param_groups, impls):
            group["kernels"] = impl
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, st in saved.items():
            cur = self.state[params[idx]]
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and cur[k].dtype != v.dtype:
                    cur[k] = v.to(device=cur[k].device).clone()
        self._gating.refresh_groups()
        if self._gating.ctx.mode == "replicated":
            from snr_dist.distributed.state import drop_unowned

            drop_unowned(self, self._gating)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forgets micro-batch gradients recorded since the last step."""
        super().zero_grad(set_to_none=set_to_none)
        self._gating.discard_microbatches()

    # ------------------------------------------------------------------ public extras
    def microbatch(self, weight: float = 1.0) -> contextlib.AbstractContextManager[None]:
        """Declare the number of samples in the next backward pass(es) (cross-sample estimator).

        Without it every backward pass is one micro-batch of weight 1, which is right when the
        micro-batches have equal sizes. With unequal sizes, compute each micro-batch loss as a
        *sum* over its samples (up to a common constant) and wrap its backward in
        ``with opt.microbatch(len(batch)):``.
        """
        return self._gating.microbatch(weight)

    def metrics(self, names: dict[Tensor, str] | None = None) -> dict[str, Any]:
        """Gate and SNR statistics per group and per parameter; see `snr_dist.metrics`."""
        from snr_dist.metrics import collect_metrics

        return collect_metrics(self, self._gating, names)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; ``closure`` re-evaluates the loss (and backward) first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [
            (group, *collect_gradients(group, self._gating, self.skip_nonfinite, "SNRAdamW"))
            for group in self.param_groups
        ]
        for group, params, _, _ in work:  # fail before any state changes
            self._gating.check_ready(group, params)
        prepared = []
        for group, params, grads, skipped in work:
            self._gating.discard_microbatches(skipped)
            params, grads = self._fused_step(group, params, grads)
            if params:
                prepared.append(self._update_moments(group, params, grads))
        # One all-reduce of SNR statistics for the whole step (nothing in one process).
        self._gating.exchange([(g, ps, gs, ts) for g, ps, gs, ts in prepared])
        for group, params, _, steps in prepared:
            self._apply_update(group, params, steps)
        self._gating.refresh([(g, ps, gs, ts) for g, ps, gs, ts in prepared])
        return loss

    def _init_state(self, p: Tensor, group: dict) -> dict:
        state = self.state[p]
        if "step" not in state:
            lp = local(p)
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(lp.shape, dtype=torch.float32, device=lp.device)
            state["exp_avg_sq"] = torch.zeros(lp.shape, dtype=torch.float32, device=lp.device)
            self._gating.init_state(p, group, state)
        return state

    def _fused_step(
        self, group: dict, params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The whole step of diagonal temporal params whose kernels resolve to Triton, in one
        fused kernel launch per step count; returns the params (and grads) left to the torch
        path. They need nothing from the exchange or refresh phases."""
        if group["estimator"] != "temporal" or not params:
            return params, grads
        fused = [
            i
            for i, p in enumerate(params)
            if self._gating.kind(p, group) == "diagonal"
            and self._gating.impl(group, grads[i].device) == "triton"
        ]
        if not fused:
            return params, grads
        src = self._moment_source(group)
        by_step: dict[int, list[int]] = {}
        for i in fused:
            state = self._init_state(params[i], group)
            state["step"] += 1
            by_step.setdefault(int(state["step"].item()), []).append(i)
        for t, idx in by_step.items():
            states = [self.state[params[i]] for i in idx]
            kernel_dispatch.fused_snr_adamw_step(
                [local(params[i]) for i in idx],
                [grads[i] for i in idx],
                [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states],
                [st[src.mean_key] for st in states] if src.owns_mean else None,
                step=t,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                snr_beta=group["snr_beta"],
                gate_rule=group["gate"],
                tau=group["tau"],
                gate_a=group["gate_a"],
                warmup_steps=group["warmup_steps"],
                maximize=group["maximize"],
                kernels="triton",
            )
        rest = sorted(set(range(len(params))) - set(fused))
        return [params[i] for i in rest], [grads[i] for i in rest]

    def _update_moments(self, group: dict, params: list[Tensor], grads: list[Tensor]):
        """Steps 1-2: Adam's moments and the local SNR statistics. Returns the work item."""
        states = [self._init_state(p, group) for p in params]
        grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
        if group["maximize"]:
            grads = [-g for g in grads]
        steps = []
        for st in states:
            st["step"] += 1
            steps.append(int(st["step"].item()))
        beta1, beta2 = group["betas"]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        if group["foreach"] is None or group["foreach"]:
            torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        else:
            for m, v, g in zip(exp_avgs, exp_avg_sqs, grads):
                m.lerp_(g, 1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        self._gating.update_statistics(group, params, grads, steps)
        return group, params, grads, steps

    def _apply_update(self, group: dict, params: list[Tensor], steps: list[int]) -> None:
        """Steps 3-4: gates, decoupled weight decay (not gated), the gated Adam step."""
        foreach = group["foreach"] is None or group["foreach"]
        states = [self.state[p] for p in params]
        orig, params = params, [local(p) for p in params]  # keys for state; tensors for maths
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        exp_avgs = [st["exp_avg"] for st in states]
        exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        bc1 = [1.0 - beta1**t for t in steps]
        bc2_sqrt = [math.sqrt(1.0 - beta2**t) for t in steps]
        step_sizes = [-lr / b for b in bc1]
        if wd != 0:
            if foreach:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            else:
                for p in params:
                    p.mul_(1.0 - lr * wd)
        if not foreach:
            for i, (p, m, v) in enumerate(zip(params, exp_avgs, exp_avg_sqs)):
                d = m / (v.sqrt() / bc2_sqrt[i] + eps)
                self._gating.gate_(group, [orig[i]], [d], [steps[i]], foreach=False)
                p.add_(d.to(p.dtype), alpha=step_sizes[i])
            return
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        # Diagonal temporal gates are elementwise: fold them into the numerator, one
        # addcdiv per parameter as in torch's AdamW (no materialised direction).
        fast: set[int] = set()
        for idx in self._gating.fast_buckets(group, orig, steps, foreach).values():
            gates, scale = self._gating.diagonal_gates_foreach(
                group, [states[i] for i in idx], steps[idx[0]]
            )
            torch._foreach_mul_(gates, [exp_avgs[i] for i in idx])
            self._addcdiv(
                [params[i] for i in idx],
                gates,
                [denom[i] for i in idx],
                [step_sizes[i] * scale for i in idx],
            )
            fast.update(idx)
        rest = [i for i in range(len(params)) if i not in fast]
        needs_direction = [
            i
            for i in rest
            if self._gating.kind(orig[i], group) == "subspace"
            or self._gating.gate_active(group, steps[i])
        ]
        plain = [i for i in rest if i not in set(needs_direction)]
        if plain:  # no gate: exactly torch's AdamW update
            self._addcdiv(
                [params[i] for i in plain],
                [exp_avgs[i] for i in plain],
                [denom[i] for i in plain],
                [step_sizes[i] for i in plain],
            )
        if needs_direction:
            ps = [params[i] for i in needs_direction]
            dirs = torch._foreach_div(
                [exp_avgs[i] for i in needs_direction], [denom[i] for i in needs_direction]
            )
            sub_steps = [steps[i] for i in needs_direction]
            sizes = [step_sizes[i] for i in needs_direction]
            keys = [orig[i] for i in needs_direction]
            if all(p.dtype == torch.float32 for p in ps):  # gated step straight into p
                self._gating.gate_(group, keys, dirs, sub_steps, True, out=ps, alphas=sizes)
                return
            self._gating.gate_(group, keys, dirs, sub_steps, True)
            torch._foreach_mul_(dirs, sizes)
            torch._foreach_add_(ps, [d.to(p.dtype) for d, p in zip(dirs, ps)])

    @staticmethod
    def _addcdiv(params, numerators, denominators, scales) -> None:
        if all(p.dtype == torch.float32 for p in params):
            torch._foreach_addcdiv_(params, numerators, denominators, scales)
            return
        for p, n, d, s in zip(params, numerators, denominators, scales):
            p.add_((n / d).to(p.dtype), alpha=s)
