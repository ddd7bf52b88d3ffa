"""Thin-matmul kernels of subspace mode: projection with statistics, gate-and-reconstruct.

Both read the big matrix exactly once. ``r`` is small (tens to a hundred), so they are bound
by memory, not flops: the projection keeps a ``BLOCK_M x r`` accumulator per program and sums
squares in its epilogue instead of launching a reduction over ``R``; the reconstruction adds
the rank-``r`` correction to the scaled tile it has just read, instead of materialising
``(R * c) Q^T`` and combining it with ``X`` in separate elementwise passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from snr_dist.kernels.reference import check_projection, check_reconstruct

from ._common import hopper, ieee_fp32, interpreted, next_pow2, smem_limit

MAX_BLOCK_R = 128  # wider bases are covered by several program columns


# ------------------------------------------------------------------ projection
@triton.jit
def _project_kernel(
    x_ptr,
    q_ptr,
    r_ptr,
    part_ptr,
    M,
    N,
    R,
    sxm,
    sxn,
    sqn,
    sqr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    row_off = rows.to(tl.int64) * sxm  # 64-bit: m * stride may pass 2^31
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, N, BLOCK_K):
        k = k0 + ks
        x = tl.load(
            x_ptr + row_off[:, None] + k.to(tl.int64)[None, :] * sxn,
            mask=(rows[:, None] < M) & (k[None, :] < N),
            other=0.0,
        )
        q = tl.load(
            q_ptr + k[:, None] * sqn + cols[None, :] * sqr,
            mask=(k[:, None] < N) & (cols[None, :] < R),
            other=0.0,
        )
        if DOT_FP32:
            if IEEE:
                acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x.to(tl.float32), q.to(tl.float32), acc, input_precision="tf32")
        else:  # 16-bit X: tensor cores, fp32 accumulation
            acc = tl.dot(x, q.to(x.dtype), acc)
    out_mask = (rows[:, None] < M) & (cols[None, :] < R)
    tl.store(r_ptr + rows.to(tl.int64)[:, None] * R + cols[None, :], acc, mask=out_mask)
    # Epilogue: this block's share of the per-direction energies (masked rows are zeros).
    # Partial sums per row block, added up afterwards in a fixed order, keep results
    # bit-reproducible (atomics would not).
    tl.store(part_ptr + pid_m * R + cols, tl.sum(acc * acc, axis=0), mask=cols < R)


def _proj_configs(hop: bool) -> list[triton.Config]:
    # Small BLOCK_M keeps >= 1 program per SM for 4096-row matrices (132 SMs on H100/H200,
    # 108 on A100); deeper pipelines where Hopper's 227 KB of shared memory allows.
    stages = (3, 4, 5) if hop else (2, 3, 4)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for bk in (64, 128, 256)
        for w in (4, 8)
        for s in stages
        if not (bm == 128 and w == 4)
    ]


def _proj_prune(configs, named_args, **kwargs):
    x, q = named_args["x_ptr"], named_args["q_ptr"]
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R"))
    limit = smem_limit(x.device)
    esize = 4 if kwargs.get("DOT_FP32", named_args.get("DOT_FP32")) else x.element_size()
    kept = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        tile = bm * bk * esize + bk * block_r * max(esize, q.element_size())
        if c.num_stages * tile <= limit:
            kept.append(c)
    return kept or configs[:1]


_proj_tuned: dict[bool, object] = {}


def _proj_launcher(device: torch.device):
    hop = hopper(device)
    if hop not in _proj_tuned:
        _proj_tuned[hop] = triton.autotune(
            configs=_proj_configs(hop),
            key=["M", "N", "R"],
            prune_configs_by={"early_config_prune": _proj_prune},
        )(_project_kernel)
    return _proj_tuned[hop]


@torch.no_grad()
def project_with_stats(X: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, col_sq)``: ``R = X Q`` in fp32 (``m x r``) and ``col_sq[j] = sum_i R[i, j]^2``.

    ``X`` may be any strided 2-D view (a transpose costs nothing). fp32 inputs use IEEE fp32
    dots unless torch's matmul precision allows TF32; a bf16 ``X`` uses bf16 tensor cores.
    """
    check_projection(X, Q)
    m, n = X.shape
    r = Q.shape[1]
    out = torch.empty(m, r, device=X.device, dtype=torch.float32)
    if m == 0:
        return out, torch.zeros(r, device=X.device)
    block_r = min(next_pow2(r), MAX_BLOCK_R)
    dot_fp32 = X.dtype == torch.float32 or interpreted(_project_kernel)
    common = (X, Q, out)
    strides = (m, n, r, X.stride(0), X.stride(1), Q.stride(0), Q.stride(1))
    flags = dict(BLOCK_R=block_r, DOT_FP32=dot_fp32, IEEE=ieee_fp32())
    if interpreted(_project_kernel):
        bm, bk = min(next_pow2(m), 512), min(next_pow2(n), 512)
        parts = torch.empty(triton.cdiv(m, bm), r, device=X.device)
        grid = (triton.cdiv(m, bm), triton.cdiv(r, block_r))
        _project_kernel[grid](*common, parts, *strides, BLOCK_M=bm, BLOCK_K=bk, **flags)
        return out, parts.sum(dim=0)
    # Sized for the smallest BLOCK_M a config may pick; only the chosen config's rows count
    # (tuning runs of other configs may have left rows behind them).
    parts = torch.empty(triton.cdiv(m, 16), r, device=X.device)
    launcher = _proj_launcher(X.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, block_r))
    launcher[grid](*common, parts, *strides, **flags)
    used = triton.cdiv(m, launcher.best_config.kwargs["BLOCK_M"])
    return out, parts[:used].sum(dim=0)


# ------------------------------------------------------------------ gate and reconstruct
@triton.jit
def _reconstruct_kernel(
    x_ptr,
    r_ptr,
    q_ptr,
    c_ptr,
    a_ptr,
    y_ptr,
    M,
    N,
    R,
    sxm,
    sxn,
    srm,
    srr,
    sqn,
    sqr,
    sym,
    syn,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_blocks_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_blocks_n  # consecutive programs share rows of R and sweep Q (L2 reuse)
    pid_n = pid % n_blocks_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        coef = tl.load(
            r_ptr + rows.to(tl.int64)[:, None] * srm + rr[None, :] * srr,
            mask=(rows[:, None] < M) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float32)
        coef = coef * tl.load(c_ptr + rr, mask=rr < R, other=0.0).to(tl.float32)[None, :]
        qt = tl.load(
            q_ptr + rr[:, None] * sqr + cols[None, :] * sqn,
            mask=(rr[:, None] < R) & (cols[None, :] < N),
            other=0.0,
        )
        if DOT_FP32:
            if IEEE:
                acc = tl.dot(coef, qt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(coef, qt.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(coef.to(tl.bfloat16), qt.to(tl.bfloat16), acc)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    rows64 = rows.to(tl.int64)  # m * stride may pass 2^31
    cols64 = cols.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * sxm + cols64[None, :] * sxn, mask=mask, other=0.0)
    y = tl.load(a_ptr).to(tl.float32) * x.to(tl.float32) + acc
    y_ptrs = y_ptr + rows64[:, None] * sym + cols64[None, :] * syn
    if ACCUMULATE:
        y += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _recon_configs(hop: bool) -> list[triton.Config]:
    stages = (2, 3, 4) if hop else (2, 3)
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bn in (64, 128, 256)
        for w in (4, 8)
        for s in stages
        if bm * bn <= 128 * 128
    ]


def _recon_prune(configs, named_args, **kwargs):
    x = named_args["x_ptr"]
    block_r = kwargs.get("BLOCK_R", named_args.get("BLOCK_R"))
    esize = 4 if kwargs.get("DOT_FP32", named_args.get("DOT_FP32")) else 2
    limit = smem_limit(x.device)
    kept = [
        c
        for c in configs
        if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_r * esize <= limit
    ]
    return kept or configs[:1]


_recon_tuned: dict[bool, object] = {}


def _recon_launcher(device: torch.device):
    hop = hopper(device)
    if hop not in _recon_tuned:
        _recon_tuned[hop] = triton.autotune(
            configs=_recon_configs(hop),
            key=["M", "N", "R", "ACCUMULATE"],
            prune_configs_by={"early_config_prune": _recon_prune},
            restore_value=["y_ptr"],  # tuning runs must not compound an in-place update
        )(_reconstruct_kernel)
    return _recon_tuned[hop]


@torch.no_grad()
def gate_reconstruct(
    X: Tensor,
    R: Tensor,
    Q: Tensor,
    c: Tensor,
    a: float | Tensor,
    *,
    out: Tensor | None = None,
    inplace: bool = False,
    accumulate: bool = False,
    check_orthonormal: bool = True,
) -> Tensor:
    """``Y = a X + (R * c) Q^T`` in one pass over ``X`` (``Y`` in ``X``'s dtype).

    ``inplace``: ``Y`` overwrites ``X`` (each program reads its tile before writing it, and
    no tile depends on another). ``out``: write ``Y`` there; with ``accumulate``, add it.
    ``check_orthonormal`` costs one host sync; the optimizer, whose bases are orthonormal by
    construction, skips it.
    """
    if inplace:
        out = X
    check_reconstruct(X, R, Q, c, a, out, accumulate, check_orthonormal)
    m, n = X.shape
    r = Q.shape[1]
    y = torch.empty_like(X) if out is None else out
    if m == 0 or n == 0:
        return y
    if torch.is_tensor(a):
        a_t = a.reshape(1).to(dtype=torch.float32)
    else:
        a_t = torch.full((1,), float(a), device=X.device, dtype=torch.float32)
    c_t = c.reshape(-1)
    block_r = min(next_pow2(r), 64)
    # bf16 data with a bf16 basis uses tensor cores; anything involving fp32 stays fp32.
    dot_fp32 = (
        X.dtype == torch.float32 or Q.dtype == torch.float32 or interpreted(_reconstruct_kernel)
    )
    args = (X, R, Q, c_t, a_t, y, m, n, r, X.stride(0), X.stride(1), R.stride(0), R.stride(1))
    args += (Q.stride(0), Q.stride(1), y.stride(0), y.stride(1))
    flags = dict(ACCUMULATE=bool(accumulate), BLOCK_R=block_r, DOT_FP32=dot_fp32, IEEE=ieee_fp32())
    if interpreted(_reconstruct_kernel):
        bm, bn = min(next_pow2(m), 256), min(next_pow2(n), 512)
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _reconstruct_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, **flags)
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _recon_launcher(X.device)[grid](*args, **flags)
    return y
