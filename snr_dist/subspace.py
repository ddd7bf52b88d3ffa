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

Data parallelism. Everything a tracker accumulates is a sum over the columns ``o`` of its
matrix view, so a rank holding a slice of those columns (an FSDP2 row shard, with the basis on
the unsharded column side) keeps *partial* sums, and one all-reduce of ``2r + 2`` numbers per
matrix gives every rank the statistics the gates need; sketches and ``r x r`` matrices are only
summed (to the tracker's owner) at a refresh. One process is the case of a single shard.

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
from snr_dist.grad_mode import no_grad


def squared_norm(t: Tensor) -> Tensor:
    """``||t||^2`` as a BLAS dot product (faster than ``t.square().sum()``, no temporary)."""
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


def basis_on_rows(shape: tuple[int, ...], side: str, sharded_rows: bool = False) -> bool:
    """Whether the basis lives on the first dimension of the matrix view of ``shape``.

    With ``sharded_rows`` (FSDP2's ``Shard(0)``) the basis must live on the unsharded column
    side, so that every projection is local to a rank's rows."""
    m, n = shape[0], math.prod(shape[1:])
    if sharded_rows:
        if side == "rows":
            raise ValueError(
                "Invalid basis_side: 'rows' for a parameter sharded along its rows (FSDP2 "
                "Shard(0)); allowed: 'auto' or 'cols'"
            )
        return False
    if side == "rows":
        return True
    if side == "cols":
        return False
    return m <= n


def matrix_view(t: Tensor, rows: bool) -> Tensor:
    """``t`` as a 2-D view with the basis dimension first (no copy for contiguous tensors)."""
    mat = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    return mat if rows else mat.mT


def effective_rank(shape: tuple[int, ...], rows: bool, rank: int) -> int:
    m, n = shape[0], math.prod(shape[1:])
    return min(rank, m if rows else n)


def init_tracker(
    state: dict,
    global_shape: tuple[int, ...],
    local_shape: tuple[int, ...],
    opts: dict,
    device,
    key: int,
    stats: str,
    sharded_rows: bool = False,
) -> None:
    """Random orthonormal basis (seeded per parameter, identical on every rank) and the zero
    statistics of one estimator: ``stats`` is "cross_sample", "second_moment" or
    "innovation"."""
    rows = basis_on_rows(global_shape, opts["basis_side"], sharded_rows)
    d = global_shape[0] if rows else math.prod(global_shape[1:])
    o = math.prod(local_shape) // d if d else 0
    r = effective_rank(global_shape, rows, opts["rank"])
    gen = torch.Generator(device="cpu").manual_seed(int(opts["seed"]) * 1_000_003 + key)
    q = torch.linalg.qr(torch.randn(d, r, generator=gen, dtype=torch.float64)).Q
    f32 = dict(device=device, dtype=torch.float32)
    state["basis_rows"] = torch.tensor(rows)
    state["basis"] = q.to(**f32)
    state["sketch"] = torch.zeros(d, r, **f32)
    state["sketch_weight"] = torch.zeros((), **f32)
    state["eigvals"] = torch.zeros(r, **f32)
    if stats == "cross_sample":
        state["raw_dir"] = torch.zeros(r, **f32)
        state["raw_energy"] = torch.zeros((), **f32)
    else:
        state["proj_avg"] = torch.zeros(r, o, **f32)
    if stats == "second_moment":
        state["proj_cov"] = torch.zeros(r, r, **f32)
        state["energy"] = torch.zeros((), **f32)
    else:
        state["noise_dir"] = torch.zeros(r, **f32)
        state["noise_energy"] = torch.zeros((), **f32)


def refresh_due(step: int, refresh_every: int) -> bool:
    """Refresh at steps 1, 2, 4, 8, ... while younger than ``refresh_every``, then periodically."""
    if step % refresh_every == 0:
        return True
    return step < refresh_every and (step & (step - 1)) == 0


def project(q: Tensor, g: Tensor, kernels: str = "torch") -> tuple[Tensor, Tensor | None]:
    """``(P, row sums of squares of P or None)`` for ``P = Q^T G``; the Triton kernel
    (``kernels="triton"``) reads ``G`` once and sums the squares on the way."""
    if kernels == "triton":
        from snr_dist.kernels import project_with_stats

        r, col_sq = project_with_stats(g.T, q, kernels="triton")
        return r.T, col_sq
    return q.T @ g, None


@no_grad
def observe(
    state: dict,
    grad: Tensor,
    beta_v: float,
    beta_s: float,
    sketch_beta: float,
    kernels: str = "torch",
) -> Tensor:
    """Update the sketch (and, in temporal mode, the projected moments) from the step gradient.

    ``grad`` is this rank's part of the gradient (fp32); all updates are partial sums over its
    columns. Returns ``P = Q^T G``. ``kernels``: "torch" or "triton" (already resolved).
    """
    q = state["basis"]
    g = matrix_view(grad, bool(state["basis_rows"]))
    p, _ = project(q, g, kernels)
    state["sketch"].mul_(sketch_beta).addmm_(g, p.T, alpha=1.0 - sketch_beta)
    state["sketch_weight"].mul_(sketch_beta).add_(1.0 - sketch_beta)
    if "proj_cov" in state:
        state["proj_avg"].lerp_(p, 1.0 - beta_s)
        state["proj_cov"].mul_(beta_v).addmm_(p, p.T, alpha=1.0 - beta_v)
        state["energy"].mul_(beta_v).add_(squared_norm(grad), alpha=1.0 - beta_v)
    return p


@no_grad
def observe_innovation(
    state: dict,
    grad: Tensor,
    mean: Tensor,
    step: int,
    beta: float,
    rho: float,
    sketch_beta: float,
    kernels: str = "torch",
) -> Tensor:
    """The innovation rule on the tracker: sketch, innovation energies, projected mean.

    ``mean`` is the full-space raw EMA of the gradient (factor ``beta``) *before* it takes
    ``grad``; ``proj_avg`` holds ``Q^T mean`` (it is the same EMA of ``Q^T G``, exact between
    refreshes). The innovation ``G - mean_hat_{t-1}`` is measured along each direction
    (``r`` energies) and in total, all as partial sums over the columns this rank holds.
    Returns ``||lerp(mean, grad, 1 - beta)||^2`` (0-dim), the squared norm of the mean once it
    has taken ``grad``, for `innovation_vector` (see `observe_innovation_many`).
    """
    return observe_innovation_many([state], [grad], [mean], step, beta, rho, sketch_beta, kernels)[
        0
    ]


@no_grad
def observe_innovation_many(
    states: list[dict],
    grads: list[Tensor],
    means: list[Tensor],
    step: int,
    beta: float,
    rho: float,
    sketch_beta: float,
    kernels: str = "torch",
) -> Tensor:
    """`observe_innovation` for several trackers at the same ``step``: the two thin matmuls
    and three dot products per matrix, the small updates as one multi-tensor op each.

    The three dots ``g.g``, ``g.m``, ``m.m`` give both the innovation energy
    ``||g - c m||^2`` and the squared norm of the next mean ``||b m + (1-b) g||^2``; the latter
    (returned, one value per tracker) spares `innovation_vector` another pass over the mean.
    """
    ps, r_dirs, dots = [], [], []
    c = 1.0 / (1.0 - beta ** (step - 1)) if step >= 2 else 0.0
    for state, grad, mean in zip(states, grads, means):
        q = state["basis"]
        g = matrix_view(grad, bool(state["basis_rows"]))
        p, _ = project(q, g, kernels)
        state["sketch"].mul_(sketch_beta).addmm_(g, p.T, alpha=1.0 - sketch_beta)
        flat_g, flat_m = grad.reshape(-1), mean.reshape(-1)
        dots += [torch.dot(flat_g, flat_g), torch.dot(flat_g, flat_m), torch.dot(flat_m, flat_m)]
        if step >= 2:
            r_dirs.append(torch.sub(p, state["proj_avg"], alpha=c).square_().sum(dim=1))
        ps.append(p)
    d = torch.stack(dots).view(-1, 3)
    gg, gm, mm = d.unbind(1)
    sketch_weights = [st["sketch_weight"] for st in states]
    torch._foreach_mul_(sketch_weights, sketch_beta)
    torch._foreach_add_(sketch_weights, 1.0 - sketch_beta)
    if step >= 2:
        total = (gg - (2.0 * c) * gm + (c * c) * mm).clamp_(min=0.0)
        noise_dirs = [st["noise_dir"] for st in states]
        torch._foreach_mul_(noise_dirs, rho)
        torch._foreach_add_(noise_dirs, r_dirs, alpha=1.0 - rho)
        energies = [st["noise_energy"] for st in states]
        torch._foreach_mul_(energies, rho)
        torch._foreach_add_(energies, list(total.unbind(0)), alpha=1.0 - rho)
    torch._foreach_lerp_([st["proj_avg"] for st in states], ps, 1.0 - beta)
    w = 1.0 - beta
    # >= 0 exactly (|g.m| <= ||g|| ||m||); the clamp only catches rounding
    return ((w * w) * gg + (2.0 * beta * w) * gm + (beta * beta) * mm).clamp_(min=0.0)


def innovation_vector(state: dict, mean: Tensor, mean_sq: Tensor | None = None) -> Tensor:
    """The ``2r + 2`` partial sums the innovation gates need: the squared norm of each row of
    ``proj_avg`` (= ``Q^T mean``), the innovation energies, their total and ``||mean||^2``
    (``mean_sq`` when the caller has it, e.g. from `observe_innovation_many`)."""
    if mean_sq is None:
        mean_sq = squared_norm(mean.float())
    return torch.cat(
        [
            state["proj_avg"].square().sum(dim=1),
            state["noise_dir"],
            state["noise_energy"].reshape(1),
            mean_sq.reshape(1),
        ]
    )


def innovation_direction_moments(
    vec: Tensor, step: int, beta: float, rho: float
) -> tuple[Tensor, Tensor, float]:
    """``(raw, var, k)`` for the ``r`` tracked directions followed by the complement, from the
    (all-reduced) `innovation_vector` (or a stack of them)."""
    r = (vec.shape[-1] - 2) // 2
    mean_dir, noise_dir = vec[..., :r], vec[..., r : 2 * r]
    noise_total, mean_energy = vec[..., 2 * r : 2 * r + 1], vec[..., 2 * r + 1 :]
    bc2 = (1.0 - beta**step) ** 2
    k = rule.ema_noise_factor(beta, step)
    scale = 1.0 / ((1.0 - rho ** (step - 1)) * (1.0 + rule.innovation_kappa(beta, rho, step)))
    raw_dir = mean_dir / bc2
    raw_perp = (mean_energy / bc2 - raw_dir.sum(-1, keepdim=True)).clamp(min=0.0)
    var_perp = (noise_total - noise_dir.sum(-1, keepdim=True)).clamp(min=0.0)
    raw = torch.cat([raw_dir, raw_perp], dim=-1)
    var = torch.cat([noise_dir, var_perp], dim=-1) * scale
    return raw, var, k


def temporal_vector(state: dict, mean: Tensor) -> Tensor:
    """The ``2r + 2`` partial sums the temporal gates need: ``diag(proj_cov)``, the squared
    norm of each row of ``proj_avg``, the energy and ``||s||^2`` of the full-space mean."""
    return torch.cat(
        [
            torch.diagonal(state["proj_cov"]),
            state["proj_avg"].square().sum(dim=1),
            state["energy"].reshape(1),
            squared_norm(mean.float()).reshape(1),
        ]
    )


def temporal_direction_moments(
    vec: Tensor, step: int, beta_s: float, beta_v: float
) -> tuple[Tensor, Tensor, float]:
    """``(raw, var, k)`` for the ``r`` tracked directions followed by the complement, from the
    (all-reduced) `temporal_vector` (or a stack of them: leading dimensions are batch)."""
    r = (vec.shape[-1] - 2) // 2
    diag_cov, mean_dir = vec[..., :r], vec[..., r : 2 * r]
    energy, mean_energy = vec[..., 2 * r : 2 * r + 1], vec[..., 2 * r + 1 :]
    bc_s2 = (1.0 - beta_s**step) ** 2
    bc_v = 1.0 - beta_v**step
    k = rule.ema_noise_factor(beta_s, step)
    raw_dir = mean_dir / bc_s2
    raw_perp = (mean_energy / bc_s2 - raw_dir.sum(-1, keepdim=True)).clamp(min=0.0)
    second_perp = ((energy - diag_cov.sum(-1, keepdim=True)) / bc_v).clamp(min=0.0)
    raw = torch.cat([raw_dir, raw_perp], dim=-1)
    var = torch.cat([diag_cov / bc_v, second_perp], dim=-1)
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


@no_grad
def apply_gates(
    state: dict,
    direction: Tensor,
    gates: Tensor,
    out: Tensor | None = None,
    alpha: float = 1.0,
    kernels: str = "torch",
    decay: float = 1.0,
) -> None:
    """``D' = g_perp D + Q ((g - g_perp) * Q^T D)``; ``gates`` = r values + complement.

    In place on ``direction``, or, with ``out``, ``out <- decay * out + alpha * D'`` (``D``
    untouched): the optimizer adds the gated step straight into the parameter, two passes
    instead of four, and its weight decay rides on the reconstruction's matmul (``decay``).
    With ``kernels="triton"`` the two passes are one projection and one fused
    gate-and-reconstruct (on the transposed views: ``X = D^T``).
    """
    q = state["basis"]
    rows = bool(state["basis_rows"])
    d = matrix_view(direction, rows)
    g_dir, g_perp = gates[:-1], gates[-1]
    if kernels == "triton":
        from snr_dist.kernels import gate_reconstruct

        coef, _ = project(q, d, kernels)
        kw = dict(check_orthonormal=False, kernels="triton")
        if out is None:
            gate_reconstruct(d.T, coef.T, q, g_dir - g_perp, g_perp, inplace=True, **kw)
            _write_back(direction, d, rows)
        else:
            if decay != 1.0:
                out.mul_(decay)
            o = matrix_view(out, rows)
            c, a = (g_dir - g_perp) * alpha, g_perp * alpha
            gate_reconstruct(d.T, coef.T, q, c, a, out=o.T, accumulate=True, **kw)
            _write_back(out, o, rows)
        return
    coef = q.T @ d
    coef.mul_((g_dir - g_perp).unsqueeze(1))
    if out is None:
        d.mul_(g_perp)
        d.addmm_(q, coef)
        _write_back(direction, d, rows)
        return
    o = matrix_view(out, rows)
    o.addmm_(q, coef, beta=decay, alpha=alpha)
    o.addcmul_(d, g_perp, value=alpha)
    _write_back(out, o, rows)


def _write_back(t: Tensor, mat: Tensor, rows: bool) -> None:
    """`matrix_view` copies a tensor whose strides have no 2-D view (a channels_last conv
    weight, a permuted parameter): what was written into the copy goes back into ``t``."""
    if t.is_contiguous() or not t.numel():  # reshape gave a view (the usual case): no check
        return
    if mat.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
        t.copy_((mat if rows else mat.mT).reshape(t.shape))


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


def _complement_per_dim(total: Tensor, cov_trace: Tensor, d: int, r: int) -> Tensor:
    if d <= r:
        return torch.zeros((), dtype=total.dtype, device=total.device)
    return (total - cov_trace).clamp(min=0.0) / (d - r)


def refresh_partials(state: dict) -> list[Tensor]:
    """What a refresh sums over the ranks sharing a tracker: the sketch and, for the
    second-moment rule, ``proj_cov`` and ``proj_avg proj_avg^T`` (copies: reductions may
    clobber)."""
    out = [state["sketch"].clone()]
    if "proj_cov" in state:
        sp = state["proj_avg"]
        out += [state["proj_cov"].clone(), sp @ sp.T]
    return out


def _nystrom_basis(q_old: Tensor, sketch: Tensor, sketch_weight: float) -> tuple[Tensor, Tensor]:
    """``(q_new, eigvals)`` from the sketch; the old basis (and zero eigenvalues) when there is
    nothing to solve or the solve fails, so every rank's refresh keeps the same structure."""
    r = q_old.shape[1]
    keep = q_old.clone(), torch.zeros(r, device=q_old.device)
    y = sketch / sketch_weight if sketch_weight > 0.0 else None  # ~ C Q_old
    # The Nystrom approximation is linear in Y, so solve for Y / max|Y| in float64 and scale
    # the eigenvalues back: late in training Y's entries are squared gradients (1e-20 and
    # below), whose pseudo-inverse overflows float32 and makes eigh fail.
    scale = float(y.abs().max()) if y is not None else 0.0
    if not (scale > 0.0 and math.isfinite(scale)):  # nothing observed yet (or no gradient)
        return keep
    y64 = y.double() / scale
    core = q_old.double().T @ y64  # ~ Q^T C Q / scale, symmetric PSD up to noise
    try:
        q1 = torch.linalg.qr(y64).Q
        t = q1.T @ y64
        small = t @ _psd_pinv(core) @ t.T  # the Nystrom approximation in q1 coordinates
        evals, evecs = torch.linalg.eigh(0.5 * (small + small.T))
    except torch.linalg.LinAlgError:  # keep the basis; the next refresh tries again
        return keep
    q_new = q1 @ evecs.flip(1)  # orthonormal: q1 is, and eigh's evecs are orthogonal
    return q_new.float(), (evals.flip(0).clamp(min=0.0) * scale).float()


@no_grad
def refresh_solve(
    q_old: Tensor,
    partials: list[Tensor],
    sketch_weight: float,
    temporal: tuple[Tensor, int, float, float] | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The owner's part of a refresh: ``(q_new, eigvals, rotated covariance or None)``.

    The Nystrom approximation ``C ~ Y (Q^T Y)^+ Y^T`` is eigendecomposed inside ``span(Y)``.
    ``temporal`` = (the all-reduced `temporal_vector`, step, beta_s, beta_v).
    """
    d, r = q_old.shape
    q_new, evals = _nystrom_basis(q_old, partials[0], sketch_weight)
    cov_rot = None
    if temporal is not None:
        vec, step, beta_s, beta_v = temporal
        bc_s2 = (1.0 - beta_s**step) ** 2
        bc_v = 1.0 - beta_v**step
        cov = partials[1] / bc_v - partials[2] / bc_s2
        total = vec[2 * r] / bc_v - vec[2 * r + 1] / bc_s2
        fill = _complement_per_dim(total, torch.trace(cov), d, r)
        cov_rot = _rotate_cov(cov, q_new.T @ q_old, fill)
    return q_new, evals, cov_rot


@no_grad
def refresh_apply(
    state: dict,
    q_new: Tensor,
    evals: Tensor,
    cov_rot: Tensor | None,
    mean: Tensor | None,
    share: bool,
    step: int,
    beta_s: float,
    beta_v: float,
) -> None:
    """Every rank's part of a refresh: re-express what it holds in the new basis.

    ``share``: this rank carries the tracker's shared (non-partial) parts, the rotated
    covariance and the new sketch, so that the partial sums over ranks stay right (the owner).
    """
    q_old = state["basis"]
    rot = q_new.T @ q_old
    # Per-direction energies (cross-sample sums, innovation energies) are kept as a diagonal
    # (their all-reduce stays O(r) per matrix), so they are rotated as a diagonal second
    # moment; the rotation is linear, so partial sums over ranks stay right.
    d, r = q_old.shape
    weights = rot.square()
    for key, tot_key in (("raw_dir", "raw_energy"), ("noise_dir", "noise_energy")):
        if key in state:
            old = state[key]
            fill = _complement_per_dim(state[tot_key], old.sum(), d, r)
            state[key].copy_(weights @ old + fill * (1.0 - weights.sum(dim=1)).clamp(min=0.0))
    if "proj_avg" in state:  # the projected mean: re-projected exactly from the full space
        sp = state["proj_avg"]
        sp.copy_(q_new.T @ matrix_view(mean.float(), bool(state["basis_rows"])))
    if "proj_cov" in state:
        bc_s2 = (1.0 - beta_s**step) ** 2
        bc_v = 1.0 - beta_v**step
        own = cov_rot if share else torch.zeros_like(cov_rot)
        state["proj_cov"].copy_((own + (sp @ sp.T) / bc_s2) * bc_v)
    state["sketch"].copy_(q_new * evals if share else torch.zeros_like(q_new))
    state["sketch_weight"].fill_(1.0)
    state["eigvals"].copy_(evals)
    state["basis"].copy_(q_new)


def refresh(state: dict, mean: Tensor | None, step: int, beta_s: float, beta_v: float) -> None:
    """A whole refresh in one process (one shard that owns the tracker)."""
    temporal = None
    if "proj_cov" in state:
        temporal = (temporal_vector(state, mean), step, beta_s, beta_v)
    q_new, evals, cov_rot = refresh_solve(
        state["basis"], refresh_partials(state), float(state["sketch_weight"]), temporal
    )
    refresh_apply(state, q_new, evals, cov_rot, mean, True, step, beta_s, beta_v)


def captured_fraction(inside: Tensor, total: Tensor) -> float:
    """``tr(Q^T C Q) / tr(C)`` from the energy inside the basis and in total."""
    den = float(total)
    return float(inside) / den if den > 0 else float("nan")


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spans of ``a`` and ``b``."""
    qa = torch.linalg.qr(a.double()).Q
    qb = torch.linalg.qr(b.double()).Q
    s = torch.linalg.svdvals(qa.T @ qb).clamp(max=1.0)
    return torch.arccos(s).flip(0)
