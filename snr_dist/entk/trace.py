"""Randomised trace estimators for a PSD operator known only through products ``V -> A V``.

``tr(K)`` of the ENTK is the total gradient energy of the outputs; at scale ``K`` cannot be
formed, but ``K V = J (J^T V)`` costs one backward and one forward-mode pass per column.

- Hutchinson: ``tr(A) ~ mean_i z_i^T A z_i`` with Rademacher ``z``; unbiased, variance
  ``2 (||A||_F^2 - sum_i A_ii^2) / k``: slow when a few eigenvalues dominate, as they do in
  an ENTK.
- Hutch++ (Meyer, Musco, Musco & Woodruff 2021): spend a third of the products on a sketch
  ``Q = orth(A S)`` that captures the top eigenspace, take its trace exactly
  (``tr(Q^T A Q)``, a second third), and run Hutchinson only on the deflated remainder
  ``(I - QQ^T) A (I - QQ^T)`` (the last third). Still unbiased, with error ``O(1/k)`` instead
  of ``O(1/sqrt(k))`` for PSD ``A``; exact when ``rank(A) <= k/3``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from snr_dist.entk.kernel import entk_matvec, trainable_params

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with the standard error of its random part (``nan``: too few probes
    to tell; for Hutch++ the error is conditional on the sketch)."""

    estimate: float
    stderr: float
    num_probes: int  # matrix-vector products spent
    method: str

    def to_dict(self) -> dict:
        d = asdict(self)
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()
        }


def rademacher(
    dim: int,
    k: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """``dim x k`` matrix of independent +-1 entries (drawn on the CPU for reproducibility)."""
    z = torch.randint(0, 2, (dim, k), generator=generator).to(dtype) * 2 - 1
    return z.to(device) if device is not None else z


def _check(dim: int, num_probes: int, least: int) -> None:
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if num_probes < least:
        raise ValueError(f"num_probes must be >= {least}, got {num_probes}")


def _mean_se(values: Tensor) -> tuple[float, float]:
    mean = float(values.mean())
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return mean, se


def hutchinson(
    matvec: Matvec,
    dim: int,
    num_probes: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(A)``; ``matvec`` maps a ``dim x k`` matrix to ``A`` times
    it."""
    _check(dim, num_probes, 1)
    z = rademacher(dim, num_probes, generator, dtype, device)
    values = (z * matvec(z)).sum(0)
    mean, se = _mean_se(values.double())
    return TraceEstimate(mean, se, num_probes, "hutchinson")


def hutchpp(
    matvec: Matvec,
    dim: int,
    num_probes: int,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(A)`` for PSD ``A`` from ``num_probes`` products: ``s =
    num_probes // 3`` for the sketch, ``s`` for its exact trace, the rest for Hutchinson on
    the deflated remainder."""
    _check(dim, num_probes, 3)
    s = num_probes // 3
    g = num_probes - 2 * s
    sketch = rademacher(dim, s, generator, dtype, device)
    q, _ = torch.linalg.qr(matvec(sketch))
    top = float(torch.trace(q.T @ matvec(q)))
    z = rademacher(dim, g, generator, dtype, device)
    z = z - q @ (q.T @ z)
    mean, se = _mean_se((z * matvec(z)).sum(0).double())
    return TraceEstimate(top + mean, se, num_probes, "hutch++")


def entk_trace(
    model: nn.Module,
    x: Tensor,
    num_probes: int = 30,
    method: str = "hutch++",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """``tr(K)`` of the ENTK on ``x`` without forming ``J`` or ``K`` (the full and the trace
    kernel have the same trace; the full operator needs one product per probe)."""
    estimators = {"hutchinson": hutchinson, "hutch++": hutchpp}
    if method not in estimators:
        raise ValueError(f"method must be one of {tuple(estimators)}, got {method!r}")
    mv = entk_matvec(model, x, "full", chunk_size)
    p = next(iter(trainable_params(model).values()))
    with torch.no_grad():
        dim = len(x) * model(x[:1].to(p.device)).numel()
    return estimators[method](mv, dim, num_probes, generator, p.dtype, p.device)
