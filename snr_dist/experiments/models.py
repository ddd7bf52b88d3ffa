"""Small models for the experiments."""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def mlp(
    d_in: int, hidden: list[int], d_out: int, activation: str = "relu", seed: int = 0
) -> nn.Sequential:
    """A plain MLP, initialised from ``seed`` so every optimizer starts from the same weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = d_in
    for h in hidden:
        layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)
