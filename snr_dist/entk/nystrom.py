"""Nystrom approximation of the ENTK from ``m`` landmark examples.

``K ~ K_nm K_mm^+ K_mn``: only the Jacobians of the ``n`` points against ``m`` landmarks are
contracted (``O(n m C P)`` instead of ``O(n^2 C P)``), and the result is kept as a factor
``F`` (``n x r``, ``r <= m``) with ``K ~ F F^T``, so eigenpairs cost a thin SVD of ``F``.
It is exact when the landmarks span the range of ``K`` (for instance ``m = n``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from snr_dist.entk.kernel import _check_inputs, entk, full_to_matrix


@dataclass
class NystromENTK:
    """A low-rank factor of the kernel: ``K ~ factor @ factor.T``."""

    factor: Tensor  # (N, r), N = n ("trace") or n*C ("full")
    landmarks: Tensor  # (m,) indices of the landmark examples among the n inputs

    def matrix(self) -> Tensor:
        """The approximated ``N x N`` kernel (for checks; ``O(N^2)`` memory)."""
        return self.factor @ self.factor.T

    def eigh(self, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Top ``k`` (default all ``r``) eigenvalues (descending) and eigenvectors of
        ``F F^T`` from the thin SVD of ``F``: ``O(N r^2)``, no ``N x N`` matrix."""
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be an int >= 1 or None (all), got {k!r}")
        u, s, _ = torch.linalg.svd(self.factor.to(torch.float64), full_matrices=False)
        k = len(s) if k is None else min(k, len(s))
        return s[:k] ** 2, u[:, :k]


def nystrom(k_nm: Tensor, landmark_rows: Tensor, rtol: float | None = None) -> Tensor:
    """Factor ``F`` with ``F F^T = K_nm K_mm^+ K_mn``, where ``K_mm = K_nm[landmark_rows]``.

    The pseudo-inverse drops eigenvalues of ``K_mm`` below ``rtol`` times the largest
    (default: ``m`` times the machine epsilon of ``k_nm``'s dtype, below which they are
    rounding noise): a landmark set with (near-)duplicate Jacobians would otherwise blow up
    the factor.
    """
    if k_nm.ndim != 2:
        raise ValueError(f"k_nm must be an (N, m) matrix, got shape {tuple(k_nm.shape)}")
    if rtol is None:
        rtol = len(landmark_rows) * torch.finfo(k_nm.dtype).eps
    k = k_nm.to(torch.float64)
    k_mm = k[landmark_rows]
    if k_mm.shape[0] != k_mm.shape[1]:
        raise ValueError(f"landmark rows select a {tuple(k_mm.shape)} block; K_mm must be square")
    vals, vecs = torch.linalg.eigh((k_mm + k_mm.T) / 2)
    keep = vals > rtol * vals.max().clamp_min(0)
    if not keep.any():
        raise ValueError("the landmark kernel K_mm is zero: the model has no gradient there")
    return k @ (vecs[:, keep] / vals[keep].sqrt())


def choose_landmarks(n: int, m: int, generator: torch.Generator | None = None) -> Tensor:
    """``m`` distinct indices out of ``n``, uniformly at random (sorted)."""
    if not 1 <= m <= n:
        raise ValueError(f"need 1 <= landmarks <= n = {n}, got {m}")
    return torch.randperm(n, generator=generator)[:m].sort().values


def nystrom_entk(
    model: nn.Module,
    x: Tensor,
    landmarks: int | Tensor,
    mode: str = "trace",
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    rtol: float | None = None,
) -> NystromENTK:
    """Nystrom ENTK on ``x`` from landmark examples.

    Args:
        landmarks: a number ``m`` (drawn uniformly without replacement with ``generator``)
            or a tensor of example indices.
        mode: ``"trace"`` (factor of the ``n x n`` kernel) or ``"full"`` (``n*C x n*C``;
            every output of a landmark example is a landmark column).
        chunk_size: as in `entk`.
        rtol: relative eigenvalue cutoff of the pseudo-inverse (see `nystrom`).
    """
    if mode not in ("trace", "full"):
        raise ValueError(f"nystrom mode must be 'trace' or 'full', got {mode!r}")
    x = _check_inputs(model, x)
    n = len(x)
    if isinstance(landmarks, (list, tuple)):
        landmarks = torch.as_tensor(landmarks)
    if isinstance(landmarks, Tensor):
        if landmarks.is_floating_point() or landmarks.is_complex() or landmarks.dtype == torch.bool:
            raise ValueError(
                f"landmark indices must be integers, got a {landmarks.dtype} tensor "
                "(a float index would be truncated)"
            )
        idx = landmarks.to(torch.long).flatten().cpu()
        if len(idx) == 0 or idx.min() < 0 or idx.max() >= n or len(idx.unique()) != len(idx):
            raise ValueError(f"landmark indices must be distinct and in [0, {n}), got {idx}")
    else:
        idx = choose_landmarks(n, int(landmarks), generator)
    k_nm = entk(model, x, x[idx.to(x.device)], mode=mode, chunk_size=chunk_size)
    if mode == "full":
        c = k_nm.shape[-1]
        rows = (idx.unsqueeze(1) * c + torch.arange(c)).reshape(-1)
        k_nm = full_to_matrix(k_nm)
    else:
        rows = idx
    return NystromENTK(nystrom(k_nm, rows.to(k_nm.device), rtol), idx)
