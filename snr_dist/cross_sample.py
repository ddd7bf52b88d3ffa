"""Cross-sample statistics: sums over the micro-batch gradients seen between two steps.

Each backward pass through a parameter hands its gradient contribution ``d_i`` to a tensor hook
*before* it is accumulated into ``p.grad`` (and, under DDP, before the data-parallel reduction).
`MicrobatchStats` keeps the running sums that `snr_dist.snr.cross_sample_moments`
needs; in subspace mode only their projections onto the basis (``r x o`` and ``r x r``) and two
scalars are kept, which is what makes a cross-rank all-reduce of them cheap.

Units. Statistics describe the weighted mean gradient ``G = sum_i d_i / W``. If ``p.grad`` is
rescaled between the last backward and ``step()`` (loss-scale unscaling, gradient clipping),
they are rescaled by ``||p.grad|| / ||sum_i d_i||`` too, so the EMAs stay consistent across
steps whatever the loss scale of each step was.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist import snr as rule
from snr_dist.subspace import matrix_view, squared_norm


class MicrobatchStats:
    """Running sums for one parameter: ``M``, ``W = sum w_i`` and the moment sums."""

    def __init__(self) -> None:
        self.count = 0
        self.weight = 0.0
        self.total: Tensor | None = None  # diagonal: sum d_i
        self.sum_sq: Tensor | None = None  # diagonal: sum d_i^2 / w_i; subspace: scalar
        self.proj_sum: Tensor | None = None  # subspace: sum Q^T d_i
        self.proj_sq: Tensor | None = None  # subspace: sum (Q^T d_i)(Q^T d_i)^T / w_i
        self.total_sq: Tensor | None = None  # subspace: ||sum d_i||^2

    @torch.no_grad()
    def observe(self, d: Tensor, w: float, prev_grad: Tensor | None, tracker: dict | None) -> None:
        """Add one micro-batch contribution ``d`` of weight ``w``.

        ``prev_grad`` is ``p.grad`` before ``d`` is accumulated into it (the running sum, in the
        same units), used in subspace mode to track ``||sum d_i||^2`` without a full buffer.
        """
        d = d.detach().float()
        self.count += 1
        self.weight += w
        if tracker is None:
            if self.total is None:
                self.total = d.clone()
                self.sum_sq = d.square().div_(w)
            else:
                self.total.add_(d)
                self.sum_sq.addcmul_(d, d, value=1.0 / w)
            return
        p = tracker["basis"].T @ matrix_view(d, bool(tracker["basis_rows"]))
        d_sq = squared_norm(d)
        cross = (
            2.0 * torch.dot(prev_grad.detach().float().reshape(-1), d.reshape(-1))
            if (prev_grad is not None and self.count > 1)
            else torch.zeros((), device=d.device)
        )
        if self.proj_sum is None:
            self.proj_sum = p
            self.proj_sq = (p @ p.T).div_(w)
            self.sum_sq = d_sq / w
            self.total_sq = d_sq + cross
        else:
            self.proj_sum.add_(p)
            self.proj_sq.addmm_(p, p.T, alpha=1.0 / w)
            self.sum_sq.add_(d_sq / w)
            self.total_sq.add_(d_sq + cross)

    def _unit_scale(self, grad: Tensor, total_sq: Tensor) -> Tensor:
        """``c^2`` such that (hook units) / c^2 = ``p.grad`` units."""
        g_sq = grad.float().square().sum()
        ok = (g_sq > 0) & (total_sq > 0)
        return torch.where(ok, total_sq / torch.where(ok, g_sq, 1.0), torch.ones_like(g_sq))

    def diagonal_moments(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Per-coordinate ``(raw, var)`` of this step's applied gradient."""
        raw, var = rule.cross_sample_moments(self.total, self.sum_sq, self.weight, self.count)
        scale = self._unit_scale(grad, self.total.square().sum())
        return raw.div_(scale), var.div_(scale)

    def subspace_moments(self, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(raw_cov, noise_cov, raw_energy, noise_energy)`` of this step in the basis."""
        if self.count < 2:
            raise ValueError(
                f"the cross-sample estimator needs >= 2 micro-batches, got {self.count}"
            )
        w, m = self.weight, self.count
        outer = self.proj_sum @ self.proj_sum.T
        raw_cov = outer / (w * w)
        noise_cov = (self.proj_sq - outer / w) / ((m - 1) * w)
        raw_energy = self.total_sq / (w * w)
        noise_energy = ((self.sum_sq - self.total_sq / w) / ((m - 1) * w)).clamp(min=0.0)
        scale = self._unit_scale(grad, self.total_sq)
        return raw_cov / scale, noise_cov / scale, raw_energy / scale, noise_energy / scale
