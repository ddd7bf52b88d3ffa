"""benchmarks/scale_cost.py: its byte model equals what real optimizers hold and send.

The model predicts, from shapes alone, every state tensor SNRAdamW allocates and every
collective its distributors run; here it is held to real optimizers: in one process (state),
on two gloo ranks under DDP and DeepSpeed ZeRO (state and bytes, every rank, every step), and
against `assign_owners` on a real optimizer's trackers for the 8B model's shapes.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

from snr_dist import SNRAdamW

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def sc():
    sys.path.insert(0, str(BENCH))  # importable by name: spawned ranks unpickle its worker
    try:
        import scale_cost

        yield scale_cost
    finally:
        sys.path.remove(str(BENCH))


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )


def _one_process_cases(sc):
    sub = sc.Opt(mode="subspace", rank=24, refresh_every=4)
    return [
        sc.Opt(name="adamw"),
        sc.Opt(),
        sc.Opt(noise="second_moment"),
        sc.Opt(noise="second_moment", snr_beta=0.9),  # shares Adam's mean: no snr_avg
        sc.Opt(estimator="cross_sample"),
        sub,
        sc.Opt(mode="subspace", rank=24, basis_side="rows"),
        sc.Opt(mode="subspace", rank=24, basis_side="cols"),
        sc.Opt(mode="subspace", rank=24, noise="second_moment"),
        sc.Opt(mode="subspace", rank=24, estimator="cross_sample"),
    ]


def test_state_bytes_equal_a_real_optimizers_state(sc):
    """One process, the check model, two steps (two micro-batches each for cross-sample):
    the model's bytes per state key equal the real state's, key by key."""
    shapes = sc.llama_shapes(sc.CHECK_MODEL)
    for opt in _one_process_cases(sc):
        model, _ = sc.llama_module(sc.CHECK_MODEL)
        assert [tuple(p.shape) for p in model.parameters()] == [s for _, s in shapes]
        if opt.name == "adamw":
            optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            optim = SNRAdamW(model.parameters(), lr=1e-3, **sc._snr_kwargs(opt))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            optim.zero_grad()
            for _ in range(2):
                idx = torch.randint(0, sc.CHECK_MODEL.vocab, (2, 9), generator=gen)
                logits = model(idx[:, :-1])
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, sc.CHECK_MODEL.vocab), idx[:, 1:].reshape(-1)
                ).backward()
            optim.step()
        predicted = sc.state_bytes(sc.rank_view(shapes, sc.Setup("ddp", 1), 0, opt), opt)
        real: dict[str, int] = {}
        for st in optim.state.values():
            for k, v in st.items():
                real[k] = real.get(k, 0) + v.numel() * v.element_size()
        assert predicted == real, opt.label
        assert sum(predicted.values()) == _state_bytes(optim), opt.label


def test_bytes_and_state_equal_measured_on_two_gloo_ranks(sc):
    """DDP subspace (temporal and cross-sample), ZeRO-2 subspace (its partition cuts a row)
    and ZeRO-3 subspace cross-sample on two real ranks: every rank's state bytes and, after
    every step, the all-reduce, reduce and broadcast bytes and calls its counters hold."""
    o = sc._check_opts()
    cases = [("ddp", o["sub"]), ("ddp", o["xsub"]), ("zero2", o["sub"]), ("zero3", o["xsub"])]
    ranks = run_distributed(sc._check_worker, 2, cases, timeout=300)
    for i, (strategy, opt) in enumerate(cases):
        for rank in range(2):
            got = ranks[rank][i]
            want = sc.predict(2, rank, strategy, opt)
            assert got == want, (strategy, opt.label, rank)
        sent = sum(b for b, _ in ranks[0][i]["steps"][-1].values())
        assert sent > 0, (strategy, opt.label)  # the comparison is not of zeros
    zero2 = ranks[0][2]
    assert zero2["cut_rows"] >= 1  # the exchange of cut rows is part of what was compared
    assert ranks[0][0]["grad_bytes"] > 0


def test_lpt_balance_matches_assign_owners_on_real_shapes(sc):
    """The 8B model's matrices: the trackers' costs a real SNRAdamW computes (parameters on
    the meta device), their owners and balance under `assign_owners`, equal the model's."""
    from snr_dist.distributors import assign_owners, balance_ratio

    shapes = sc.llama_shapes(sc.MODELS["8B"])
    params = [torch.nn.Parameter(torch.empty(s, device="meta")) for _, s in shapes]
    real = list(SNRAdamW(params, mode="subspace", rank=32).distributor.costs.values())
    opt = sc.Opt(mode="subspace", rank=32)
    for world in (8, 64, 512):
        view = sc.rank_view(shapes, sc.Setup("ddp", world), 0, opt)
        assert sc.tracker_costs(view, opt) == real
        owners = sc.owners(view, opt)
        assert owners == assign_owners(real, world)
        assert balance_ratio(sc.tracker_costs(view, opt), owners, world) == pytest.approx(
            balance_ratio(real, assign_owners(real, world), world), rel=0, abs=0
        )


def test_buckets_equal_groupcomms(sc):
    """The model's bucketing against `GroupComm._buckets` with a bucket small enough to split
    (the measured models never fill 25 MiB; the big ones do)."""
    from snr_dist.distributors.comm import GroupComm

    comm = object.__new__(GroupComm)  # only its bucketing: no process group needed
    rng = random.Random(0)
    for _ in range(200):
        comm.bucket_bytes = rng.choice([16, 64, 100, 1000])
        sizes = [rng.choice([0, 1, 3, 7, 16, 40, 300]) for _ in range(rng.randint(0, 12))]
        tensors = [torch.zeros(n) for n in sizes]
        real = [
            sum(t.numel() * t.element_size() for t in b)
            for b in comm._buckets([t for t in tensors if t.numel() > 0])
        ]
        assert sc._buckets([4 * n for n in sizes], comm.bucket_bytes) == real


def test_zero_layout_invariants_and_cut_rows(sc):
    """DeepSpeed's partitions cover every element once, and the closed-form cut-row counts
    equal the definition `ZeroView` uses (a rank whose fragment starts inside a row)."""
    rng = random.Random(1)
    for _ in range(200):
        shapes = tuple(
            tuple(rng.choice([1, 2, 3, 5, 8, 13, 40, 99]) for _ in range(rng.choice([1, 2, 3])))
            for _ in range(rng.randint(1, 8))
        )
        numels = tuple(sc.numel(s) for s in shapes)
        world = rng.choice([2, 3, 4, 8, 16])
        for stage in (1, 3):
            setup = sc.Setup(f"zero{stage}", world, parameter_alignment=rng.random() < 0.5)
            frags = [sc.zero_fragments(numels, world, r, stage, setup)[0] for r in range(world)]
            for i, n in enumerate(numels):
                assert sum(f[i][1] for f in frags) == n
            defined = [
                sum(1 for f in frags if f[i][1] > 0 and f[i][0] % sc._row_len(s))
                for i, s in enumerate(shapes)
            ]
            assert sc.zero_cuts(shapes, world, stage, setup) == defined


def test_passes_are_step_floors(sc):
    """The time model's memory passes are `benchmarks/step_floor.py`'s floors."""
    import step_floor

    assert sc.PASSES["adamw"] == step_floor.PASSES["AdamW (foreach)"]
    assert sc.PASSES["snr"] == step_floor.PASSES["SNRAdamW diagonal"]
    assert sc.PASSES["snr"] == step_floor.PASSES["SNRAdamW subspace r=32"]


def test_tables_come_out(sc, capsys):
    """The CLI prints the three tables per model and the refresh table."""
    assert sc.main(["--models", "1B", "--world", "8,64"]) == 0
    out = capsys.readouterr().out
    for header in (
        "Optimizer state per rank",
        "Bytes each rank sends",
        "Time per step",
        "Refreshes",
    ):
        assert header in out
    assert out.count("| Megatron TP8") == 3 * 2 + 2  # 3 tables x 2 rank counts, + refresh rows
