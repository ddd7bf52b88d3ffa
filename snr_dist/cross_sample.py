"""Cross-sample statistics: sums over the micro-batch gradients seen between two steps.

Each backward pass through a parameter hands its gradient contribution ``d_i`` to a tensor hook
*before* it is accumulated into ``p.grad`` (and, under DDP, before the data-parallel reduction).
`MicrobatchStats` keeps the sums the noise estimate needs; the signal comes from the applied
gradient ``g = p.grad`` itself. In subspace mode only ``r + 1`` numbers per matrix are kept (the
energy of each micro-batch gradient along each basis direction, and in total), which is what
makes their all-reduce across data-parallel ranks cheap.

Estimator. With micro-batch gradients ``G_i`` of ``w_i`` samples, ``d_i = c' w_i G_i`` (the
micro-batch loss is a sum over its samples, up to a common factor) and ``S = sum_i d_i = c g``,
``sigma_e^2 = sum_i w_i (G_i - G)^2 / (M - 1)`` is unbiased for the per-sample variance. In the
units of the applied gradient ``g`` this gives, per coordinate or direction,

``raw = g^2`` (so ``k = 1``) and ``var = (W * sum_i (d_i^2 / w_i) / c^2 - g^2) / (M - 1)``,

the variance of ``g`` around its expectation. ``c`` is measured in one process
(``||S||^2`` is tracked through the hooks, so gradient clipping or loss-scale unscaling between
backward and ``step()`` is accounted for) and is the world size under data parallelism, whose
reduction averages the ranks' sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from snr_dist.grad_mode import no_grad
from snr_dist.subspace import matrix_view, project, squared_norm


class MicrobatchStats:
    """Running sums for one parameter: ``M``, ``W = sum w_i`` and the moment sums."""

    def __init__(self) -> None:
        self.count = 0
        self.weight = 0.0
        self.sum_sq: Tensor | None = None  # diagonal: sum d_i^2 / w_i; subspace: its total
        self.dir_sq: Tensor | None = None  # subspace: sum_i ||row_k(Q^T d_i)||^2 / w_i
        self.total_sq: Tensor | None = None  # ||sum_i d_i||^2 (this process's sum)

    @classmethod
    def none_seen(cls, grad: Tensor, tracker: dict | None) -> MicrobatchStats:
        """Zero sums in the layout of ``grad`` (and ``tracker``): a step that saw no
        micro-batch of a parameter still sends its part of the data-parallel sum."""
        out = cls()
        f32 = dict(dtype=torch.float32, device=grad.device)
        if tracker is None:
            out.sum_sq = torch.zeros(grad.shape, **f32)
        else:
            out.sum_sq = torch.zeros((), **f32)
            out.dir_sq = torch.zeros(tracker["basis"].shape[1], **f32)
        return out

    @no_grad
    def observe(
        self,
        d: Tensor,
        w: float,
        prev_grad: Tensor | None,
        tracker: dict | None,
        kernels: str = "torch",
    ) -> None:
        """Add one micro-batch contribution ``d`` of weight ``w``.

        ``prev_grad`` is ``p.grad`` before ``d`` is accumulated into it (the running sum, in the
        same units), used to track ``||sum d_i||^2`` without a buffer of its own. ``kernels``
        ("torch" or "triton", resolved) computes the subspace energies.
        """
        d = d.detach().float()
        self.count += 1
        self.weight += w
        d_sq = squared_norm(d)
        if prev_grad is not None and self.count > 1:
            d_sq_total = d_sq + 2.0 * torch.dot(
                prev_grad.detach().float().reshape(-1), d.reshape(-1)
            )
        else:
            d_sq_total = d_sq
        if tracker is None:
            sq = d.square().div_(w)
        else:
            dir_sq = _direction_energies(tracker, d, kernels).div_(w)
            sq = d_sq / w
            self.dir_sq = dir_sq if self.dir_sq is None else self.dir_sq.add_(dir_sq)
        self.sum_sq = sq if self.sum_sq is None else self.sum_sq.add_(sq)
        self.total_sq = d_sq_total if self.total_sq is None else self.total_sq.add_(d_sq_total)

    def to_vector(self, subspace: bool) -> Tensor:
        """``[M, W, sums...]`` as one fp32 vector: what data-parallel ranks all-reduce."""
        head = torch.tensor([float(self.count), self.weight], device=self.sum_sq.device)
        parts = [head, self.sum_sq.reshape(-1)]
        if subspace:
            parts.append(self.dir_sq)
        return torch.cat(parts)

    @classmethod
    def from_vector(cls, vec: Tensor, subspace: bool, shape) -> MicrobatchStats:
        """The inverse of `to_vector` (after a sum over ranks: global counts and sums)."""
        out = cls()
        out.count = int(round(float(vec[0])))
        out.weight = float(vec[1])
        if subspace:
            out.sum_sq, out.dir_sq = vec[2], vec[3:]
        else:
            out.sum_sq = vec[2:].reshape(shape)
        out.total_sq = None
        return out

    def unit_scale_sq(self, grad: Tensor) -> float:
        """``c^2`` with ``sum_i d_i = c * p.grad`` (one process; 1 if either is zero)."""
        if self.total_sq is None:
            return 1.0
        g_sq = float(squared_norm(grad.float()))
        t_sq = float(self.total_sq)
        return t_sq / g_sq if g_sq > 0 and t_sq > 0 else 1.0


def diagonal_moments(stats: MicrobatchStats, grad: Tensor, c_sq: float) -> tuple[Tensor, Tensor]:
    """Per-coordinate ``(raw, var)`` of the applied gradient ``grad``."""
    _check(stats)
    raw = grad.float().square()
    var = (stats.sum_sq * (stats.weight / c_sq) - raw).div_(stats.count - 1).clamp_(min=0.0)
    return raw, var


def _direction_energies(tracker: dict, g: Tensor, kernels: str) -> Tensor:
    """``||row_k(Q^T G)||^2`` per basis direction."""
    q = tracker["basis"]
    p, sq = project(q, matrix_view(g, bool(tracker["basis_rows"])), kernels)
    return p.square().sum(dim=1) if sq is None else sq


def applied_energies(grad: Tensor, tracker: dict, kernels: str = "torch") -> tuple[Tensor, Tensor]:
    """The applied gradient's energy along each basis direction and in total (``grad``: this
    rank's part; sums over rows, so partial where ranks hold rows of the matrix)."""
    g = grad.float()
    return _direction_energies(tracker, g, kernels), squared_norm(g)


def subspace_moments(
    stats: MicrobatchStats,
    grad: Tensor,
    c_sq: float,
    tracker: dict,
    kernels: str = "torch",
    energies: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(raw_dir, var_dir, raw_energy, var_energy)``: per basis direction, and in total.
    ``energies``: the applied gradient's (`applied_energies`), when summed over ranks first."""
    _check(stats)
    raw_dir, raw_e = applied_energies(grad, tracker, kernels) if energies is None else energies
    scale = stats.weight / c_sq
    m1 = stats.count - 1
    var_dir = (stats.dir_sq * scale - raw_dir).div_(m1).clamp_(min=0.0)
    var_e = ((stats.sum_sq * scale - raw_e) / m1).clamp(min=0.0)
    return raw_dir, var_dir, raw_e, var_e


def _check(stats: MicrobatchStats) -> None:
    if stats.count < 2:
        raise ValueError(f"the cross-sample estimator needs >= 2 micro-batches, got {stats.count}")
