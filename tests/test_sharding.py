"""Tracker ownership: longest-job-first assignment, balance on the benchmark GPT."""

from __future__ import annotations

import pytest
import torch

from snr_dist import SNRAdamW
from snr_dist.distributors import assign_owners, balance_ratio
from snr_dist.experiments.models import GPT


def test_assignment_is_deterministic_and_gives_each_job_one_owner():
    costs = [5.0, 3.0, 3.0, 2.0, 2.0, 1.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    assert len(owners) == len(costs) and set(owners) <= {0, 1}
    # LPT: 5->0, 3->1, 3->1, 2->0 (5<6), 2->1 (7>6), 1->0: loads 8 and 8
    assert owners == [0, 1, 1, 0, 1, 0]
    assert balance_ratio(costs, owners, 2) == 1.0
    assert assign_owners(costs, 1) == [0] * 6
    with pytest.raises(ValueError, match="world"):
        assign_owners(costs, 0)


@pytest.mark.parametrize("world", [2, 4])
def test_trackers_are_balanced_on_the_benchmark_gpt(world):
    model = GPT(vocab=256, seq=128, d_model=256, n_layers=4, n_heads=4)
    opt = SNRAdamW(model.parameters(), mode="subspace", rank=32)
    costs = list(opt.distributor.costs.values())
    assert len(costs) == 19  # 2 embeddings, 4 x 4 block matrices, the head
    owners = assign_owners(costs, world)
    assert balance_ratio(costs, owners, world) <= 1.25
    # cost = m * n * r for every tracked matrix
    first = next(iter(opt.distributor.costs))
    assert opt.distributor.costs[first] == first.numel() * 32
    assert torch.is_tensor(first)
