"""The validation-free stop (`snr_dist.stopping.StopMonitor`): known answers on synthetic
gradients, any optimizer, checkpoints, and the same reading under DDP, FSDP2 and ZeRO."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
from distributed_utils import run_distributed

from snr_dist import SNRAdamW
from snr_dist.stopping import StopMonitor, finite_dataset_snr


def _feed(shared: float, n=1000, b=100, d=2000, steps=1500, seed=0, **kw):
    """Per-example gradients ``shared * u + noise_i`` (a fixed set of ``n``), fed in
    batches drawn without replacement, epoch after epoch; the optimizer does not move."""
    g = torch.Generator().manual_seed(seed)
    examples = torch.randn(n, d, generator=g) + shared * torch.randn(d, generator=g)
    p = torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.SGD([p], lr=0.0)
    mon = StopMonitor(opt, dataset_size=n, batch_size=b, **kw)
    perm, cur = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if cur + b > n:
            perm, cur = torch.randperm(n, generator=g), 0
        p.grad = examples[perm[cur : cur + b]].mean(0)
        cur += b
        opt.step()
    return mon, examples


def test_ratio_is_one_when_examples_share_nothing_and_the_stop_fires():
    mon, _ = _feed(0.0)
    m = mon.metrics()
    assert 0.85 < m["ratio"] < 1.15, m
    assert abs(m["coherence"]) < 0.05, m
    assert m["should_stop"] and mon.stop_step is not None and mon.stop_step >= mon.min_steps


@pytest.mark.parametrize("shared", [0.03, 0.1, 0.3])
def test_ratio_follows_the_shared_signal_and_the_stop_waits(shared):
    """|mu|^2 of the fixed example set, exactly: the ratio (n - b) / B_noise within 15%."""
    mon, examples = _feed(shared)
    n, b = examples.shape[0], 100
    mu = examples.mean(0)
    trace = ((examples - mu) ** 2).sum(1).mean()  # tr(Sigma) of the population
    expected = (n - b) * float(mu.square().sum() / trace)
    m = mon.metrics()
    assert m["ratio"] == pytest.approx(expected, rel=0.15), (m, expected)
    assert not m["should_stop"] and m["ratio"] > 1.5


def test_reads_adamw_and_snradamw_alike_and_snr_metrics_include_it():
    torch.manual_seed(0)
    x, y = torch.randn(256, 8), torch.randint(0, 3, (256,))
    readings = []
    for make in (
        lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        lambda ps: SNRAdamW(ps, lr=1e-3),
    ):
        torch.manual_seed(1)
        model = torch.nn.Linear(8, 3)
        opt = make(model.parameters())
        mon = StopMonitor(opt, dataset_size=256, batch_size=32, check_every=5)
        for step in range(40):
            idx = torch.arange(step * 32, step * 32 + 32) % 256
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        readings.append(mon.metrics())
        assert mon.step == 40 and mon.metrics()["checked_at"] == 40
        if isinstance(opt, SNRAdamW):
            assert opt.metrics()["stop"] == mon.metrics()
    assert all("ratio" in r for r in readings)


def test_state_dict_resumes_the_same_readings_and_close_stops_observing():
    def train(opt, mon, steps, gen):
        p = opt.param_groups[0]["params"][0]
        for _ in range(steps):
            p.grad = torch.randn(p.shape, generator=gen) + 0.2
            opt.step()

    p = torch.nn.Parameter(torch.zeros(50))
    opt = torch.optim.SGD([p], lr=0.0)
    mon = StopMonitor(opt, dataset_size=500, batch_size=50, check_every=3, patience=6)
    gen = torch.Generator().manual_seed(0)
    train(opt, mon, 20, gen)
    saved, gen_state = copy.deepcopy(mon.state_dict()), gen.get_state()
    train(opt, mon, 30, gen)
    q = torch.nn.Parameter(torch.zeros(50))
    opt2 = torch.optim.SGD([q], lr=0.0)
    mon2 = StopMonitor(opt2, dataset_size=500, batch_size=50, check_every=3, patience=6)
    mon2.load_state_dict(saved)
    gen.set_state(gen_state)
    train(opt2, mon2, 30, gen)
    assert mon2.read() == mon.read() and mon2.metrics() == mon.metrics()
    mon.close()
    mon.close()
    before = mon.step
    opt.step()
    assert mon.step == before


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"dataset_size": 100, "batch_size": 100}, "batch_size: 100"),
        ({"dataset_size": 1, "batch_size": 1}, "dataset_size: 1"),
        ({"beta": 1.0}, "beta: 1.0"),
        ({"stride": 0}, "stride: 0"),
        ({"threshold": float("nan")}, "threshold: nan"),
        ({"patience": -1}, "patience: -1"),
        ({"rule": "above"}, "rule: 'above'"),
    ],
)
def test_bad_arguments_name_the_key_and_the_value(kw, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    args = {"dataset_size": 100, "batch_size": 10, **kw}
    with pytest.raises(ValueError, match=match):
        StopMonitor(opt, **args)


def test_stride_reads_a_subsample_with_the_same_ratio():
    full, _ = _feed(0.1, steps=800)
    sub, _ = _feed(0.1, steps=800, stride=4)
    assert sub.metrics()["ratio"] == pytest.approx(full.metrics()["ratio"], rel=0.2)
    assert next(iter(sub.means.values())).numel() == 500
    assert finite_dataset_snr(1000, 100) == pytest.approx(100 / 900)


# ------------------------------------------------------------------ distributed
N, B, D_IN, STEPS = 384, 64, 10, 24


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D_IN, generator=g), torch.randint(0, 4, (N,), generator=g)


def _model():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _batch(step: int, rank: int = 0, world: int = 1):
    idx = (torch.arange(B) + step * B) % N
    return idx.tensor_split(world)[rank]


def _one_process_reading() -> dict:
    x, y = _data()
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = StopMonitor(opt, dataset_size=N, batch_size=B, check_every=4)
    for step in range(STEPS):
        idx = _batch(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return mon.read()


def _ddp_or_fsdp(rank: int, world: int, strategy: str) -> dict:
    x, y = _data()
    model = _model()
    if strategy == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = StopMonitor(opt, dataset_size=N, batch_size=B, check_every=4)
    for step in range(STEPS):
        idx = _batch(step, rank, world)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return mon.read()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_read_what_one_process_reads(strategy):
    """Replicated gradients need no reduction (every rank reads the whole); FSDP2's shards
    are joined over the mesh: both equal the one-process reading on the global batch."""
    ref = _one_process_reading()
    ranks = run_distributed(_ddp_or_fsdp, 2, strategy)
    for r in ranks:
        for key in ("cross", "scatter", "square", "ratio"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4), (key, r, ref)


def _zero(rank: int, world: int, stage: int) -> dict:
    os.environ.update(
        DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world)
    )
    import deepspeed

    x, y = _data()
    model = _model()
    config = {
        "train_micro_batch_size_per_gpu": B // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=base, config=config)
    client = zero_opt.optimizer  # the torch optimizer over this rank's flat partitions
    mon = StopMonitor(
        client, dataset_size=N, batch_size=B, check_every=4, process_group=dist.group.WORLD
    )
    for step in range(STEPS):
        idx = _batch(step, rank, world)
        loss = torch.nn.functional.cross_entropy(engine(x[idx]), y[idx])
        engine.backward(loss)
        engine.step()
    return mon.read()


@pytest.mark.slow
def test_zero2_partitions_join_their_partial_sums():
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ref = _one_process_reading()
    ranks = run_distributed(_zero, 2, 2, timeout=300)
    for r in ranks:
        for key in ("cross", "scatter", "square", "ratio"):
            assert r[key] == pytest.approx(ref[key], rel=1e-4), (key, r, ref)
