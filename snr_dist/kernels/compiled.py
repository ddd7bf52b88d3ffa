"""The diagonal temporal SNR-AdamW step as one ``torch.compile``d pass per parameter.

Why: the eager multi-tensor step runs ~18 foreach operations per parameter (about 46 passes
over the parameter's bytes, against AdamW's ~20), and on the CPU an elementwise step is
memory-bound. Compiled by Inductor (C++ on the CPU, Triton on CUDA), the whole step -- the
non-finite check, the innovation, Adam's moments, the gate, the decoupled decay and the update
-- reads ``p, g, m, v, x`` once and writes ``p, m, v, x`` once: the 9-pass floor, plus one
read of ``g`` for the check.

No host sync: the step never reads a tensor value on the host.

* The non-finite check is a device flag: a parameter whose gradient holds NaN/Inf keeps its
  value and moments (``where(ok, new, old)`` inside the same pass), its ``step`` does not
  advance (``step += ok``) and its skip counter does (``skips += !ok``); counters are read
  when asked for (`snr_dist.optim.nonfinite.NonfiniteCounter`).
* ``step`` lives with the parameter (as in torch's fused and capturable Adam), and the
  per-step constants (bias corrections, ``k_t``, the innovation's ``kappa_t``, whether the
  gate is active) are gathered on the device from a table indexed by each parameter's own
  step: the host never needs to know which parameters were skipped
  (`snr_dist.kernels.step_table`, shared with the Triton step).
* ``lr``, ``weight_decay``, ``eps``, ``tau`` and the betas go in as small tensors, so
  schedulers never recompile.

Parameters go `BUCKET` to a compiled call (padded), with dynamic shapes: one graph per
configuration (noise rule, own mean, gate rule, maximize, non-finite check) and dtypes serves
a whole model. Each graph is compiled on scratch buffers first (`prepare`), so a compiler
failure never leaves a step half done. Compile cost (``benchmarks/step_floor.py``) is paid
once per process; Inductor caches its code on disk, so later processes skip the C++ compiler.
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Sequence

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor

from snr_dist.kernels.step_table import FIELD, FIELDS, step_table
from snr_dist.snr import GATE_FLOOR

COMPILED_RULES = ("wiener", "clamp", "hard", "paper", "none")


def _make_step(noise: str, own_mean: bool, rule: str, maximize: bool, check_finite: bool):
    """The step of a bucket of `BUCKET` parameters for one static configuration (flat 1-D
    aliases of each parameter and its state).

    Every per-step scalar comes in precomputed (``table``: the `StepTable`, whose row at each
    parameter's own step the graph gathers; ``consts``: ``lr``, ``1 - lr * weight_decay``,
    ``eps``, ``tau``, ``1 - beta1``, ``1 - beta2``, ``1 - snr_beta``), so the loop body is the
    elementwise rule alone."""
    innovation = noise == "innovation"
    F = FIELD

    def step_one(p, g, m, v, x, step, skips, ok_in, table, hyper, one_minus):
        # this parameter's row (a skipped parameter may lag the others)
        t = torch.clamp(step + 1.0, max=table.shape[0] - 1).long().reshape(1)
        row = table.index_select(0, t).reshape(-1)
        gf = g.float()
        if maximize:
            gf = -gf
        ok = torch.logical_and(ok_in, torch.isfinite(gf).all()) if check_finite else ok_in
        if innovation:
            r = gf - m * row[F["inv_bc_prev"]]
            x_new = torch.where(row[F["update_x"]] > 0, x + one_minus[0] * (r * r - x), x)
        m_new = m + one_minus[0] * (gf - m)
        v_new = v + one_minus[1] * (gf * gf - v)
        if innovation:
            raw = m_new * m_new * row[F["inv_bc_s_sq"]]
            var = x_new * row[F["var_scale"]]
        else:
            if own_mean:
                x_new = x + one_minus[2] * (gf - x)
                s = x_new
            else:
                s = m_new
            raw = s * s * row[F["inv_bc_s_sq"]]
            var = torch.clamp((v_new * row[F["inv_bc_v"]] - raw) * row[F["inv_one_k"]], min=0.0)
        var = torch.clamp(var, min=GATE_FLOOR)
        sig = torch.clamp(raw - row[F["shift"]] * var, min=0.0)
        tau = hyper[3]
        if rule in ("wiener", "paper"):
            gate = sig / (sig + tau * var)
        elif rule == "clamp":
            gate = torch.clamp(sig / (tau * var), max=1.0)
        elif rule == "hard":
            gate = (sig > tau * var).float()
        else:
            gate = torch.ones_like(sig)
        gate = torch.where(row[F["gated"]] > 0, gate, 1.0)
        denom = torch.sqrt(v_new) * row[F["inv_bc2_sqrt"]] + hyper[2]
        pf = p.float()
        new_p = pf * hyper[1] - (hyper[0] * row[F["step_size"]]) * gate * m_new / denom
        p.copy_(torch.where(ok, new_p, pf).to(p.dtype))
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        if innovation or own_mean:
            x.copy_(torch.where(ok, x_new, x))
        step.add_(ok.float())
        skips.add_(1.0 - ok.float())

    def step_bucket(ps, gs, ms, vs, xs, steps, skips, oks, table, consts):
        hyper, one_minus = consts[:4], consts[4:]
        for i in range(len(ps)):  # unrolled at trace time: one graph for the bucket
            step_one(ps[i], gs[i], ms[i], vs[i], xs[i], steps[i], skips[i], oks[i], table,
                     hyper, one_minus)  # fmt: skip

    return step_bucket


def no_duck_shapes():
    """Trace with a symbol per tensor size: by default Dynamo gives tensors that happen to
    have equal sizes one symbol and guards on the equality, so each bucket of a model would
    compile again."""
    return fx_config.patch(use_duck_shape=False)


def _own_code(fn, key: tuple):
    """``fn`` with a code object of its own: Dynamo caches compiled graphs per code object,
    so closures of one function would share (and exhaust) one recompile budget."""
    name = "snr_step_" + "_".join(str(k) for k in key)
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


_lock = threading.Lock()
_compiled: dict[tuple, object] = {}
_const: dict[tuple, Tensor] = {}


def compiled_step_fn(noise: str, own_mean: bool, rule: str, maximize: bool, check_finite: bool):
    """The compiled per-parameter step for this configuration (compiled on first call)."""
    key = (noise, own_mean, rule, maximize, check_finite)
    with _lock:
        fn = _compiled.get(key)
        if fn is None:
            # fullgraph: a graph break would silently run the function eagerly (op by op)
            fn = torch.compile(_own_code(_make_step(*key), key), dynamic=True, fullgraph=True)
            _compiled[key] = fn
    return fn


#: Parameters per compiled call: one call has a fixed cost (guards, wrappers) of tens of
#: microseconds on the CPU, so small tensors share calls; a partial bucket is padded, so
#: every call has the same signature and one graph serves a whole model.
BUCKET = 8


def _flat(t: Tensor) -> Tensor:
    """A 1-D tensor over ``t``'s elements that is not a view (``set_`` on its storage):
    Dynamo guards a view on its base's layout, so views of 1-D and 2-D bases would each
    compile a graph of their own."""
    if not t.is_contiguous():
        t = t.contiguous()
    out = torch.empty(0, dtype=t.dtype, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


class AliasCache:
    """`_flat` aliases of long-lived tensors (parameters, state) per bucket, kept while the
    same tensors keep the same storage. Owned by one optimizer (aliases keep storage alive,
    so the cache must not outlive it); entries not used in the last ``keep`` steps are
    dropped, so tensors that are made anew every step (copies) do not pile up."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self.step = 0
        self.entries: dict[tuple[int, ...], tuple[list[Tensor], list[int], list[Tensor], int]] = {}

    def get(self, tensors: list[Tensor]) -> list[Tensor]:
        key = tuple(id(t) for t in tensors)
        hit = self.entries.get(key)
        ptrs = [t.data_ptr() for t in tensors]
        if hit is not None and hit[1] == ptrs and all(a is b for a, b in zip(hit[0], tensors)):
            flat = hit[2]
        else:
            flat = [_flat(t) for t in tensors]
        self.entries[key] = (list(tensors), ptrs, flat, self.step)
        return flat

    def next_step(self) -> None:
        self.step += 1
        old = [k for k, v in self.entries.items() if v[3] < self.step - self.keep]
        for k in old:
            del self.entries[k]

    def clear(self) -> None:
        self.entries.clear()


def _padding(device: torch.device, pdt: torch.dtype, gdt: torch.dtype, slot: int) -> list:
    """A do-nothing bucket entry ``p, g, m, v, x, step, skips`` for ``slot`` (its ``ok`` is
    False). Each slot has tensors of its own: Dynamo guards on which inputs alias."""
    key = ("pad", device, pdt, gdt, slot)
    with _lock:
        pad = _const.get(key)
        if pad is None:
            pad = [torch.zeros(2, dtype=dt, device=device) for dt in (pdt, gdt)]
            pad += [torch.zeros(2, device=device) for _ in range(3)]
            pad += [torch.zeros((), device=device), torch.zeros((), device=device)]
            _const[key] = pad
    return pad


def _real_first(device: torch.device, n: int) -> Tensor:
    """``[True] * n + [False] * (BUCKET - n)``: the ``ok`` flags of a bucket of ``n``."""
    key = ("ok", device, n)
    with _lock:
        t = _const.get(key)
        if t is None:
            t = torch.arange(BUCKET, device=device) < n
            _const[key] = t
    return t


def _constants(values: tuple[float, ...], device: torch.device) -> Tensor:
    """The step's scalar hyper-parameters as one small tensor on ``device``, made once per
    distinct values (a scheduler changing ``lr`` makes a new one per step; a constant lr
    none)."""
    key = ("consts", device, values)
    with _lock:
        t = _const.get(key)
        if t is None:
            if len(_const) > 256:  # schedulers: forget old values, keep the padding
                for k in [k for k in _const if k[0] == "consts"]:
                    del _const[k]
            t = torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
            _const[key] = t
    return t


def compilable(p: Tensor, g: Tensor) -> bool:
    """Whether one flat pass can serve this parameter (dense, contiguous, floating)."""
    return (
        p.is_floating_point()
        and p.is_contiguous()
        and not g.is_sparse
        and g.shape == p.shape
        and p.device.type in ("cpu", "cuda")
    )


@torch.no_grad()
def compiled_snr_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    extras: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    skips: Sequence[Tensor],
    oks: Tensor | None,
    *,
    step_bound: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    snr_beta: float,
    gate_rule: str,
    tau: float,
    gate_a: float = 1.0,
    warmup_steps: int = 0,
    maximize: bool = False,
    noise: str = "innovation",
    check_finite: bool = True,
    aliases: AliasCache | None = None,
) -> None:
    """One diagonal temporal step of every parameter, each in one compiled pass.

    ``steps`` and ``skips`` are 0-dim fp32 tensors on the parameters' devices, advanced in
    place (``step`` by one unless the gradient is non-finite, ``skips`` otherwise);
    ``step_bound`` is an upper bound of every ``step`` after this update; ``oks`` (a bool per
    parameter, optional) are flags agreed across ranks; ``check_finite=False`` applies non-finite
    gradients as they are (``skip_nonfinite=False``); ``aliases``: the caller's (the optimizer's)
    `AliasCache`, in which flat aliases of parameters and state are kept between steps.
    ``extras``: the innovation EMAs (``noise="innovation"``), the SNR means (second-moment
    rule with its own mean) or None.
    """
    if gate_rule not in COMPILED_RULES:
        raise ValueError(f"gate_rule must be one of {COMPILED_RULES}, got {gate_rule!r}")
    if noise == "innovation" and extras is None:
        raise ValueError("compiled_snr_adamw_step: noise='innovation' needs the innovation EMAs")
    own_mean = noise != "innovation" and extras is not None
    config = (noise, own_mean, gate_rule, maximize, check_finite)
    fn = compiled_step_fn(*config)
    key = (tuple(betas), snr_beta, gate_rule, gate_a, warmup_steps, noise)
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    for (dev, pdt, gdt), idx in groups.items():
        why = prepare(config, dev, pdt, gdt)  # compiled on scratch buffers first (once)
        if why is not None:
            raise RuntimeError(f"snr-dist: the compiled step cannot run here ({why})")
        table = step_table(key, dev).covering(step_bound)
        consts = _constants(
            (lr, 1.0 - lr * weight_decay, eps, tau, 1.0 - betas[0], 1.0 - betas[1], 1.0 - snr_beta),
            dev,
        )
        for start in range(0, len(idx), BUCKET):
            bucket = idx[start : start + BUCKET]
            n = len(bucket)
            held = [t for i in bucket for t in (params[i], exp_avgs[i], exp_avg_sqs[i])]
            if extras is not None:
                held += [extras[i] for i in bucket]
            flat = aliases.get(held) if aliases is not None else [_flat(t) for t in held]
            ps, ms, vs = flat[0 : 3 * n : 3], flat[1 : 3 * n : 3], flat[2 : 3 * n : 3]
            if extras is None:  # unread by the graph: a distinct tensor (no aliased inputs)
                xs = [_padding(dev, pdt, gdt, k)[4] for k in range(n)]
            else:
                xs = flat[3 * n :]
            cols = [
                ps,
                [_flat(grads[i]) for i in bucket],
                ms,
                vs,
                xs,
                [steps[i] for i in bucket],
                [skips[i] for i in bucket],
            ]
            for k in range(n, BUCKET):
                for col, pad in zip(cols, _padding(dev, pdt, gdt, k)):
                    col.append(pad)
            ok = _real_first(dev, n)
            if oks is not None:  # flags agreed across ranks, False for the padding
                where = torch.tensor(bucket + [0] * (BUCKET - n)).to(dev, non_blocking=True)
                ok = ok.logical_and(oks.index_select(0, where))
            fn(*cols, ok, table, consts)


_prepared: dict[tuple, str | None] = {}
SCRATCH = 1 << 16
"""Elements per scratch tensor of the first (tracing) call: Inductor sizes its loops
(threads, vector width) by the sizes it traces with."""


def prepare(config: tuple, device, pdt: torch.dtype, gdt: torch.dtype) -> str | None:
    """Compile the step for ``config`` (``noise, own_mean, rule, maximize, check_finite``)
    and these dtypes on scratch buffers, once: None when it runs, else why not. The real
    tensors are only stepped by a graph that has already compiled, so a compiler failure
    never leaves a step half done."""
    device = torch.device(device)
    key = (config, device, pdt, gdt)
    with _lock:
        if key in _prepared:
            return _prepared[key]
    fn = compiled_step_fn(*config)
    try:
        zeros = functools.partial(torch.zeros, device=device)
        cols = [
            [zeros(SCRATCH, dtype=pdt) for _ in range(BUCKET)],
            [zeros(SCRATCH, dtype=gdt) for _ in range(BUCKET)],
        ]
        cols += [[zeros(SCRATCH) for _ in range(BUCKET)] for _ in range(3)]
        cols += [[zeros(()) for _ in range(BUCKET)] for _ in range(2)]
        table = zeros((64, len(FIELDS)))
        ok = zeros(BUCKET, dtype=torch.bool)
        with no_duck_shapes():  # patched for the trace only: the patch slows guard checks
            fn(*cols, ok, table, zeros(7))
        why = None
    except Exception as e:  # no C++ compiler, an unsupported dtype or platform, ...
        first = str(e).strip().splitlines()
        why = f"{type(e).__name__}: {first[0] if first else ''}"
    with _lock:
        _prepared[key] = why
    return why


def compile_available() -> str | None:
    """None when torch.compile can run here (the default configuration, fp32, CPU), else
    why not."""
    return prepare(("innovation", False, "wiener", False, True), "cpu", *(torch.float32,) * 2)
