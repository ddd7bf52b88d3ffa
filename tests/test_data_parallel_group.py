"""Which ranks an optimizer talks to, and what its plain state_dict holds (real gloo ranks).

Each test here reproduced a defect on b673a1b (issue 12, points 1 and 2): a collective in the
constructor, every initialised process group taken for DDP, a partial state_dict under DDP.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_mlp
from distributed_utils import run_distributed
from torch.nn.parallel import DistributedDataParallel as DDP

from snr_dist import SNRAdamW, fsdp

KINDS = [
    dict(estimator="temporal", mode="diagonal"),
    dict(estimator="temporal", mode="subspace", rank=3, refresh_every=3),
    dict(estimator="cross_sample", mode="diagonal"),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=3),
]


def _ids(kw):
    return f"{kw['estimator']}-{kw['mode']}"


def _data(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _local_optimizer_on_one_rank(rank: int, world: int, kw: dict):
    """Rank 0 trains a reference model of its own; rank 1 waits at the barrier. A collective
    in the constructor or the step would pair with rank 1's barrier and break both."""
    if rank == 0:
        model = tiny_mlp()
        # cross-sample pools ranks' gradients: under several ranks it must be told that this
        # optimizer is rank-local (with no process_group it asks, see the test below)
        local = {"process_group": None} if kw["estimator"] == "cross_sample" else {}
        opt = SNRAdamW(model.parameters(), lr=1e-2, **kw, **local)
        for step in range(4):
            x, y = _data(step)
            opt.zero_grad()
            for half in (slice(0, 8), slice(8, 16)):
                torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
            opt.step()
        sd = opt.state_dict()
        assert opt.distributor.world == 1
        time.sleep(0.5)
    dist.barrier()
    return rank == 0 and len(sd["state"]) == 4


@pytest.mark.parametrize("kw", KINDS, ids=_ids)
def test_an_optimizer_on_one_rank_never_talks_to_the_others(kw):
    assert run_distributed(_local_optimizer_on_one_rank, 2, kw, timeout=60) == [True, False]


def _pipeline_stage(rank: int, world: int):
    """Pipeline-parallel stages: different parameters on each rank, default arguments."""
    torch.manual_seed(rank)
    widths = [(12, 24), (24, 5)] if rank == 0 else [(12, 7), (7, 9), (9, 5)]
    model = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in widths])
    opt = SNRAdamW(model.parameters(), lr=1e-2, mode="subspace", rank=3, refresh_every=2)
    for step in range(5):
        x, _ = _data(step)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return len(opt.state_dict()["state"])


def test_pipeline_stages_with_different_parameters_per_rank_work():
    assert run_distributed(_pipeline_stage, 2) == [4, 6]


K, TOTAL = 4, 9


def _ddp_optimizer(model, kw, group=None):
    # cross-sample combines every rank's gradient: it is told its data-parallel group
    if group is None:
        group = dist.group.WORLD if kw["estimator"] == "cross_sample" else "auto"
    return SNRAdamW(model.parameters(), lr=1e-2, process_group=group, **kw)


def _train(ddp, opt, start, stop, rank):
    half = slice(rank * 8, (rank + 1) * 8)
    for step in range(start, stop):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()
        opt.step()


def _rank0_save_everyone_loads(rank: int, world: int, kw: dict, path: str):
    model = tiny_mlp()
    ddp, opt = DDP(model), None
    opt = _ddp_optimizer(model, kw)
    _train(ddp, opt, 0, TOTAL, rank)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = tiny_mlp()
    ddp = DDP(model)
    opt = _ddp_optimizer(model, kw)
    _train(ddp, opt, 0, K, rank)
    if rank == 0:  # the everyday pattern
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()

    model = tiny_mlp(seed=7)  # different weights: everything must come from the file
    ddp = DDP(model)
    opt = _ddp_optimizer(model, kw)
    ckpt = torch.load(path, weights_only=False)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optim"])
    _train(ddp, opt, K, TOTAL, rank)
    return max(
        (p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), uninterrupted)
    )


@pytest.mark.parametrize("kw", KINDS, ids=_ids)
def test_rank0_torch_save_of_state_dict_resumes_under_ddp(kw, tmp_path):
    diffs = run_distributed(_rank0_save_everyone_loads, 2, kw, str(tmp_path / "ckpt.pt"))
    assert max(diffs) <= 1e-6, diffs


def _fsdp_state_dict(rank: int, world: int, kw: dict):
    model, opt = fsdp.wrap(tiny_mlp(), lr=1e-2, **kw)
    x, y = _data(0)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[rank::2]), y[rank::2]).backward()
    opt.step()
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()  # every rank calls it, as FSDP2 save paths do
    exp_avg = sd["state"][0]["exp_avg"]
    plain = {  # everything but DTensors: identical on every rank
        (i, k): v.clone()
        for i, st in sd["state"].items()
        for k, v in st.items()
        if type(v) is torch.Tensor
    }
    return isinstance(exp_avg, DTensor) and tuple(exp_avg.shape) == (24, 12), plain


def _fsdp_preconditioner_state_dict(rank: int, world: int):
    """SNRPreconditioner around torch's AdamW on an FSDP2 model, subspace trackers: its
    ``state_dict()`` raised there until 34.9; its SNR state's plain tensors, per rank."""
    from torch.distributed.fsdp import fully_shard

    from snr_dist import SNRPreconditioner

    model = tiny_mlp()
    fully_shard(model)
    opt = SNRPreconditioner(torch.optim.AdamW(model.parameters(), lr=1e-2), mode="subspace", rank=3)
    x, y = _data(0)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[rank::2]), y[rank::2]).backward()
    opt.step()
    sd = opt.state_dict()
    return {
        (i, k): v.clone()
        for i, st in sd["snr"]["state"].items()
        for k, v in st.items()
        if type(v) is torch.Tensor
    }


def test_fsdp2_preconditioner_state_dict_is_complete_on_every_rank():
    plain0, plain1 = run_distributed(_fsdp_preconditioner_state_dict, 2)
    assert (0, "sketch") in plain0 and plain0.keys() == plain1.keys()
    for k in plain0:
        assert torch.equal(plain0[k], plain1[k]), k


def test_fsdp2_state_dict_is_complete_on_every_rank():
    """DTensors with the global shape, as torch's AdamW, for sharded state; a subspace
    tracker's partial sums over rows (it raised before 34.9) come back summed, the same tensor
    on every rank."""
    for kw in (dict(mode="diagonal"), dict(mode="subspace", rank=3)):
        (ok0, plain0), (ok1, plain1) = run_distributed(_fsdp_state_dict, 2, kw)
        assert ok0 and ok1  # DTensors with the global shape
        assert plain0.keys() == plain1.keys()
        if kw["mode"] == "subspace":
            assert (0, "sketch") in plain0  # a tracker's sketch: a partial sum on each rank
        for k in plain0:
            assert torch.equal(plain0[k], plain1[k]), k


def _mismatch(rank: int, world: int):
    model = tiny_mlp()
    ddp = DDP(model)
    opt = SNRAdamW(
        model.parameters(), tau=1.0 + rank, mode="subspace", process_group=dist.group.WORLD
    )
    x, y = _data(0)
    torch.nn.functional.cross_entropy(ddp(x[rank::2]), y[rank::2]).backward()
    try:
        opt.step()
    except ValueError as e:
        return str(e)
    return None


def test_mismatched_options_across_ranks_fail_at_the_first_step_not_in_the_constructor():
    for msg in run_distributed(_mismatch, 2):
        assert msg is not None and "differs across data-parallel ranks" in msg and "tau" in msg


def test_cross_sample_under_an_ambiguous_process_group_asks_for_one():
    """Several ranks, plain parameters, no process_group: cross-sample cannot know which
    ranks hold the same model, and says how to tell it."""
    assert run_distributed(_ambiguous, 2) == ["process_group"] * 2


def _ambiguous(rank: int, world: int):
    try:
        SNRAdamW(tiny_mlp().parameters(), estimator="cross_sample")
    except ValueError as e:
        assert "process_group=None" in str(e) and "dist.group.WORLD" in str(e), str(e)
        return "process_group"
    return None


def _replica_state(rank: int, world: int, kw: dict):
    model = tiny_mlp()
    ddp = DDP(model)
    opt = _ddp_optimizer(model, kw, dist.group.WORLD)
    _train(ddp, opt, 0, TOTAL, rank)  # refreshes at steps 1, 2, 3, 4, 6, 8, 9
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()]


@pytest.mark.parametrize("kw", KINDS[1::2], ids=_ids)
def test_ddp_replicas_keep_bit_identical_optimizer_state(kw):
    """Each tracker's owner solves its refresh and broadcasts it; every rank then applies the
    same tensors in the same memory layout, so the replicas' states never drift apart."""
    a, b = run_distributed(_replica_state, 2, kw)
    for sa, sb in zip(a, b):
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
