"""Where the targets live in the ENTK's eigenbasis: the signal channel and the reservoir.

Project target vectors onto the kernel's eigenvectors (descending eigenvalues) and
accumulate their energy: the clean targets (one-hot, one column per class) and the label
noise (noisy one-hot minus clean one-hot). Gradient descent on a squared loss fits the
component along eigenvector ``u_k`` at rate ``~ lambda_k``, so if clean targets concentrate in
the top eigenspace while noise spreads into the low-eigenvalue "reservoir", signal is learnt
fast and noise slowly. The summary numbers:

- ``k90``: the smallest ``k`` whose top-``k`` eigenvectors hold 90% of the clean energy (the
  signal channel's dimension);
- ``reservoir_share``: the noise energy *outside* that top-``k90`` space;
- ``random_share = 1 - k90 / N``: what a uniformly random direction would have outside; a
  reservoir share above it means noise avoids the signal channel.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from snr_dist.entk.kernel import eigh_desc, entk
from snr_dist.entk.nystrom import nystrom_entk

_TOL = 1e-9  # cumulative fractions are compared with this slack (rounding in the sums)


@dataclass(frozen=True)
class TargetSpectrum:
    """Target energy along the kernel's eigenvectors; ``to_dict()`` is JSON-ready."""

    dim: int  # N, the dimension of the space (n, or n*C for a full kernel)
    num_eigvecs: int  # eigenvectors used (N, or the Nystrom rank)
    threshold: float  # the clean-energy fraction that defines k90 (0.9)
    clean_energy: float  # ||Y_clean||_F^2
    noise_energy: float  # ||Y_noisy - Y_clean||_F^2 (0 without noise)
    clean_cumulative: list[float]  # [k-1]: clean energy fraction in the top-k eigenvectors
    noise_cumulative: list[float] | None  # same for the noise; None when there is no noise
    k90: int | None  # None: the eigenvectors given hold less than `threshold` of the energy
    clean_outside: float | None  # clean energy fraction outside the top-k90 space
    reservoir_share: float | None  # noise energy fraction outside the top-k90 space
    random_share: float | None  # 1 - k90 / dim
    noise_k90: int | None  # the same dimension count for the noise
    eigvals: list[float] | None = None  # descending, when given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _first_reaching(cum: Tensor, threshold: float) -> int | None:
    hit = (cum >= threshold - _TOL).nonzero()
    return int(hit[0]) + 1 if len(hit) else None


def _as_columns(y: Tensor, dim: int) -> Tensor:
    """Targets as ``dim x m`` columns: ``(n, C)`` one-hot per class column, or flattened
    ``(n*C,)`` to match a full kernel's ``i*C + c`` layout."""
    if y.ndim == 1:
        y = y.unsqueeze(1)
    if y.shape[0] == dim:
        return y.reshape(dim, -1)
    if y.numel() == dim:
        return y.reshape(dim, 1)
    raise ValueError(
        f"targets of shape {tuple(y.shape)} do not fit eigenvectors of dimension {dim} "
        "(expected (n, C) with n = dim, or n*C = dim entries for a full kernel)"
    )


def target_spectrum(
    eigvecs: Tensor,
    y_clean: Tensor,
    y_noisy: Tensor | None = None,
    eigvals: Tensor | None = None,
    threshold: float = 0.9,
) -> TargetSpectrum:
    """Energy curves, ``k90`` and reservoir share of the targets in the basis ``eigvecs``.

    Args:
        eigvecs: ``N x r`` orthonormal columns sorted by descending eigenvalue (`eigh_desc`;
            ``r < N`` for a truncated basis such as Nystrom's: fractions stay relative to the
            *total* energy, so the curves may end below 1).
        y_clean: clean one-hot targets, ``(n, C)`` (trace kernel, ``N = n``) or ``n*C``
            entries (full kernel, ``N = n*C``).
        y_noisy: noisy one-hot targets of the same shape; the noise is ``y_noisy - y_clean``.
        eigvals: optional eigenvalues to carry into the result.
        threshold: the clean-energy fraction defining ``k90``.
    """
    if eigvecs.ndim != 2 or eigvecs.shape[1] > eigvecs.shape[0]:
        raise ValueError(f"eigvecs must be N x r with r <= N, got {tuple(eigvecs.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    dim, r = eigvecs.shape
    u = eigvecs.to(torch.float64)

    def curve(y: Tensor) -> tuple[float, Tensor | None]:
        cols = _as_columns(y.to(u), dim)
        total = float((cols * cols).sum())
        if total == 0.0:
            return 0.0, None
        energy = ((u.T @ cols) ** 2).sum(1)
        return total, energy.cumsum(0) / total

    clean_total, clean_cum = curve(y_clean)
    if clean_cum is None:
        raise ValueError("the clean targets are all zero")
    noise_total, noise_cum = 0.0, None
    if y_noisy is not None:
        if y_noisy.shape != y_clean.shape:
            raise ValueError(
                f"y_noisy {tuple(y_noisy.shape)} and y_clean {tuple(y_clean.shape)} differ"
            )
        noise_total, noise_cum = curve(y_noisy.to(torch.float64) - y_clean.to(torch.float64))
    k90 = _first_reaching(clean_cum, threshold)
    inside = lambda cum: float(cum[k90 - 1]) if k90 is not None else math.nan  # noqa: E731
    clean_outside = 1.0 - inside(clean_cum) if k90 is not None else None
    reservoir = 1.0 - inside(noise_cum) if (k90 is not None and noise_cum is not None) else None
    return TargetSpectrum(
        dim=dim,
        num_eigvecs=r,
        threshold=threshold,
        clean_energy=clean_total,
        noise_energy=noise_total,
        clean_cumulative=clean_cum.tolist(),
        noise_cumulative=noise_cum.tolist() if noise_cum is not None else None,
        k90=k90,
        clean_outside=clean_outside,
        reservoir_share=reservoir,
        random_share=1.0 - k90 / dim if k90 is not None else None,
        noise_k90=_first_reaching(noise_cum, threshold) if noise_cum is not None else None,
        eigvals=eigvals.tolist() if eigvals is not None else None,
    )


def _one_hot(y: Tensor, num_classes: int | None, name: str) -> Tensor:
    if y.ndim == 2:
        return y.to(torch.float64)
    if y.ndim == 1 and not y.is_floating_point():
        if num_classes is None:
            raise ValueError(f"{name}: class indices need num_classes")
        return torch.nn.functional.one_hot(y.long(), num_classes).to(torch.float64)
    raise ValueError(f"{name} must be (n, C) one-hot or (n,) class indices, got {tuple(y.shape)}")


def record(
    model: nn.Module,
    x: Tensor,
    y_clean_onehot: Tensor,
    y_noisy_onehot: Tensor | None = None,
    *,
    kernel: str = "exact",
    mode: str = "trace",
    landmarks: int | Tensor = 64,
    chunk_size: int | None = 64,
    generator: torch.Generator | None = None,
    threshold: float = 0.9,
    top_eigvals: int = 20,
) -> dict[str, Any]:
    """ENTK of ``model`` on ``x`` -> eigenbasis -> target spectrum, as a JSON-ready dict.

    The model is evaluated in eval mode (restored afterwards). ``kernel="exact"`` builds the
    whole kernel (`entk`; eigenvectors of its range, numerically zero eigenvalues dropped);
    ``"nystrom"`` uses ``landmarks`` (`nystrom_entk`, eigenvectors truncated to its rank).
    ``mode``: ``"trace"`` (``n x n``, targets per class column) or ``"full"`` (``n*C x n*C``,
    targets flattened). The dict is `TargetSpectrum.to_dict()`
    (with ``eigvals`` cut to the top ``top_eigvals``) plus ``trace`` (``tr K``),
    ``kernel``, ``mode``, ``n`` and ``seconds``.
    """
    if kernel not in ("exact", "nystrom"):
        raise ValueError(f"kernel must be 'exact' or 'nystrom', got {kernel!r}")
    if mode not in ("trace", "full"):
        raise ValueError(f"mode must be 'trace' or 'full', got {mode!r}")
    if y_clean_onehot.ndim != 2 or len(y_clean_onehot) != len(x):
        raise ValueError(
            f"y_clean_onehot must be (n, C) with n = len(x) = {len(x)}, "
            f"got {tuple(y_clean_onehot.shape)}"
        )
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        if kernel == "exact":
            k = entk(model, x, mode=mode, chunk_size=chunk_size)
            vals, vecs = eigh_desc(k)
            trace = float(vals.sum())
            # the kernel's range only, as the Nystrom factor's rank cut keeps: the eigenvectors
            # of numerically zero eigenvalues are an arbitrary basis of the null space, and a
            # target partly outside the range would rank them by rounding noise
            rtol = len(vals) * torch.finfo(vals.dtype).eps
            keep = vals > rtol * vals[0].clamp_min(0)
            vals, vecs = vals[keep], vecs[:, keep]
        else:
            ny = nystrom_entk(model, x, landmarks, mode, generator, chunk_size)
            vals, vecs = ny.eigh()
            trace = float(entk(model, x, mode="diagonal", chunk_size=chunk_size).sum())
    finally:
        model.train(was_training)
    y_clean = y_clean_onehot.to(torch.float64).cpu()
    y_noisy = y_noisy_onehot.to(torch.float64).cpu() if y_noisy_onehot is not None else None
    spec = target_spectrum(vecs.cpu(), y_clean, y_noisy, threshold=threshold)
    out = spec.to_dict()
    out["eigvals"] = vals[:top_eigvals].cpu().tolist()
    out.update(trace=trace, kernel=kernel, mode=mode, n=len(x))
    out["seconds"] = time.perf_counter() - t0
    return out


@dataclass(eq=False)  # holds tensors: compare callbacks by identity
class ENTKCallback:
    """Records the target spectrum on a fixed subset of training points during training.

    Build it once with the training set; call ``cb.record(model, epoch=e)`` every few epochs.
    The subset (``n_points``, drawn with ``seed``) and the landmarks are fixed at
    construction, so records are comparable over time. ``history`` holds every record.
    """

    x: Tensor
    y_clean: Tensor  # (N,) class indices or (N, C) one-hot
    y_noisy: Tensor | None = None
    num_classes: int | None = None
    n_points: int = 200
    seed: int = 0
    kernel: str = "exact"
    mode: str = "trace"
    landmarks: int = 64
    chunk_size: int | None = 64
    threshold: float = 0.9
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_points < 1:
            raise ValueError(f"n_points must be >= 1, got {self.n_points}")
        n = min(self.n_points, len(self.x))
        g = torch.Generator().manual_seed(self.seed)
        self.indices = torch.randperm(len(self.x), generator=g)[:n].sort().values
        clean = _one_hot(self.y_clean, self.num_classes, "y_clean")
        self._x = self.x[self.indices]
        self._clean = clean[self.indices]
        self._noisy = None
        if self.y_noisy is not None:
            noisy = _one_hot(self.y_noisy, self.num_classes or clean.shape[1], "y_noisy")
            self._noisy = noisy[self.indices]
        self._landmarks = None
        if self.kernel == "nystrom":
            m = min(self.landmarks, n)
            self._landmarks = torch.randperm(n, generator=g)[:m].sort().values

    def record(self, model: nn.Module, **extra: Any) -> dict[str, Any]:
        """Compute one record (see `record`), add ``extra`` (e.g. ``epoch=3``), keep it."""
        rec = record(
            model,
            self._x,
            self._clean,
            self._noisy,
            kernel=self.kernel,
            mode=self.mode,
            landmarks=self._landmarks if self._landmarks is not None else self.landmarks,
            chunk_size=self.chunk_size,
            threshold=self.threshold,
        )
        rec = {**extra, **rec}
        self.history.append(rec)
        return rec

    __call__ = record

    @staticmethod
    def summary(rec: dict[str, Any]) -> str:
        """One line for logs."""

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        head = " ".join(f"{k}={rec[k]}" for k in ("epoch", "step") if k in rec)
        return (
            f"{head + ': ' if head else ''}k90={rec['k90']}/{rec['dim']} "
            f"reservoir share={fmt(rec['reservoir_share'])} "
            f"(random {fmt(rec['random_share'])}) tr(K)={rec['trace']:.4g} "
            f"[{rec['seconds']:.1f}s]"
        )
