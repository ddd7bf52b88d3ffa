r"""ENTK eigen-trackers: the SNR rule on a low-rank eigenbasis of the gradient covariance.

For a matrix parameter viewed as ``G`` (``d x o``, basis on the ``d`` side, the smaller one by
default) we track an orthonormal ``Q`` (``d x r``) spanning the top eigenspace of
``C = E[G G^T]``. ``C`` is the parameter-space image of the residual-weighted empirical NTK: the
per-example gradient Gram matrix *is* that kernel on the batch, and its top eigenvectors map to
parameter space through the Jacobian. Directions with coherent drift (signal) dominate ``C``'s
top eigenvalues early; label noise spreads over the rest.

Per step (two thin matmuls, ``4 d o r`` flops, plus two for the gated update):

- ``P = Q^T G``: the projected gradient (``r x o``);
- ``Y <- b Y + (1-b) G P^T``: the sketch of ``C Q`` (randomized subspace iteration);
- statistics of ``P`` per direction, and of the complement ``G - Q P`` as one more direction;
- ``D' = g_perp D + Q ((g - g_perp) * Q^T D)``: the gated base update.

Every ``refresh_every`` steps (and at steps 1, 2, 4, ... before that) the basis is refreshed
from the sketch by a Nystrom step: ``C ~ Y (Q^T Y)^+ Y^T`` is eigendecomposed inside
``span(Y)``, giving the new basis (sorted by eigenvalue) and eigenvalue estimates.

Statistics survive a refresh. In temporal mode the mean is kept in full parameter space
(basis-free) and re-projected exactly, and the ``r x r`` covariance is rotated with
``R = Q_new^T Q_old``, the part of a new direction outside the old span filled in with the
complement's average variance per dimension. In cross-sample mode only per-direction energies
are kept (``r + 1`` numbers, cheap to all-reduce) and are rotated as a diagonal second moment.

The captured-energy fraction ``tr(Q^T C Q) / tr(C)`` uses ``tr(C) = E ||G||_F^2`` exactly (a
Hutchinson estimate of the same trace would only add variance).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snr_dist import snr as rule


def squared_norm(t: Tensor) -> Tensor:
    """``||t||^2`` as a BLAS dot product (faster than ``t.square().sum()``, no temporary)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def basis_on_rows(shape: tuple[int, ...], side: str) -> bool:
    """Whether the basis lives on the first dimension of the matrix view of ``shape``."""
    m, n = shape[0], math.prod(shape[1:])
    if side == "rows":
        return True
    if side == "cols":
        return False
    return m <= n


def matrix_view(t: Tensor, rows: bool) -> Tensor:
    """``t`` as a 2-D view with the basis dimension first (no copy for contiguous tensors)."""
    mat = t.reshape(t.shape[0], -1)
    return mat if rows else mat.mT


def effective_rank(shape: tuple[int, ...], rows: bool, rank: int) -> int:
    m, n = shape[0], math.prod(shape[1:])
    return min(rank, m if rows else n)


def init_tracker(
    state: dict, shape: tuple[int, ...], opts: dict, device, key: int, cross: bool
) -> None:
    """Random orthonormal basis (seeded per parameter, identical on every rank) and zero stats."""
    rows = basis_on_rows(shape, opts["basis_side"])
    d = shape[0] if rows else math.prod(shape[1:])
    o = math.prod(shape) // d
    r = effective_rank(shape, rows, opts["rank"])
    gen = torch.Generator(device="cpu").manual_seed(int(opts["seed"]) * 1_000_003 + key)
    q = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    f32 = dict(device=device, dtype=torch.float32)
    state["basis_rows"] = torch.tensor(rows)
    state["basis"] = q.to(**f32)
    state["sketch"] = torch.zeros(d, r, **f32)
    state["sketch_weight"] = torch.zeros((), **f32)
    state["eigvals"] = torch.zeros(r, **f32)
    if cross:
        state["raw_dir"] = torch.zeros(r, **f32)
        state["noise_dir"] = torch.zeros(r, **f32)
        state["raw_energy"] = torch.zeros((), **f32)
        state["noise_energy"] = torch.zeros((), **f32)
    else:
        state["proj_avg"] = torch.zeros(r, o, **f32)
        state["proj_cov"] = torch.zeros(r, r, **f32)
        state["energy"] = torch.zeros((), **f32)


def refresh_due(step: int, refresh_every: int) -> bool:
    """Refresh at steps 1, 2, 4, 8, ... while younger than ``refresh_every``, then periodically."""
    if step % refresh_every == 0:
        return True
    return step < refresh_every and (step & (step - 1)) == 0


@torch.no_grad()
def observe(state: dict, grad: Tensor, beta_v: float, beta_s: float, sketch_beta: float) -> Tensor:
    """Update the sketch (and, in temporal mode, the projected moments) from the step gradient.

    ``grad`` is the full gradient (fp32, parameter shape). Returns ``P = Q^T G``.
    """
    q = state["basis"]
    g = matrix_view(grad, bool(state["basis_rows"]))
    p = q.T @ g
    state["sketch"].mul_(sketch_beta).addmm_(g, p.T, alpha=1.0 - sketch_beta)
    state["sketch_weight"].mul_(sketch_beta).add_(1.0 - sketch_beta)
    if "proj_avg" in state:
        state["proj_avg"].lerp_(p, 1.0 - beta_s)
        state["proj_cov"].mul_(beta_v).addmm_(p, p.T, alpha=1.0 - beta_v)
        state["energy"].mul_(beta_v).add_(squared_norm(grad), alpha=1.0 - beta_v)
    return p


def temporal_direction_moments(
    state: dict, mean_energy: Tensor, step: int, beta_s: float, beta_v: float
) -> tuple[Tensor, Tensor, float]:
    """``(raw, var, k)`` for the ``r`` tracked directions followed by the complement.

    ``mean_energy`` is ``||s||^2`` of the full-space EMA mean (raw, not bias-corrected).
    """
    bc_s = 1.0 - beta_s**step
    bc_v = 1.0 - beta_v**step
    k = rule.ema_noise_factor(beta_s, step)
    raw_dir = state["proj_avg"].square().sum(dim=1) / (bc_s * bc_s)
    cov = state["proj_cov"]
    second_dir = torch.diagonal(cov) / bc_v
    raw_perp = (mean_energy / (bc_s * bc_s) - raw_dir.sum()).clamp(min=0.0)
    second_perp = ((state["energy"] - torch.trace(cov)) / bc_v).clamp(min=0.0)
    raw = torch.cat([raw_dir, raw_perp.reshape(1)])
    var = torch.cat([second_dir, second_perp.reshape(1)])
    var = (var - raw).div_(max(1.0 - k, 1e-12)).clamp_(min=0.0)
    return raw, var, k


def cross_direction_moments(state: dict, step: int, beta: float) -> tuple[Tensor, Tensor]:
    """``(raw, var)`` (``k = 1``) for the ``r`` directions followed by the complement."""
    bc = 1.0 - beta**step
    raw_dir, var_dir = state["raw_dir"], state["noise_dir"]
    raw_perp = (state["raw_energy"] - raw_dir.sum()).clamp(min=0.0)
    var_perp = (state["noise_energy"] - var_dir.sum()).clamp(min=0.0)
    raw = torch.cat([raw_dir, raw_perp.reshape(1)]) / bc
    var = torch.cat([var_dir, var_perp.reshape(1)]).clamp(min=0.0) / bc
    return raw, var


@torch.no_grad()
def apply_gates(
    state: dict, direction: Tensor, gates: Tensor, out: Tensor | None = None, alpha: float = 1.0
) -> None:
    """``D' = g_perp D + Q ((g - g_perp) * Q^T D)``; ``gates`` = r values + complement.

    In place on ``direction``, or, with ``out``, ``out += alpha * D'`` (``D`` untouched): the
    optimizer adds the gated step straight into the parameter, two passes instead of four.
    """
    q = state["basis"]
    rows = bool(state["basis_rows"])
    d = matrix_view(direction, rows)
    g_dir, g_perp = gates[:-1], gates[-1]
    coef = q.T @ d
    coef.mul_((g_dir - g_perp).unsqueeze(1))
    if out is None:
        d.mul_(g_perp)
        d.addmm_(q, coef)
        return
    o = matrix_view(out, rows)
    o.addcmul_(d, g_perp, value=alpha)
    o.addmm_(q, coef, alpha=alpha)


def _psd_pinv(m: Tensor) -> Tensor:
    m = 0.5 * (m + m.T)
    w, v = torch.linalg.eigh(m)
    cut = w.abs().max().clamp(min=1e-30) * 1e-6
    inv = torch.where(w > cut, 1.0 / w, torch.zeros_like(w))
    return (v * inv) @ v.T


def _rotate_cov(cov: Tensor, rot: Tensor, complement_per_dim: Tensor) -> Tensor:
    eye = torch.eye(rot.shape[0], dtype=rot.dtype, device=rot.device)
    out = rot @ cov @ rot.T + complement_per_dim * (eye - rot @ rot.T)
    return 0.5 * (out + out.T)


def _complement_per_dim(total: Tensor, cov: Tensor, d: int, r: int) -> Tensor:
    if d <= r:
        return torch.zeros((), dtype=cov.dtype, device=cov.device)
    return (total - torch.trace(cov)).clamp(min=0.0) / (d - r)


@torch.no_grad()
def refresh(state: dict, mean_full: Tensor | None, step: int, beta_s: float, beta_v: float) -> None:
    """Nystrom refresh of the basis from the sketch; re-express the statistics in the new basis.

    Temporal mode: the mean is kept in full space (``mean_full``, raw EMA) and re-projected
    exactly; only the *covariance* (second moment minus squared mean) is rotated, with the part
    of a new direction outside the old span filled by the complement's variance per dimension.
    A coherent (low-noise) gradient therefore keeps its statistics exactly. Cross-sample mode:
    the per-direction energies are rotated as a diagonal matrix, with the same fill.
    """
    q_old = state["basis"]
    weight = float(state["sketch_weight"])
    if weight <= 0.0:
        return
    y = state["sketch"] / weight  # ~ C Q_old, bias-corrected
    d, r = q_old.shape
    core = q_old.T @ y  # ~ Q^T C Q, symmetric PSD up to noise
    q1 = torch.linalg.qr(y).Q
    t = q1.T @ y
    small = t @ _psd_pinv(core) @ t.T  # the Nystrom approximation in q1 coordinates
    evals, evecs = torch.linalg.eigh(0.5 * (small + small.T))
    evals, evecs = evals.flip(0).clamp(min=0.0), evecs.flip(1)
    q_new = q1 @ evecs  # orthonormal: q1 is, and eigh's evecs are orthogonal
    rot = q_new.T @ q_old
    if "proj_avg" in state:
        bc_s2 = (1.0 - beta_s**step) ** 2
        bc_v = 1.0 - beta_v**step
        sp = state["proj_avg"]
        cov = state["proj_cov"] / bc_v - (sp @ sp.T) / bc_s2
        total = state["energy"] / bc_v
        if mean_full is not None:
            total = total - mean_full.float().square().sum() / bc_s2
        fill = _complement_per_dim(total, cov, d, r)
        cov = _rotate_cov(cov, rot, fill)
        if mean_full is not None:
            rows = bool(state["basis_rows"])
            sp.copy_(q_new.T @ matrix_view(mean_full.float(), rows))
        else:
            sp.copy_(rot @ sp)
        state["proj_cov"].copy_((cov + (sp @ sp.T) / bc_s2) * bc_v)
    else:
        # Only per-direction energies are kept (their all-reduce stays O(r) per matrix), so
        # they are rotated as a diagonal second moment.
        weights = rot.square()
        for key, tot_key in (("raw_dir", "raw_energy"), ("noise_dir", "noise_energy")):
            old = state[key]
            fill = (state[tot_key] - old.sum()).clamp(min=0.0) / (d - r) if d > r else 0.0
            state[key].copy_(weights @ old + fill * (1.0 - weights.sum(dim=1)).clamp(min=0.0))
    state["basis"].copy_(q_new)
    state["sketch"].copy_(q_new * evals)
    state["sketch_weight"].fill_(1.0)
    state["eigvals"].copy_(evals)


def captured_energy(state: dict) -> float:
    """Fraction of the gradient's second moment ``tr(Q^T C Q) / tr(C)`` inside the basis."""
    if "proj_cov" in state:
        num, den = torch.trace(state["proj_cov"]), state["energy"]
    else:
        num, den = state["raw_dir"].sum(), state["raw_energy"]
    den = float(den)
    return float(num) / den if den > 0 else float("nan")


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spans of ``a`` and ``b``."""
    qa = torch.linalg.qr(a.double()).Q
    qb = torch.linalg.qr(b.double()).Q
    s = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.arccos(s).flip(0)
