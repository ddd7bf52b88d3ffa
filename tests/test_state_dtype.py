"""``state_dtype="bfloat16"``: SNRAdamW's first moment and parameter-sized SNR statistics in
bfloat16, rounded stochastically and reproducibly; Adam's second moment in float32.

The diagonal rule's state then takes fp32 AdamW's bytes; a bf16-state run tracks the fp32-state
run; the rounding is unbiased where round-to-nearest stalls an EMA, reproducible from the seed
and independent of how the step is cut into chunks, pieces or row shards; state_dicts, copies
and DCP checkpoints keep the dtypes and resume bit for bit; every distributor runs it.
(torch.optim's contract over a bf16-state configuration: tests/test_optimizer_contract.py.)
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp
from distributed_utils import run_distributed
from test_ddp import _data, _single_process

from snr_dist import SNRAdamW, SNRPreconditioner, checkpoint, fsdp
from snr_dist.kernels import rounding
from snr_dist.optim.steps import chunked_step

BF16 = dict(state_dtype="bfloat16")
SUB = dict(mode="subspace", rank=3, refresh_every=4)
CONFIGS = [
    dict(),
    dict(noise="second_moment"),  # its own mean (snr_beta 0.99 != beta1)
    dict(noise="second_moment", gate="clamp", snr_beta=0.9),  # Adam's mean shared
    dict(SUB),
    dict(SUB, noise="second_moment"),
    dict(estimator="cross_sample"),
    dict(estimator="cross_sample", **SUB),
    dict(foreach=False, gate="hard", weight_decay=0.1),
]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _micro(kw):
    return 2 if kw.get("estimator") == "cross_sample" else 1


def state_bytes(opt) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v)
    )


# ------------------------------------------------------------------ bytes and dtypes
@pytest.mark.parametrize("kw", CONFIGS[:3], ids=_ids)
def test_diagonal_state_takes_fp32_adamws_bytes(kw):
    model, twin = tiny_mlp(), tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **kw, **BF16)
    adamw = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=True)
    data = batches(2)
    run(model, opt, data)
    run(twin, adamw, data)
    fp32 = SNRAdamW(tiny_mlp().parameters(), lr=1e-2, **kw)
    run(tiny_mlp(), fp32, data)
    if kw.get("snr_beta") == 0.9:  # no statistic of its own: 6 bytes per parameter
        assert state_bytes(opt) < state_bytes(adamw)
    else:  # 2 (m) + 4 (v) + 2 (noise EMA or own mean), AdamW's 4 + 4
        assert state_bytes(opt) == state_bytes(adamw)
    for st in opt.state.values():
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.float32
        assert all(st[k].dtype == torch.bfloat16 for k in ("noise_avg", "snr_avg") if k in st)


def test_cross_sample_and_subspace_state_dtypes():
    """Cross-sample's two statistics are bfloat16 too (10 bytes per parameter against
    AdamW's 8); a tracker's small state (basis, sketch, per-direction statistics) stays
    float32."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample", **SUB, **BF16)
    run(model, opt, batches(3, micro=2))
    w, b = model[0].weight, model[0].bias
    assert opt.state[w]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[w]["basis"].dtype == opt.state[w]["sketch"].dtype == torch.float32
    assert opt.state[b]["raw_avg"].dtype == opt.state[b]["var_avg"].dtype == torch.bfloat16


# ------------------------------------------------------------------ the rounding
def test_stochastic_rounding_is_unbiased_reproducible_and_exact_on_bf16_values():
    x = torch.full((1 << 16,), 1 + 2**-10)  # an eighth of a bf16 ulp above 1
    y = rounding.stochastic_round(x, seed=0, key=3, step=7)
    assert set(y.float().unique().tolist()) == {1.0, 1 + 2**-7}
    assert abs((y.float() == 1 + 2**-7).float().mean().item() - 1 / 8) < 0.01
    assert torch.equal(y, rounding.stochastic_round(x, seed=0, key=3, step=7))  # same bits
    assert not torch.equal(y, rounding.stochastic_round(x, seed=0, key=3, step=8))
    assert not torch.equal(y, rounding.stochastic_round(x, seed=1, key=3, step=7))
    # the bits of an element depend on its index only, not on where a piece starts
    piece = rounding.stochastic_round(x[1000:3000], seed=0, key=3, step=7, offset=1000)
    assert torch.equal(piece, y[1000:3000])
    z = torch.randn(4096).bfloat16().float()  # already bfloat16: kept exactly
    assert torch.equal(rounding.stochastic_round(z, 5, 1, 1).float(), z)
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(rounding.stochastic_round(special, 0, 0, 0).float(), special)
    assert rounding.stochastic_round(torch.tensor([float("nan")]), 0, 0, 0).isnan().all()


def test_round_to_nearest_stalls_an_ema_that_stochastic_rounding_carries():
    """An EMA with beta 0.99 stored in bfloat16, fed a constant 1 from 0.5: rounded to
    nearest, its 1% steps fall below half an ulp near 0.8 and it stops there; rounded
    stochastically it follows the float32 EMA."""
    exact = torch.full((2048,), 0.5)
    nearest = exact.bfloat16()
    stochastic = exact.bfloat16()
    for t in range(400):
        exact.lerp_(torch.ones(()), 0.01)
        nearest = nearest.float().lerp_(torch.ones(()), 0.01).bfloat16()
        step = stochastic.float().lerp_(torch.ones(()), 0.01)
        stochastic = rounding.stochastic_round(step, seed=0, key=0, step=t)
    assert nearest.float().max() < 0.81 < 0.95 < exact[0]  # stalled
    assert abs(stochastic.float().mean().item() - exact[0].item()) < 2e-3


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("kw", CONFIGS, ids=_ids)
def test_bf16_state_tracks_the_fp32_state_run(kw):
    """60 steps: the bf16-state run ends as far from the fp32-state run as two bf16-state runs
    of different rounding seeds end from each other (the rounding adds zero-mean noise, no
    drift; ``seed`` also draws the subspace bases), within 10% of how far the parameters
    moved, and with the same loss to 0.5%."""
    data = batches(60, micro=_micro(kw))
    a, b, c = tiny_mlp(), tiny_mlp(), tiny_mlp()
    opt = SNRAdamW(a.parameters(), lr=1e-2, **kw, **BF16)
    run(a, opt, data)
    run(b, SNRAdamW(b.parameters(), lr=1e-2, **kw), data)
    run(c, SNRAdamW(c.parameters(), lr=1e-2, seed=1, **kw, **BF16), data)
    start = tiny_mlp()
    moved = max((p - q).abs().max().item() for p, q in zip(b.parameters(), start.parameters()))
    assert max_diff(a, b) < 1.5 * max_diff(a, c)
    assert max_diff(a, b) < 0.1 * moved
    x, y = _data(99)
    losses = [torch.nn.functional.cross_entropy(m(x), y).item() for m in (a, b)]
    assert abs(losses[0] - losses[1]) < 0.005 * losses[1]
    gates = [v["gate_mean"] for v in opt.metrics()["params"].values()]  # reads bf16 state
    assert all(0.0 <= g <= 1.0 for g in gates)


def test_pieces_chunks_and_whole_tensors_round_alike(monkeypatch):
    """The rounding bits follow each element's index in its parameter: the CPU step in
    chunks, and large tensors in pieces, give the bits of the one-call step."""

    def train(limit, scratch):
        monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", limit)
        monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", scratch)
        model = tiny_mlp()
        opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **BF16)
        run(model, opt, batches(12))
        return model, opt

    whole, opt_w = train(1 << 30, 1 << 30)
    pieced, opt_p = train(100, 0)  # weights of 288 and 120 elements in pieces of 64
    assert max_diff(whole, pieced) == 0.0
    for p, q in zip(whole.parameters(), pieced.parameters()):
        for k, v in opt_w.state[p].items():
            assert torch.equal(v, opt_p.state[q][k]), k


def test_a_run_reproduces_and_the_seed_changes_the_bits():
    def train(seed):
        model = tiny_mlp()
        run(model, SNRAdamW(model.parameters(), lr=1e-2, seed=seed, **BF16), batches(10))
        return model

    assert max_diff(train(0), train(0)) == 0.0
    assert max_diff(train(0), train(1)) > 0.0


@pytest.mark.parametrize("kw", CONFIGS, ids=_ids)
def test_resume_equals_uninterrupted(kw):
    data = batches(16, micro=_micro(kw))
    full = tiny_mlp()
    run(full, SNRAdamW(full.parameters(), lr=1e-2, **kw, **BF16), data)
    first = tiny_mlp()
    opt = SNRAdamW(first.parameters(), lr=1e-2, **kw, **BF16)
    run(first, opt, data[:7])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    for st in ckpt["opt"]["state"].values():
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.float32
    resumed = tiny_mlp(seed=5)
    resumed.load_state_dict(ckpt["model"])
    opt2 = SNRAdamW(resumed.parameters(), lr=1e-2, **kw)  # the checkpoint says bfloat16
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["state_dtype"] == "bfloat16"
    run(resumed, opt2, data[7:])
    assert max_diff(full, resumed) == 0.0


# ------------------------------------------------------------------ paths and refusals
@pytest.mark.parametrize("kernels", ["compile", "triton"])
def test_device_kernels_route_bf16_state_to_the_torch_step_and_say_so(kernels, monkeypatch):
    import snr_dist.optim.steps.routing as routing

    monkeypatch.setattr(routing, "_said_low_precision", False)
    data = batches(6)
    a, b = tiny_mlp(), tiny_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = SNRAdamW(a.parameters(), lr=1e-2, kernels=kernels, **BF16)
        run(a, opt, data)
    said = [str(c.message) for c in caught if "state_dtype='bfloat16' runs the torch step" in
            str(c.message)]  # fmt: skip
    assert len(said) == 1
    run(b, SNRAdamW(b.parameters(), lr=1e-2, kernels="torch", **BF16), data)
    assert max_diff(a, b) == 0.0
    assert opt.state[a[0].weight]["exp_avg"].dtype == torch.bfloat16


def test_auto_keeps_a_large_bf16_group_on_the_torch_step_without_a_word(monkeypatch):
    """kernels="auto" would compile a CPU group this large (threshold lowered); with bfloat16
    state it runs the torch step, and neither message is given (nothing was asked for)."""
    import snr_dist.kernels as kernels

    monkeypatch.setattr(kernels, "AUTO_COMPILE_ELEMENTS", 10)
    monkeypatch.setattr(kernels, "_said_auto_compile", False)
    a, b = tiny_mlp(), tiny_mlp()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(a, SNRAdamW(a.parameters(), lr=1e-2, **BF16), batches(4))
    assert not [c for c in caught if "snr-dist" in str(c.message)]
    run(b, SNRAdamW(b.parameters(), lr=1e-2, kernels="torch", **BF16), batches(4))
    assert max_diff(a, b) == 0.0


def test_bad_values_and_changes_are_refused():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError) as e:
        SNRAdamW([p], state_dtype="float16")
    assert "Invalid state_dtype: 'float16'; allowed values: 'float32', 'bfloat16'" in str(e.value)
    with pytest.raises(ValueError, match="Invalid state_dtype: 'bfloat16'; allowed in SNRPre"):
        SNRPreconditioner(torch.optim.SGD([p], lr=0.1), state_dtype="bfloat16")
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **BF16)
    run(model, opt, batches(1))
    opt.param_groups[0]["state_dtype"] = "float32"
    with pytest.raises(ValueError, match="state_dtype='float32' .* state_dtype cannot change"):
        run(model, opt, batches(1))


def test_copies_keep_the_dtypes_and_continue_alike():
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **SUB, **BF16)
    run(model, opt, batches(3))
    twin, opt2 = copy.deepcopy((model, opt))
    assert opt2.state[twin[0].weight]["exp_avg"].dtype == torch.bfloat16
    more = batches(4, seed=7)
    run(model, opt, more)
    run(twin, opt2, more)
    assert max_diff(model, twin) == 0.0


# ------------------------------------------------------------------ distributors, DCP
def _dist_worker(rank, world, path):
    """DDP (replicated ranks), FSDP2 (row shards: the rounding draws by global index), and a
    DCP checkpoint of the FSDP2 run resumed on the same ranks."""
    out = {}
    half = slice(rank * 8, (rank + 1) * 8)
    for name, kw in (("ddp", dict(**SUB)), ("fsdp2", dict(mode="subspace", rank=3,
                                                          basis_side="cols"))):  # fmt: skip
        model = tiny_mlp()
        if name == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(model)
            opt = SNRAdamW(
                model.parameters(), lr=1e-2, process_group=torch.distributed.group.WORLD, **kw,
                **BF16,
            )  # fmt: skip
        else:
            net, opt = fsdp.wrap(model, lr=1e-2, **kw, **BF16)
        for step in range(8):
            if name == "fsdp2" and step == 4:
                checkpoint.save(path, net, opt, step=4)
            x, y = _data(step)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[half]), y[half]).backward()
            opt.step()
        params = [
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()
        ]
        dtypes = {k: str(v.dtype) for st in opt.global_state().values() for k, v in st.items()}
        out[name] = (params, dtypes)
    model = tiny_mlp(seed=3)
    net, opt = fsdp.wrap(model, lr=1e-2, mode="subspace", rank=3, basis_side="cols", **BF16)
    start = checkpoint.load(path, net, opt)
    for step in range(start, 8):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[half]), y[half]).backward()
        opt.step()
    out["resumed"] = [p.full_tensor().detach().clone() for p in model.parameters()]
    return out


def _single(kw):
    return _single_process({**kw, **BF16}, steps=8)


def test_ddp_fsdp2_and_dcp_run_bf16_state(tmp_path):
    ranks = run_distributed(_dist_worker, 2, str(tmp_path / "ck"), timeout=300)
    for name, kw in (("ddp", SUB), ("fsdp2", dict(mode="subspace", rank=3, basis_side="cols"))):
        (p0, dtypes), (p1, _) = ranks[0][name], ranks[1][name]
        assert dtypes["exp_avg"] == "torch.bfloat16" and dtypes["exp_avg_sq"] == "torch.float32"
        for a, b in zip(p0, p1):
            assert torch.equal(a, b)  # every rank holds the same parameters
        for a, b in zip(p0, _single(kw)):  # one process, the same batches: the same run
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for out in ranks:  # resumed from DCP = uninterrupted (the trackers' partial sums are
        # summed on save and re-split on load: float32 state resumes to 7e-9 here too)
        for a, b in zip(out["resumed"], out["fsdp2"][0]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dcp_checkpoint_of_one_process_resumes_bit_for_bit(tmp_path):
    kw = dict(estimator="cross_sample", **BF16)
    data = batches(10, micro=2)
    full = tiny_mlp()
    run(full, SNRAdamW(full.parameters(), lr=1e-2, **kw), data)
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **kw)
    run(model, opt, data[:4])
    checkpoint.save(tmp_path / "ck", model, opt, step=4)
    resumed = tiny_mlp(seed=3)
    opt2 = SNRAdamW(resumed.parameters(), lr=1e-2, **kw)
    assert checkpoint.load(tmp_path / "ck", resumed, opt2) == 4
    assert opt2.state[resumed[0].weight]["raw_avg"].dtype == torch.bfloat16
    run(resumed, opt2, data[4:])
    assert max_diff(full, resumed) == 0.0


def _ds_bf16_workers(rank, world, runs):
    from test_deepspeed import _ds_workers

    return _ds_workers(rank, world, runs)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_runs_bf16_state(stage):
    """ZeRO's flat partitions (diagonal) and snr-dist's row shards (subspace) with bfloat16
    state, against the one-process run of the same batches."""
    pytest.importorskip("deepspeed")
    from test_deepspeed import SUB as ZSUB
    from test_deepspeed import _config, _reference

    modes = [dict(mode="diagonal", **BF16), dict(ZSUB, **BF16)]
    runs = [(_config(stage, snr), 1) for snr in modes]
    ranks = run_distributed(_ds_bf16_workers, 2, runs, timeout=400)
    for i, snr in enumerate(modes):
        ref = _reference(snr, parts=2)
        for out in ranks:
            params, _ = out[i]
            # ZeRO's flat partitions draw their rounding bits by their own index, and a bit
            # that rounds the other way moves a parameter by ~lr * 2^-8: not to 1e-5 as fp32
            for p, q in zip(params, ref):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
