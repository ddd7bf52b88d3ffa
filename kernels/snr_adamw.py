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

from snr_dist.kernels.reference import check_step, snr_adamw_scalars
from snr_dist.snr import GATE_FLOOR, GATE_RULES

from ._common import TL_DTYPE, hopper, interpreted, next_pow2

CHUNK = 1 << 16  # elements per program; a multiple of every BLOCK below
_RULE_ID = {name: i for i, name in enumerate(GATE_RULES)}  # wiener, clamp, hard, paper, none


@triton.jit
def _lerp(a, b, w):
    # torch's lerp: exact at both ends whichever side the weight is on
    return tl.where(w < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _snr_adamw_kernel(
    table,  # int64: ptrs of p, g, m, v, s (N each), numels (N), chunk owner (C), chunk start (C)
    n_tensors,
    n_chunks,
    w1,
    beta2,
    w_s,
    eps,
    decay,
    step_size,
    inv_bc2_sqrt,
    inv_bc_s,
    inv_bc_v,
    inv_one_k,
    shift,
    tau,
    inv_bc_prev,
    var_scale,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    RULE: tl.constexpr,
    GATED: tl.constexpr,
    SHARED_S: tl.constexpr,
    INNOV: tl.constexpr,
    UPDATE_X: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.load(table + 6 * n_tensors + pid)
    start = tl.load(table + 6 * n_tensors + n_chunks + pid)
    n = tl.load(table + 5 * n_tensors + i)
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
    end = tl.minimum(start + CHUNK, n)
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
            if UPDATE_X:
                r = g - m_prev * inv_bc_prev
                x = x * (1.0 - w1) + w1 * (r * r)
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
            raw = s * inv_bc_s
            raw = raw * raw
            if INNOV:  # noqa: SIM108 - constexpr branches, not a value choice
                var = x * var_scale
            else:
                var = tl.maximum((v * inv_bc_v - raw) * inv_one_k, 0.0)
            var = tl.maximum(var, GATE_FLOOR)
            sig = tl.maximum(raw - shift * var, 0.0)  # shift: k, or the paper gate's a
            noise = tau * var
            if RULE == 0 or RULE == 3:  # wiener, paper
                gate = sig / (sig + noise)
            elif RULE == 1:  # clamp
                gate = tl.minimum(sig / noise, 1.0)
            else:  # hard
                gate = tl.where(sig > noise, 1.0, 0.0)
            num = gate * m
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
        scratch = {**args, "SHARED_S": False, "INNOV": False, "UPDATE_X": False}
        times = [
            triton.testing.do_bench(lambda cf=cf: _launch(scratch, table, n, c, cf))
            for cf in configs
        ]
        _tuned[key] = configs[min(range(len(configs)), key=times.__getitem__)]
    return _tuned[key]


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
    """The Triton version of `snr_dist.kernels.fused_snr_adamw_step_torch` (same arguments).

    Tensors are grouped by (device, param dtype, grad dtype), one launch per group. Tensors
    whose layout differs from their parameter's, or that have gaps, are stepped through
    contiguous copies.
    """
    if noise == "innovation" and snr_avgs is None:
        raise ValueError("fused_snr_adamw_step: noise='innovation' needs the innovation EMAs")
    check_step(params, grads, exp_avgs, exp_avg_sqs, snr_avgs, gate_rule)
    if not params:
        return
    sc = snr_adamw_scalars(
        step, lr, betas, eps, weight_decay, snr_beta, gate_rule, tau, gate_a, warmup_steps, noise
    )
    beta1, beta2 = betas
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.numel():
            groups.setdefault((p.device, p.dtype, g.dtype), []).append(i)
    for (device, pdt, gdt), idx in groups.items():
        lists = [params, grads, exp_avgs, exp_avg_sqs] + ([] if snr_avgs is None else [snr_avgs])
        work = [[ts[i] for i in idx] for ts in lists]
        copied = []  # (original, contiguous working copy) of what the kernel writes
        for j in range(len(idx)):
            if all(_dense(ts[j], work[0][j]) for ts in work):
                continue
            for k, ts in enumerate(work):
                if not ts[j].is_contiguous():
                    tmp = ts[j].contiguous()
                    if k != 1:  # the gradient is only read
                        copied.append((ts[j], tmp))
                    ts[j] = tmp
        table, n, c = _table(*work[:4], None if snr_avgs is None else work[4])
        args = dict(
            w1=1.0 - beta1,
            beta2=beta2,
            w_s=1.0 - snr_beta,
            eps=eps,
            decay=sc["decay"],
            step_size=sc["step_size"],
            inv_bc2_sqrt=sc["inv_bc2_sqrt"],
            inv_bc_s=sc["inv_bc_s"],
            inv_bc_v=sc["inv_bc_v"],
            inv_one_k=sc["inv_one_k"],
            shift=sc["shift"],
            tau=tau,
            inv_bc_prev=sc["inv_bc_prev"],
            var_scale=sc["var_scale"],
            P_DTYPE=TL_DTYPE[pdt],
            G_DTYPE=TL_DTYPE[gdt],
            RULE=_RULE_ID[gate_rule],
            GATED=sc["gated"],
            SHARED_S=snr_avgs is None,
            INNOV=noise == "innovation",
            UPDATE_X=sc["update_x"],
            MAXIMIZE=bool(maximize),
            ALIGNED=all(t.data_ptr() % 16 == 0 for ts in work for t in ts),
        )
        if interpreted(_snr_adamw_kernel):  # one block per chunk, no bigger than needed
            config = (min(CHUNK, next_pow2(max(p.numel() for p in work[0]))), 1)
        else:
            config = _tune(args, device, sum(p.numel() for p in work[0]))
        _launch(args, table, n, c, config)
        for orig, tmp in copied:
            orig.copy_(tmp)
