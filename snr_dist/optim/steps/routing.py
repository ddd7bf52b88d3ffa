"""Which kernel steps each parameter.

Per param group and options, and per parameter where its device, dtype or layout decide:

1. a diagonal temporal parameter takes the device-side kernel its group's ``kernels`` choice
   names (`snr_dist.kernels.step_kernels`: ``"compile"``; under ``"auto"``, ``"triton"`` for
   CUDA tensors and ``"compile"`` for a CPU group of at least
   `snr_dist.kernels.AUTO_COMPILE_ELEMENTS` such elements) when that kernel can step it (its
   gradient's dtype and layout, the gate rule; a configuration that does not compile runs where
   ``"auto"`` would otherwise), unless the group asked for ``foreach=False``;
2. another parameter of an elementwise estimator (the diagonal temporal rules) on the CPU
   takes the chunked step;
3. the rest take the torch step, split around the exchange.

The choices are kept (the engine forgets them when the groups change), so a step looks each
parameter up once.
"""

from __future__ import annotations

import math
import os
import warnings

from torch import Tensor

from snr_dist import kernels as dispatch
from snr_dist.distributors.dtensor import global_shape, local
from snr_dist.estimators import DiagonalInnovation, DiagonalSecondMoment
from snr_dist.kernels import compiled
from snr_dist.kernels.reference import FLOAT_DTYPES as TRITON_DTYPES
from snr_dist.optim.steps.base import StepContext, StepKernel
from snr_dist.optim.steps.chunked_step import ChunkedStep
from snr_dist.optim.steps.compiled_step import CompiledStep
from snr_dist.optim.steps.torch_step import TorchStep
from snr_dist.optim.steps.triton_step import TritonStep

DIAGONAL_TEMPORAL = (DiagonalInnovation, DiagonalSecondMoment)
_said_low_precision = False


class Kernels:
    """One optimizer's kernels and the choice between them."""

    def __init__(self, ctx: StepContext, moments) -> None:
        self.ctx = ctx
        self.moments = moments  # the optimizer's `Moments` (whether new state has its own mean)
        self.torch = TorchStep(ctx)
        self.chunked = ChunkedStep(ctx, self.torch)
        self.device: dict[str, StepKernel] = {
            "compile": CompiledStep(ctx),
            "triton": TritonStep(ctx),
        }

    def begin_step(self, skip_nonfinite: bool, step_bound: int) -> None:
        self.ctx.skip_nonfinite = skip_nonfinite
        self.ctx.step_bound = step_bound
        for kernel in self.device.values():
            kernel.begin_step()

    # ------------------------------------------------------------------ the steps
    def whole(
        self, group: dict, params: list[Tensor], grads: list[Tensor], on_device: dict
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The whole step of the params that need nothing from the exchange or refresh
        phases (``on_device``: `device_paths`); returns the params (and grads) left to the
        torch step."""
        if on_device and params:
            for name, kernel in self.device.items():
                idx = [i for i, p in enumerate(params) if on_device.get(p) == name]
                if idx:
                    kernel.step(group, [params[i] for i in idx], [grads[i] for i in idx])
            rest = [i for i, p in enumerate(params) if p not in on_device]
            params, grads = [params[i] for i in rest], [grads[i] for i in rest]
        return self._chunked(group, params, grads)

    def _chunked(
        self, group: dict, params: list[Tensor], grads: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        engine = self.ctx.engine
        cache = engine.path_cache  # cleared when the groups change
        options = ("elementwise", group["estimator"], group["noise"], group["mode"])
        mine, rest = [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            ok = cache.get((p, options))
            if ok is None:
                ok = cache[(p, options)] = engine.estimator(p, group).elementwise
            (mine if ok and g.is_cpu else rest).append(i)
        if not mine:
            return params, grads
        if not rest:
            self.chunked.step(group, params, grads)
            return [], []
        self.chunked.step(group, [params[i] for i in mine], [grads[i] for i in mine])
        return [params[i] for i in rest], [grads[i] for i in rest]

    # ------------------------------------------------------------------ the choice
    def device_paths(self, group: dict) -> dict[Tensor, str]:
        """The params of ``group`` whose step runs on a device-side kernel, and which:
        ``"compile"`` or ``"triton"``. Both check their gradients on the device: no host
        read."""
        if group["estimator"] != "temporal" or group["foreach"] is False:
            return {}
        out: dict[Tensor, str] = {}
        choice = group.get("kernels", "auto")
        effective = dispatch.effective(choice)
        cpu_auto = effective == "auto" and all(p.is_cpu for p in group["params"])
        if group.get("state_dtype") == "bfloat16":  # the device steps keep float32 state
            if not (effective == "torch" or cpu_auto):  # asked for one: say where it runs
                self._say_torch_for_low_precision(effective)
            return out
        if effective == "torch" or (cpu_auto and not self._auto_compiles(group, choice)):
            return out  # the CPU default: no parameter to look at
        cache = self.ctx.engine.path_cache
        options = (choice, os.environ.get(dispatch.ENV_VAR), self.ctx.skip_nonfinite)
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
            flat = compiled.compilable(lp, lg)
            key = (*first, lg.dtype, flat)
            path = cache.get(key)
            if path is None:
                path = cache[key] = self._path(group, kind, lp.device, lp.dtype, lg.dtype, flat)
            if path != "torch":
                out[p] = path
        return out

    def _say_torch_for_low_precision(self, effective: str) -> None:
        global _said_low_precision
        if not _said_low_precision:
            _said_low_precision = True
            warnings.warn(
                f"snr-dist: state_dtype='bfloat16' runs the torch step (kernels={effective!r} "
                "would run the compiled or Triton step, which keeps float32 state); said once.",
                UserWarning,
                stacklevel=5,
            )

    def _kind(self, group: dict, p: Tensor, lp: Tensor, choice: str) -> str:
        """Which device-side step ``p``'s device and estimator allow: "compile", "triton" or
        "torch" (`_path` then checks the gradient's dtype and layout)."""
        if not isinstance(self.ctx.engine.estimator(p, group), DIAGONAL_TEMPORAL):
            return "torch"
        kind = dispatch.step_kernels(choice, lp.device)
        if kind == "torch" and lp.device.type == "cpu" and self._auto_compiles(group, choice):
            kind = "compile"
        if kind == "torch":
            return "torch"
        if kind == "triton" and (lp.dtype not in TRITON_DTYPES or lp.numel() == 0):
            return "torch"  # the kernel's dtypes; an empty tensor has nothing to step
        return kind

    def _auto_compiles(self, group: dict, choice: str) -> bool:
        """``kernels="auto"`` on a CPU group large enough that compiling pays back
        (`snr_dist.kernels.auto_compiles`), decided once per group."""
        if dispatch.effective(choice) != "auto":
            return False
        cache = self.ctx.engine.path_cache
        key = ("auto-compile", id(group))
        hit = cache.get(key)
        if hit is None:
            engine = self.ctx.engine
            elements = sum(
                math.prod(global_shape(p))
                for p in group["params"]
                if isinstance(engine.estimator(p, group), DIAGONAL_TEMPORAL)
            )
            index = next(i for i, g in enumerate(engine.opt.param_groups) if g is group)
            hit = cache[key] = dispatch.auto_compiles(elements, index)
        return hit

    def _path(self, group: dict, kind: str, device, pdt, gdt, flat: bool) -> str:
        """``kind`` (`step_kernels`' answer) for these dtypes: a configuration that cannot be
        compiled runs where ``"auto"`` would."""
        if kind == "compile":
            if (
                flat
                and group["gate"] in compiled.COMPILED_RULES
                and self._prepare(group, device, pdt, gdt)
            ):
                return "compile"  # compiled (on scratch buffers) before any real step
            kind = dispatch.resolve("auto", device)
            if kind == "triton" and pdt not in TRITON_DTYPES:
                kind = "torch"
        return kind

    def _prepare(self, group: dict, device, pdt, gdt) -> bool:
        state = self.ctx.engine.opt.state
        with_state = [state[p] for p in group["params"] if "step" in state.get(p, {})]
        if with_state:
            own_mean = "snr_avg" in with_state[0]
        else:
            own_mean = group["noise"] != "innovation" and self.moments.own_mean(group)
        config = (
            group["noise"],
            own_mean,
            group["gate"],
            group["maximize"],
            self.ctx.skip_nonfinite,
        )
        why = compiled.prepare(config, device, pdt, gdt)
        if why is not None:
            dispatch.warn_no_compile(why)
        return why is None
