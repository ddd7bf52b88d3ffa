"""Fused diagonal temporal SNR-AdamW step: one read-modify-write of p, grad, m, v, s.

The torch path makes ~13 passes over the state per step (moments, bias-corrected SNR, gate,
decay, update); this kernel reads ``p, g, m, v, s`` once and writes ``p, m, v, s`` once, which
is the floor for an elementwise optimizer (36 bytes per fp32 parameter, 30 per bf16 one).
Many tensors share one launch: a table of pointers and a table of fixed-size chunks, so small
parameters (biases, norms) do not each pay a launch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from snr_dist.kernels.reference import check_step
from snr_dist.kernels.step_table import FIELD, FIELDS, advance, finite, step_table
from snr_dist.snr import GATE_FLOOR, GATE_RULES

from ._common import TL_DTYPE, hopper, interpreted, next_pow2

CHUNK = 1 << 16  # elements per program; a multiple of every BLOCK below
_RULE_ID = {name: i for i, name in enumerate(GATE_RULES)}  # wiener, clamp, hard, paper, none
# Globals a jit function reads must be constexpr (a plain float compiles under the
# interpreter but not for a GPU). The kernel reads each tensor's constants from its row.
_GATE_FLOOR = tl.constexpr(GATE_FLOOR)
NF = tl.constexpr(len(FIELDS))
F_GATED = tl.constexpr(FIELD["gated"])
F_STEP_SIZE = tl.constexpr(FIELD["step_size"])
F_INV_BC2_SQRT = tl.constexpr(FIELD["inv_bc2_sqrt"])
F_INV_BC_S_SQ = tl.constexpr(FIELD["inv_bc_s_sq"])
F_INV_BC_V = tl.constexpr(FIELD["inv_bc_v"])
F_INV_ONE_K = tl.constexpr(FIELD["inv_one_k"])
F_SHIFT = tl.constexpr(FIELD["shift"])
F_UPDATE_X = tl.constexpr(FIELD["update_x"])
F_INV_BC_PREV = tl.constexpr(FIELD["inv_bc_prev"])
F_VAR_SCALE = tl.constexpr(FIELD["var_scale"])


@triton.jit
def _lerp(a, b, w):
    # torch's lerp: exact at both ends whichever side the weight is on
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _snr_adamw_kernel(
    table,  # int64: ptrs of p, g, m, v, s (N each), numels (N), chunk owner (C), chunk start (C)
    n_tensors,
    n_chunks,
    rows,  # fp32 [N, len(FIELDS)]: each tensor's per-step constants (step_table)
    oks,  # fp32 [N]: 1 steps the tensor, 0 leaves it (and its state) untouched
    w1,
    beta2,
    w_s,
    eps,
    lr,
    decay,
    tau,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    RULE: tl.constexpr,
    GATED: tl.constexpr,
    SHARED_S: tl.constexpr,
    INNOV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(table + 6 * n_tensors + pid)
    start = tl.load(table + 6 * n_tensors + n_chunks + pid)
    n = tl.load(table + 5 * n_tensors + i)
    end = tl.minimum(start + CHUNK, n)
    end = tl.where(tl.load(oks + i) != 0.0, end, start)  # a skipped tensor: no pass at all
    row = rows + i * NF
    gated = tl.load(row + F_GATED)
    step_size = tl.load(row + F_STEP_SIZE) * lr
    inv_bc2_sqrt = tl.load(row + F_INV_BC2_SQRT)
    inv_bc_s_sq = tl.load(row + F_INV_BC_S_SQ)
    inv_bc_v = tl.load(row + F_INV_BC_V)
    inv_one_k = tl.load(row + F_INV_ONE_K)
    shift = tl.load(row + F_SHIFT)  # k, or the paper gate's a
    update_x = tl.load(row + F_UPDATE_X)
    inv_bc_prev = tl.load(row + F_INV_BC_PREV)
    var_scale = tl.load(row + F_VAR_SCALE)
    p_ptr = tl.load(table + i).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(table + n_tensors + i).to(tl.pointer_type(G_DTYPE))
    m_ptr = tl.load(table + 2 * n_tensors + i).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(table + 3 * n_tensors + i).to(tl.pointer_type(tl.float32))
    s_ptr = tl.load(table + 4 * n_tensors + i).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # every base pointer is 16-byte aligned: vector loads
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        if ALIGNED:
            idx = tl.max_contiguous(tl.multiple_of(idx, BLOCK), BLOCK)
        mask = idx < end
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if MAXIMIZE:
            g = -g
        m_prev = tl.load(m_ptr + idx, mask=mask, other=0.0)
        if INNOV:  # s holds the innovation EMA x; the innovation uses the previous mean
            x = tl.load(s_ptr + idx, mask=mask, other=0.0)
            r = g - m_prev * inv_bc_prev
            x = tl.where(update_x != 0.0, x * (1.0 - w1) + w1 * (r * r), x)
            tl.store(s_ptr + idx, x, mask=mask)
        m = _lerp(m_prev, g, w1)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)
        v = v * beta2 + (1.0 - beta2) * (g * g)
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)
        if INNOV or SHARED_S:
            s = m
        else:
            s = _lerp(tl.load(s_ptr + idx, mask=mask, other=0.0), g, w_s)
            tl.store(s_ptr + idx, s, mask=mask)
        num = m
        if GATED:
            # snr.temporal_moments / snr.innovation_moments + snr.gate, elementwise
            raw = s * s * inv_bc_s_sq
            if INNOV:  # noqa: SIM108 - constexpr branches, not a value choice
                var = x * var_scale
            else:
                var = tl.maximum((v * inv_bc_v - raw) * inv_one_k, 0.0)
            var = tl.maximum(var, _GATE_FLOOR)
            sig = tl.maximum(raw - shift * var, 0.0)
            noise = tau * var
            if RULE == 0 or RULE == 3:  # wiener, paper
                gate = sig / (sig + noise)
            elif RULE == 1:  # clamp
                gate = tl.minimum(sig / noise, 1.0)
            else:  # hard
                gate = tl.where(sig > noise, 1.0, 0.0)
            num = tl.where(gated != 0.0, gate, 1.0) * m
        denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        p = p * decay - step_size * (num / denom)
        tl.store(p_ptr + idx, p.to(P_DTYPE), mask=mask)


# (BLOCK, num_warps) candidates: Hopper's HBM3 wants more bytes in flight per SM than Ampere.
HOPPER_CONFIGS = [(2048, 8), (4096, 8), (4096, 16), (8192, 16)]
AMPERE_CONFIGS = [(1024, 4), (2048, 8), (4096, 8)]
_tuned: dict[tuple, tuple[int, int]] = {}


def _table(params, grads, exp_avgs, exp_avg_sqs, snr_avgs) -> tuple[Tensor, int, int]:
    n = len(params)
    owners, starts = [], []
    for i, p in enumerate(params):
        for start in range(0, p.numel(), CHUNK):
            owners.append(i)
            starts.append(start)
    s_list = exp_avgs if snr_avgs is None else snr_avgs
    values = [t.data_ptr() for ts in (params, grads, exp_avgs, exp_avg_sqs, s_list) for t in ts]
    values += [p.numel() for p in params] + owners + starts
    table = torch.tensor(values, dtype=torch.int64)
    return table.to(params[0].device, non_blocking=True), n, len(owners)


def _dense(t: Tensor, like: Tensor) -> bool:
    """Same strides as ``like`` and no gaps: the flat storage order is shared."""
    if t.stride() != like.stride():
        return False
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    expect = 1
    for s, n in dims:
        if s != expect:
            return False
        expect *= n
    return True


def _launch(args: dict, table, n, c, config) -> None:
    block, warps = config
    _snr_adamw_kernel[(c,)](table, n, c, **args, CHUNK=CHUNK, BLOCK=block, num_warps=warps)


def _tune(args: dict, device: torch.device, numel: int) -> tuple[int, int]:
    """Pick (BLOCK, num_warps) once per device and dtype pair on scratch buffers: the real
    state must not be stepped several times, which rules out triton.autotune here."""
    key = (device, args["P_DTYPE"], args["G_DTYPE"])
    if key not in _tuned:
        configs = HOPPER_CONFIGS if hopper(device) else AMPERE_CONFIGS
        size = max(min(numel, 1 << 24), 1)
        pdt = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16}[args["P_DTYPE"]]
        gdt = {v: k for k, v in TL_DTYPE.items()}[args["G_DTYPE"]]
        bufs = [torch.zeros(size, device=device, dtype=d) for d in (pdt, gdt)]
        bufs += [torch.zeros(size, device=device) for _ in range(3)]
        table, n, c = _table([bufs[0]], [bufs[1]], [bufs[2]], [bufs[3]], [bufs[4]])
        scratch = {
            **args,
            "rows": torch.zeros(1, len(FIELDS), device=device),
            "oks": torch.ones(1, device=device),
            "SHARED_S": False,
            "INNOV": False,
        }
        times = [
            triton.testing.do_bench(lambda cf=cf: _launch(scratch, table, n, c, cf))
            for cf in configs
        ]
        _tuned[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _tuned[key]


def _groups(params: Sequence[Tensor], grads: Sequence[Tensor]) -> dict[tuple, list[int]]:
    """Indices by (device, param dtype, grad dtype): one launch each."""
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    return groups


def _run(
    lists: list[list[Tensor]],
    rows: Tensor,
    oks: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    snr_beta: float,
    gate_rule: str,
    tau: float,
    maximize: bool,
    noise: str,
    shared_s: bool,
) -> None:
    """One launch over one (device, dtype) group: ``lists`` = params, grads, m, v(, s);
    ``rows``/``oks``: each tensor's step constants and whether it steps. Tensors whose layout
    differs from their parameter's, or that have gaps, are stepped through contiguous copies."""
    work = [list(ts) for ts in lists]
    copied = []  # (original, contiguous working copy) of what the kernel writes
    for j in range(len(work[0])):
        if all(_dense(ts[j], work[0][j]) for ts in work):
            continue
        for k, ts in enumerate(work):
            if not ts[j].is_contiguous():
                tmp = ts[j].contiguous()
                if k != 1:  # the gradient is only read
                    copied.append((ts[j], tmp))
                ts[j] = tmp
    table, n, c = _table(*work[:4], None if shared_s else work[4])
    if c == 0:  # only empty tensors
        return
    beta1, beta2 = betas
    pdt, gdt = work[0][0].dtype, work[1][0].dtype
    args = dict(
        rows=rows.contiguous(),
        oks=oks.to(torch.float32).contiguous(),
        w1=1.0 - beta1,
        beta2=beta2,
        w_s=1.0 - snr_beta,
        eps=eps,
        lr=lr,
        decay=1.0 - lr * weight_decay,
        tau=tau,
        P_DTYPE=TL_DTYPE[pdt],
        G_DTYPE=TL_DTYPE[gdt],
        RULE=_RULE_ID[gate_rule],
        GATED=gate_rule != "none",
        SHARED_S=shared_s,
        INNOV=noise == "innovation",
        MAXIMIZE=bool(maximize),
        ALIGNED=all(t.data_ptr() % 16 == 0 for ts in work for t in ts),
    )
    if interpreted(_snr_adamw_kernel):  # one block per chunk, no bigger than needed
        config = (min(CHUNK, next_pow2(max(p.numel() for p in work[0]))), 1)
    else:
        config = _tune(args, work[0][0].device, sum(p.numel() for p in work[0]))
    _launch(args, table, n, c, config)
    for orig, tmp in copied:
        orig.copy_(tmp)


@torch.no_grad()
def fused_snr_adamw_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    snr_avgs: Sequence[Tensor] | None,
    *,
    step: int,
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
    noise: str = "second_moment",
) -> None:
    """The Triton version of `snr_dist.kernels.fused_snr_adamw_step_torch` (same arguments:
    every tensor at the host's ``step``): `fused_snr_adamw_step_device` with every tensor's
    step count at ``step - 1`` and no non-finite check (one code path for both)."""
    steps = [torch.full((), float(step - 1), device=p.device) for p in params]
    skips = [torch.zeros((), device=p.device) for p in params]
    fused_snr_adamw_step_device(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        snr_avgs,
        steps,
        skips,
        None,
        step_bound=step,
        check_finite=False,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        snr_beta=snr_beta,
        gate_rule=gate_rule,
        tau=tau,
        gate_a=gate_a,
        warmup_steps=warmup_steps,
        maximize=maximize,
        noise=noise,
    )


@torch.no_grad()
def fused_snr_adamw_step_device(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    snr_avgs: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    skips: Sequence[Tensor],
    oks: Tensor | None,
    *,
    step_bound: int,
    check_finite: bool,
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
    noise: str = "second_moment",
) -> None:
    """The same step with no host read (so no device sync, and CUDA-graph capturable
    arithmetic): each tensor's ``step`` (a 0-dim fp32 tensor on its device) is advanced in
    place and its constants gathered from a `step_table` row on the device. A tensor whose
    gradient holds NaN/Inf (``check_finite``), or whose ``oks`` flag (a bool per tensor,
    agreed across ranks) is False, is left untouched, its ``step`` too, and its ``skips``
    counter is incremented. ``step_bound``: an upper bound of every step after this one."""
    if noise == "innovation" and snr_avgs is None:
        raise ValueError("fused_snr_adamw_step: noise='innovation' needs the innovation EMAs")
    check_step(params, grads, exp_avgs, exp_avg_sqs, snr_avgs, gate_rule)
    key = (tuple(betas), snr_beta, gate_rule, gate_a, warmup_steps, noise)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([] if snr_avgs is None else [snr_avgs])
    for (device, _, _), idx in _groups(params, grads).items():
        table = step_table(key, device).covering(step_bound)
        if oks is not None:
            where = torch.tensor(idx).to(oks.device, non_blocking=True)
            ok = oks.index_select(0, where).to(device)
        elif check_finite:
            ok = finite([grads[i] for i in idx])
        else:
            ok = torch.ones(len(idx), dtype=torch.bool, device=device)
        rows = advance([steps[i] for i in idx], [skips[i] for i in idx], ok, table)
        _run(
            [[ts[i] for i in idx] for ts in lists],
            rows,
            ok,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            snr_beta=snr_beta,
            gate_rule=gate_rule,
            tau=tau,
            maximize=maximize,
            noise=noise,
            shared_s=snr_avgs is None,
        )
