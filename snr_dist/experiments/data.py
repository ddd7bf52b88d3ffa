"""Data that ships with a package: scikit-learn's 8x8 digits, with symmetric label noise.

Symmetric noise moves a chosen fraction of training labels to a *different* class, uniformly.
Memorisation is then measurable: the share of flipped examples the model predicts with their
flipped (wrong) label. The test set is never corrupted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NoisyDataset:
    x_train: Tensor
    y_train: Tensor  # labels as trained on (some flipped)
    y_train_clean: Tensor
    flipped: Tensor  # bool mask over the training set
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]


def symmetric_label_noise(
    y: Tensor, fraction: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Flip exactly ``round(fraction * n)`` labels, each to a uniformly chosen other class."""
    n = len(y)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    offset = torch.randint(1, num_classes, (n,), generator=generator)
    noisy = torch.where(flipped, (y + offset) % num_classes, y)
    return noisy, flipped


def pair_flip_label_noise(
    y: Tensor, fraction: float, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Flip exactly ``round(fraction * n)`` labels from class ``k`` to ``k + 1`` (mod classes):
    asymmetric noise whose wrong labels agree with each other, the hard case for a rule that
    reads coherence as signal (every flipped 3 says 4)."""
    n = len(y)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(fraction * n)]] = True
    noisy = torch.where(flipped, (y + 1) % num_classes, y)
    return noisy, flipped


NOISE_KINDS = {"symmetric": symmetric_label_noise, "pairflip": pair_flip_label_noise}


def parse_noise(spec: float | str) -> tuple[str, float]:
    """``0.4`` (symmetric) or ``"pairflip:0.3"`` / ``"symmetric:0.2"`` -> ``(kind, fraction)``."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        kind, fraction = "symmetric", float(spec)
    elif isinstance(spec, str) and ":" in spec:
        kind, _, value = spec.partition(":")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"label noise {spec!r}: {value!r} is not a number") from None
    else:
        raise ValueError(
            f"label noise {spec!r}: allowed: a fraction (symmetric) or 'KIND:FRACTION' with "
            f"KIND one of {sorted(NOISE_KINDS)}"
        )
    if kind not in NOISE_KINDS:
        allowed = sorted(NOISE_KINDS)
        raise ValueError(f"label noise {spec!r}: unknown kind {kind!r}; allowed: {allowed}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"label noise {spec!r}: the fraction must be in [0, 1)")
    return kind, fraction


def label_noise(
    y: Tensor, spec: float | str, num_classes: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Noisy labels and the flipped mask for a noise spec (see `parse_noise`)."""
    kind, fraction = parse_noise(spec)
    return NOISE_KINDS[kind](y, fraction, num_classes, generator)


def load_digits_noisy(label_noise: float, test_fraction: float, seed: int) -> NoisyDataset:
    """Digits (1797 images, 64 features scaled to [0, 1]) split by ``seed``, noise on train."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - the examples extra is missing
        raise ImportError(
            "the digits experiment needs scikit-learn: pip install 'snr-dist[examples]'"
        ) from e
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features / 16.0, dtype=torch.float32)
    y = torch.tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = round(test_fraction * len(x))
    test, train = perm[:n_test], perm[n_test:]
    y_noisy, flipped = symmetric_label_noise(y[train], label_noise, 10, g)
    return NoisyDataset(x[train], y_noisy, y[train], flipped, x[test], y[test], 10)
