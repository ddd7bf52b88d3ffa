"""DistributedDataParallel with real gloo processes: parity, sharding, global SNR, errors."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_mlp
from distributed_utils import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from snr_dist import SNRAdamW

STEPS = 10
MODES = [
    dict(estimator="temporal", mode="diagonal"),
    dict(estimator="temporal", mode="subspace", rank=3, refresh_every=4),
    dict(estimator="cross_sample", mode="diagonal"),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=4),
]


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _single_process(kw: dict, steps: int = STEPS) -> list[torch.Tensor]:
    """The reference: one process, the same global batch as 2 micro-batches."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **kw)
    for step in range(steps):
        x, y = _data(step)
        opt.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            (torch.nn.functional.cross_entropy(model(x[half]), y[half]) / 2).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ddp_worker(rank: int, world: int, kw: dict, group: str = "world"):
    model = tiny_mlp()
    ddp = DDP(model)
    pg = dist.group.WORLD if group == "world" else "auto"
    opt = SNRAdamW(model.parameters(), lr=1e-2, process_group=pg, **kw)
    half = slice(rank * 8, (rank + 1) * 8)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
        opt.step()
    distributor = opt.distributor
    bases = {
        i: opt.state[p]["basis"].clone()
        for i, p in enumerate(model.parameters())
        if "basis" in opt.state[p]
    }
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "owners": [distributor.owners.get(p) for p in model.parameters()],
        "bases": bases,
        "comm": dict(distributor.comm.bytes),
        "calls": dict(distributor.comm.calls),
        "metrics": opt.metrics()["parallel"],
    }


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['estimator']}-{kw['mode']}")
def test_ddp_two_ranks_equal_one_process_with_two_microbatches(kw):
    ranks = run_distributed(_ddp_worker, 2, kw)
    ref = _single_process(kw)
    for out in ranks:
        for p, q in zip(out["params"], ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    if kw["mode"] == "subspace":
        # every tracker has exactly one owner, the same on every rank
        assert ranks[0]["owners"] == ranks[1]["owners"]
        owners = [o for o in ranks[0]["owners"] if o is not None]
        assert sorted(owners) == [0, 1]
        # bases are identical on all ranks after the refreshes
        for i, q in ranks[0]["bases"].items():
            assert torch.equal(q, ranks[1]["bases"][i])
        if kw["estimator"] == "cross_sample":
            # the per-step all-reduce carries O(rank) floats per tracked matrix
            per_step = (2 + 1 + 3) * 2 * 4  # count, weight, total energy, r directions
            per_step += (2 + 24 + 2 + 5) * 4  # the two biases: diagonal cross-sample sums
            assert ranks[0]["comm"]["all_reduce"] == STEPS * per_step
            assert ranks[0]["calls"]["all_reduce"] == STEPS  # one bucketed all-reduce per step
        else:
            # every rank keeps complete statistics of the same reduced gradient: no per-step
            # all-reduce; each tracker's owner solves its refreshes and broadcasts the basis
            assert ranks[0]["comm"].get("all_reduce", 0) == 0
            assert ranks[0]["comm"]["broadcast"] > 0
        assert sum(m["trackers_owned"] for m in (r["metrics"] for r in ranks)) == 2
    if kw == MODES[0]:
        assert ranks[0]["comm"].get("all_reduce", 0) == 0  # diagonal temporal adds nothing


@pytest.mark.parametrize("kw", MODES[:2], ids=lambda kw: kw["mode"])
def test_ddp_one_liner_without_a_group_equals_one_process(kw):
    """``SNRAdamW(model.parameters())`` under DDP, no process_group: every rank computes the
    same statistics from the same reduced gradient, without talking to the others."""
    ranks = run_distributed(_ddp_worker, 2, kw, "auto")
    ref = _single_process(kw)
    for out in ranks:
        assert out["metrics"]["mode"] == "local" and not out["comm"]
        for p, q in zip(out["params"], ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def _single_microbatch_per_rank_is_enough(rank: int, world: int):
    model = tiny_mlp()
    ddp = DDP(model)
    opt = SNRAdamW(model.parameters(), estimator="cross_sample", process_group=dist.group.WORLD)
    x, y = _data(0)
    torch.nn.functional.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
    opt.step()  # 2 ranks x 1 micro-batch = 2 contributions
    dist.barrier()
    return int(opt.state[model[0].weight]["step"])


def test_cross_sample_counts_microbatches_across_ranks():
    assert run_distributed(_single_microbatch_per_rank_is_enough, 2) == [1, 1]


def _wrapper_worker(rank: int, world: int, single: bool):
    from snr_dist import SNRPreconditioner

    model = tiny_mlp()
    shell = model if single else DDP(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = SNRPreconditioner(
        base, mode="subspace", rank=3, refresh_every=4, process_group=None if single else "auto"
    )
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        if single:
            for half in (slice(0, 8), slice(8, 16)):
                (torch.nn.functional.cross_entropy(shell(x[half]), y[half]) / 2).backward()
        else:
            half = slice(rank * 8, (rank + 1) * 8)
            torch.nn.functional.cross_entropy(shell(x[half]), y[half]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_snr_preconditioner_under_ddp_equals_one_process():
    ref = _wrapper_worker(0, 1, True)
    for out in run_distributed(_wrapper_worker, 2, False):
        for p, q in zip(out, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
