"""Pure-torch references of the fused kernels, and the input checks both paths share.

- ``project_with_stats(X, Q) -> (R, col_sq)``: ``R = X Q`` and ``col_sq[j] = sum_i R_ij^2``
  (the per-direction energies the subspace estimators need);
- ``gate_reconstruct(X, R, Q, c, a) -> a X + (R * c) Q^T``: the gated update of subspace mode,
  ``D' = g_perp D + Q ((g - g_perp) * Q^T D)`` written for ``X = D^T``;
- ``fused_snr_adamw_step``: a whole diagonal temporal SNR-AdamW step (moments, SNR, gate,
  decoupled decay, update) in one read-modify-write of ``p, grad, m, v, s``.

These are the readable versions (the test oracles) and the CPU path; the Triton versions
(`snr_dist.triton_kernels`, the repository's ``kernels/`` folder) import the checks and the
per-step scalars from here, and nothing here imports them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from snr_dist import snr as rule

FLOAT_DTYPES = (torch.float32, torch.bfloat16)


# ------------------------------------------------------------------ input checks
def _fail(fn: str, msg: str) -> None:
    raise ValueError(f"{fn}: {msg}")


def _describe(t) -> str:
    if not torch.is_tensor(t):
        return type(t).__name__
    return f"{t.dtype} tensor of shape {tuple(t.shape)} on {t.device}"


def _check_matrix(fn: str, name: str, t, dtypes=FLOAT_DTYPES) -> None:
    if not torch.is_tensor(t) or t.dim() != 2 or t.dtype not in dtypes:
        kinds = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        _fail(fn, f"{name} must be a 2-D {kinds} tensor, got {_describe(t)}")


def _check_same_device(fn: str, **tensors: Tensor) -> None:
    devices = {n: t.device for n, t in tensors.items() if torch.is_tensor(t)}
    if len(set(devices.values())) > 1:
        _fail(
            fn,
            "all tensors must be on one device, got "
            + ", ".join(f"{n} on {d}" for n, d in devices.items()),
        )


def check_orthonormal(fn: str, q: Tensor, atol: float | None = None) -> None:
    """Raise unless ``Q^T Q = I`` (one host sync: for checked public calls, not the optimizer)."""
    if atol is None:
        atol = 1e-3 if q.dtype == torch.float32 else 5e-2
    qf = q.float()
    err = float((qf.T @ qf - torch.eye(q.shape[1], device=q.device)).abs().max())
    if not err <= atol:
        _fail(
            fn,
            f"Q must have orthonormal columns (max |Q^T Q - I| = {err:.3g} > {atol:g}); the "
            "reconstruction is the gated update only for an orthonormal basis "
            "(pass check_orthonormal=False to skip this check)",
        )


def check_projection(X, Q, fn: str = "project_with_stats") -> None:
    _check_matrix(fn, "X", X)
    _check_matrix(fn, "Q", Q)
    _check_same_device(fn, X=X, Q=Q)
    n, r = Q.shape
    if X.shape[1] != n:
        _fail(
            fn, f"X is {tuple(X.shape)} but Q is {tuple(Q.shape)}: X.shape[1] must equal Q.shape[0]"
        )
    if not 1 <= r <= n:
        _fail(fn, f"Q must be thin (1 <= r <= n), got shape {tuple(Q.shape)}")


def check_reconstruct(X, R, Q, c, a, out, accumulate: bool, orthonormal: bool) -> None:
    fn = "gate_reconstruct"
    _check_matrix(fn, "X", X)
    _check_matrix(fn, "R", R)
    _check_matrix(fn, "Q", Q)
    m, n = X.shape
    if Q.shape[0] != n or R.shape != (m, Q.shape[1]):
        _fail(
            fn,
            f"shapes do not match: X {tuple(X.shape)}, R {tuple(R.shape)}, Q {tuple(Q.shape)} "
            "(need X m x n, R m x r, Q n x r)",
        )
    r = Q.shape[1]
    if not 1 <= r <= n:
        _fail(fn, f"Q must be thin (1 <= r <= n), got shape {tuple(Q.shape)}")
    if not torch.is_tensor(c) or c.dtype not in FLOAT_DTYPES or c.reshape(-1).shape != (r,):
        _fail(
            fn, f"c must be a float tensor of {r} gates (one per column of Q), got {_describe(c)}"
        )
    if torch.is_tensor(a):
        if a.numel() != 1 or not a.is_floating_point():
            _fail(fn, f"a must be a float or a one-element float tensor, got {_describe(a)}")
    elif not isinstance(a, (int, float)) or isinstance(a, bool):
        _fail(fn, f"a must be a float or a one-element float tensor, got {type(a).__name__}")
    if out is not None:
        _check_matrix(fn, "out", out)
        if out.shape != X.shape:
            _fail(fn, f"out has shape {tuple(out.shape)}, X has {tuple(X.shape)}")
    elif accumulate:
        _fail(fn, "accumulate=True needs out")
    _check_same_device(fn, X=X, R=R, Q=Q, c=c, a=a, out=out)
    if orthonormal:
        check_orthonormal(fn, Q)


def check_step(params, grads, exp_avgs, exp_avg_sqs, snr_avgs, gate_rule: str) -> None:
    fn = "fused_snr_adamw_step"
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if snr_avgs is not None:
        lists["snr_avgs"] = snr_avgs
    for name, ts in lists.items():
        if len(ts) != len(params):
            _fail(fn, f"{len(params)} params but {len(ts)} {name}")
    if gate_rule not in rule.GATE_RULES:
        _fail(fn, f"gate_rule must be one of {rule.GATE_RULES}, got {gate_rule!r}")
    for i, p in enumerate(params):
        if not torch.is_tensor(p) or p.dtype not in FLOAT_DTYPES:
            _fail(fn, f"params[{i}] must be an fp32 or bf16 tensor, got {_describe(p)}")
        g = grads[i]
        if not torch.is_tensor(g) or not g.is_floating_point() or g.dtype == torch.float64:
            _fail(fn, f"grads[{i}] must be an fp32, bf16 or fp16 tensor, got {_describe(g)}")
        if g.shape != p.shape:
            _fail(fn, f"grads[{i}] has shape {tuple(g.shape)}, params[{i}] has {tuple(p.shape)}")
        for name, ts in lists.items():
            if name == "grads":
                continue
            t = ts[i]
            if not torch.is_tensor(t) or t.dtype != torch.float32 or t.shape != p.shape:
                _fail(
                    fn,
                    f"{name}[{i}] must be an fp32 tensor of shape {tuple(p.shape)} (optimizer "
                    f"state stays fp32), got {_describe(t)}",
                )
        _check_same_device(fn, **{name: ts[i] for name, ts in lists.items()}, params=p)


# ------------------------------------------------------------------ torch references
def project_with_stats_torch(X: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """``(X Q, column sums of squares)`` in fp32."""
    check_projection(X, Q)
    r = X.float() @ Q.float()
    return r, r.square().sum(dim=0)


def gate_reconstruct_torch(
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
    """``a X + (R * c) Q^T`` (computed in fp32), written to ``out`` (``X`` when ``inplace``)
    or added to it (``accumulate``)."""
    if inplace:
        out = X
    check_reconstruct(X, R, Q, c, a, out, accumulate, check_orthonormal)
    a_f = a.float().reshape(()) if torch.is_tensor(a) else float(a)
    y = torch.addmm(X.float() * a_f, R.float() * c.float().reshape(1, -1), Q.float().T)
    if out is None:
        return y.to(X.dtype)
    if accumulate:
        y += out.float()
    out.copy_(y)
    return out


def snr_adamw_scalars(
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    snr_beta: float,
    gate_rule: str,
    tau: float,
    gate_a: float,
    warmup_steps: int,
    noise: str = "second_moment",
) -> dict:
    """The per-step constants of a diagonal temporal step (host floats, computed once).

    ``noise="innovation"``: the mean is Adam's (``beta1``, also the innovation EMA's factor);
    ``inv_bc_s`` is then ``1 / (1 - beta1^t)``, ``inv_bc_prev`` the previous step's, and
    ``var_scale`` turns the innovation EMA into the noise variance."""
    beta1, beta2 = betas
    beta_s = beta1 if noise == "innovation" else snr_beta
    k = rule.ema_noise_factor(beta_s, step)
    out = dict(
        gated=gate_rule != "none" and step >= 2 and step > warmup_steps,
        decay=1.0 - lr * weight_decay,
        step_size=lr / (1.0 - beta1**step),
        inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2**step),
        inv_bc_s=1.0 / (1.0 - beta_s**step),
        inv_bc_v=1.0 / (1.0 - beta2**step),
        inv_one_k=1.0 / max(1.0 - k, 1e-12),
        shift=gate_a if gate_rule == "paper" else k,
        update_x=noise == "innovation" and step >= 2,
        inv_bc_prev=1.0 / (1.0 - beta1 ** (step - 1)) if step >= 2 else 0.0,
        var_scale=0.0,
    )
    if noise == "innovation" and step >= 2:
        kappa = rule.innovation_kappa(beta1, beta1, step)
        out["var_scale"] = 1.0 / ((1.0 - beta1 ** (step - 1)) * (1.0 + kappa))
    return out


@torch.no_grad()
def fused_snr_adamw_step_torch(
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
    """`snr_dist.snr.snr_adamw_reference_step` for a list of tensors that share ``step``.

    ``noise="second_moment"``: ``snr_avgs`` is the SNR mean, or None when it is Adam's first
    moment (``snr_beta == betas[0]``). ``noise="innovation"``: ``snr_avgs`` is the innovation
    EMA (required). The new parameter is computed in fp32 and rounded once to the parameter's
    dtype.
    """
    if noise == "innovation" and snr_avgs is None:
        raise ValueError("fused_snr_adamw_step: noise='innovation' needs the innovation EMAs")
    check_step(params, grads, exp_avgs, exp_avg_sqs, snr_avgs, gate_rule)
    beta1, beta2 = betas
    sc = snr_adamw_scalars(
        step, lr, betas, eps, weight_decay, snr_beta, gate_rule, tau, gate_a, warmup_steps, noise
    )
    for i, p in enumerate(params):
        g = grads[i].float()
        if maximize:
            g = -g
        m, v = exp_avgs[i], exp_avg_sqs[i]
        if noise == "innovation":
            rule.innovation_(snr_avgs[i], g, m, step, beta1, beta1)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        if noise == "innovation":
            s = None
        else:
            s = m if snr_avgs is None else snr_avgs[i].lerp_(g, 1.0 - snr_beta)
        if sc["gated"]:
            if noise == "innovation":
                raw, var, k = rule.innovation_moments(m, snr_avgs[i], step, beta1, beta1)
            else:
                raw, var, k = rule.temporal_moments(s, v, step, snr_beta, beta2)
            gate = rule.gate(raw, var, k, gate_rule, tau, gate_a)
        else:
            gate = torch.ones_like(m)
        denom = v.sqrt().mul_(sc["inv_bc2_sqrt"]).add_(eps)
        new = p.float() * sc["decay"] - sc["step_size"] * gate * m / denom
        p.copy_(new)
