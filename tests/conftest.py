"""Shared helpers: tiny deterministic models and training loops used across the tests."""

from __future__ import annotations

import copy
import os

# Triton decides at decoration time whether its kernels run in the CPU interpreter, so this
# must happen before any test module imports the kernels (a value set by the caller wins).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Inductor (kernels="compile") compiles C++ in a pool of worker processes by default; on the
# 2-core CI machine, beside two pytest workers and their spawned ranks, that oversubscribes the
# cores: compile in-process (the setting is read when Inductor first compiles; spawned ranks
# inherit it).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def tiny_mlp(seed: int = 0, d_in: int = 12, hidden: int = 24, d_out: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
    )


def batches(
    n_steps: int, micro: int = 1, batch: int = 16, d_in: int = 12, d_out: int = 5, seed: int = 1
):
    """Deterministic list of steps, each a list of ``micro`` (x, y) micro-batches."""
    g = torch.Generator().manual_seed(seed)
    return [
        [
            (torch.randn(batch, d_in, generator=g), torch.randint(0, d_out, (batch,), generator=g))
            for _ in range(micro)
        ]
        for _ in range(n_steps)
    ]


def run(model, opt, data, scheduler=None):
    """Plain gradient-accumulation loop: mean loss over micro-batches."""
    for step in data:
        opt.zero_grad(set_to_none=True)
        for x, y in step:
            loss = torch.nn.functional.cross_entropy(model(x), y) / len(step)
            loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return model


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture
def clone():
    return copy.deepcopy
