"""The learning problems the claim experiments train on, behind one small interface.

A task holds its data (all of it fits in memory), builds a model from a seed (so every optimizer
starts from the same weights), hands out training batches in a seed-determined order (the same
order for every optimizer), and evaluates a model into a flat dict of floats.

- `DigitsTask`: scikit-learn's 8x8 digits, train / validation / test split, label noise
  (symmetric, or pair-flip ``k -> k + 1``) on train *and* validation (a practitioner's
  validation set is as noisy as the training set); the test set stays clean. ``memorised``:
  share of flipped training labels the model predicts.
- `ModularTask`: ``a + b`` or ``a / b`` mod ``p`` (the grokking task), a fraction of all pairs for
  training, the rest held out; an embedding MLP, or the grokking literature's small decoder-only
  transformer reading ``a b =`` and predicting the result at ``=``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snr_dist.experiments.data import label_noise as make_label_noise
from snr_dist.experiments.models import GPT, mlp


@dataclass
class Split:
    x: Tensor
    y: Tensor


class Task(Protocol):
    """What the study runner needs from a task (a structural type: tasks do not inherit)."""

    n_train: int

    def model(self, seed: int) -> nn.Module: ...

    def loss(self, model: nn.Module, idx: Tensor) -> Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def targets_onehot(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(clean, as-trained)`` one-hot targets of training examples ``idx``."""
        ...


def _acc_loss(out: Tensor, y: Tensor) -> tuple[float, float]:
    return float((out.argmax(1) == y).float().mean()), float(F.cross_entropy(out, y))


class DigitsTask:
    def __init__(
        self,
        label_noise: float | str,
        hidden: list[int],
        seed: int,
        activation: str = "relu",
        test_fraction: float = 0.25,
        val_fraction: float = 0.15,
    ) -> None:
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        x = torch.tensor(features / 16.0, dtype=torch.float32)
        y = torch.tensor(labels, dtype=torch.long)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g)
        n_test = round(test_fraction * len(x))
        n_val = round(val_fraction * len(x))
        test, val, train = perm[:n_test], perm[n_test : n_test + n_val], perm[n_test + n_val :]
        # a plain fraction is symmetric noise (the generator draws exactly as before);
        # "pairflip:0.3" flips k -> k + 1 (`snr_dist.experiments.data.parse_noise`)
        y_train, self.flipped = make_label_noise(y[train], label_noise, 10, g)
        y_val, _ = make_label_noise(y[val], label_noise, 10, g)
        self.train = Split(x[train], y_train)
        self.train_clean = y[train]
        self.val = Split(x[val], y_val)
        self.test = Split(x[test], y[test])
        self.hidden, self.activation = list(hidden), activation
        self.n_train = len(train)
        self.num_classes = 10

    def model(self, seed: int) -> nn.Module:
        return mlp(64, self.hidden, 10, self.activation, seed)

    def loss(self, model: nn.Module, idx: Tensor) -> Tensor:
        return F.cross_entropy(model(self.train.x[idx]), self.train.y[idx])

    def targets_onehot(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        return (
            F.one_hot(self.train_clean[idx], 10).float(),
            F.one_hot(self.train.y[idx], 10).float(),
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        out = model(self.train.x)
        pred = out.argmax(1)
        res = {"train_loss": float(F.cross_entropy(out, self.train.y))}
        res["train_acc"] = float((pred == self.train.y).float().mean())
        res["val_acc"], res["val_loss"] = _acc_loss(model(self.val.x), self.val.y)
        res["test_acc"], res["test_loss"] = _acc_loss(model(self.test.x), self.test.y)
        f = self.flipped
        res["memorised"] = float((pred[f] == self.train.y[f]).float().mean()) if f.any() else 0.0
        model.train()
        return res


class ModularMLP(nn.Module):
    """Embed ``a`` and ``b`` (one shared table), concatenate, one ReLU hidden layer, logits."""

    def __init__(self, p: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(p, embed)
        self.hidden = nn.Linear(2 * embed, hidden)
        self.out = nn.Linear(hidden, p)

    def forward(self, pairs: Tensor) -> Tensor:
        e = self.embed(pairs).flatten(1)
        return self.out(F.relu(self.hidden(e)))


class ModularTransformer(nn.Module):
    """``a b =`` as three tokens (``=`` is token ``p``), a causal decoder (`GPT`), the logits of
    the ``p`` residues at the last position."""

    def __init__(self, p: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.p = p
        self.gpt = GPT(p + 1, 3, width, layers, heads)

    def forward(self, pairs: Tensor) -> Tensor:
        eq = torch.full((pairs.shape[0], 1), self.p, dtype=pairs.dtype, device=pairs.device)
        return self.gpt(torch.cat([pairs, eq], 1))[:, -1, : self.p]


def modular_pairs(p: int, op: str) -> tuple[Tensor, Tensor]:
    """All ``(a, b)`` pairs and ``a op b mod p``; division skips ``b = 0``."""
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    if op == "add":
        return torch.stack([a, b], 1), (a + b) % p
    if op == "div":
        keep = b > 0
        a, b = a[keep], b[keep]
        inverse = torch.tensor([pow(int(v), p - 2, p) for v in range(p)])  # p prime: Fermat
        return torch.stack([a, b], 1), (a * inverse[b]) % p
    raise ValueError(f"Invalid op: {op!r}; allowed: 'add', 'div'")


class ModularTask:
    def __init__(
        self,
        p: int,
        op: str,
        train_fraction: float,
        embed: int,
        hidden: int,
        seed: int,
        model: str = "mlp",
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        pairs, y = modular_pairs(p, op)
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(y), generator=g)
        n_train = round(train_fraction * len(y))
        train, val = perm[:n_train], perm[n_train:]
        self.train = Split(pairs[train], y[train])
        self.val = Split(pairs[val], y[val])
        self.p, self.embed, self.hidden = p, embed, hidden
        self.kind, self.layers, self.heads = model, layers, heads
        self.n_train = n_train
        self.num_classes = p

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "transformer":  # width = embed
            return ModularTransformer(self.p, self.embed, self.layers, self.heads)
        return ModularMLP(self.p, self.embed, self.hidden)

    def loss(self, model: nn.Module, idx: Tensor) -> Tensor:
        return F.cross_entropy(model(self.train.x[idx]), self.train.y[idx])

    def targets_onehot(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        t = F.one_hot(self.train.y[idx], self.p).float()
        return t, t

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        res = {}
        res["train_acc"], res["train_loss"] = _acc_loss(model(self.train.x), self.train.y)
        res["val_acc"], res["val_loss"] = _acc_loss(model(self.val.x), self.val.y)
        model.train()
        return res
