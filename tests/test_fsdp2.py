"""FSDP2 (fully_shard, DTensor Shard(0)) with real gloo processes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_mlp
from distributed_utils import run_distributed
from test_ddp import STEPS, _data, _single_process

from snr_dist import SNRAdamW, fsdp

MODES = [
    dict(estimator="temporal", mode="diagonal"),
    dict(estimator="temporal", mode="subspace", rank=3, refresh_every=4, basis_side="cols"),
    dict(estimator="cross_sample", mode="diagonal"),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=4, basis_side="cols"),
]


def _fsdp_worker(rank: int, world: int, kw: dict, per_block: bool):
    from torch.distributed.tensor import DTensor

    model = tiny_mlp()
    modules = None if per_block else []  # [] = root only
    model, opt = fsdp.wrap(model, modules=modules, lr=1e-2, **kw)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    half = slice(rank * 8, (rank + 1) * 8)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[half]), y[half]).backward()
        opt.step()
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "comm": dict(opt.distributor.comm.bytes),
        "calls": dict(opt.distributor.comm.calls),
        "mode": opt.distributor.name,
        "dtypes": sorted(
            {
                str(v.dtype)
                for st in opt.state.values()
                for v in st.values()
                if torch.is_tensor(v) and v.is_floating_point()
            }
        ),
    }


@pytest.mark.parametrize("per_block", [True, False], ids=["per-block", "root-only"])
@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['estimator']}-{kw['mode']}")
def test_fsdp2_two_ranks_equal_one_process(kw, per_block):
    ranks = run_distributed(_fsdp_worker, 2, kw, per_block)
    ref = _single_process(kw)
    for out in ranks:
        assert out["mode"] == "sharded"
        for p, q in zip(out["params"], ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    if kw == MODES[1]:  # temporal subspace
        # one all-reduce of 2r + 2 partial sums per tracked matrix per step, plus the
        # agreement on non-finite gradients (one float per parameter)
        per_step = (2 * 3 + 2) * 2 * 4 + 4 * 4
        assert ranks[0]["comm"]["all_reduce"] == STEPS * per_step
        assert ranks[0]["calls"]["all_reduce"] == 2 * STEPS


def _bf16_worker(rank: int, world: int, kw: dict):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = tiny_mlp()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    model, opt = fsdp.wrap(model, mp_policy=policy, lr=1e-2, **kw)
    losses = []
    x, y = _data(0)
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[rank::2]), y[rank::2])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    dtypes = {
        v.dtype
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    }
    return losses, dtypes, {p.dtype for p in model.parameters()}


@pytest.mark.parametrize("kw", MODES, ids=lambda kw: f"{kw['estimator']}-{kw['mode']}")
def test_fsdp2_bf16_mixed_precision_keeps_fp32_statistics(kw):
    for losses, dtypes, param_dtypes in run_distributed(_bf16_worker, 2, kw):
        assert dtypes == {torch.float32} and param_dtypes == {torch.float32}
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses[-1] < losses[0]


def _refusals(rank: int, world: int):
    out = {}
    model, _ = fsdp.wrap(tiny_mlp())
    for name, kw in {
        "rows": dict(mode="subspace", basis_side="rows"),
    }.items():
        try:
            SNRAdamW(model.parameters(), **kw)
        except ValueError as e:
            out[name] = str(e)
    return out


def test_fsdp2_refuses_what_it_cannot_do_with_a_clear_message():
    for out in run_distributed(_refusals, 2):
        assert "Invalid basis_side: 'rows'" in out["rows"]


def test_fsdp1_parameters_are_refused_not_silently_degraded():
    """FSDP1 marks every parameter it flattens (use_orig_params or not) with torch's own
    `_set_fsdp_flattened`; FSDP1 itself needs an accelerator, so on CPU we mark them with it."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = tiny_mlp()
    _set_fsdp_flattened(model[0].weight)
    with pytest.raises(ValueError, match="does not support FSDP1"):
        SNRAdamW(model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP1 needs a CUDA device")
def test_real_fsdp1_is_refused_on_gpu():
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29731", rank=0, world_size=1)
    try:
        for use_orig in (False, True):
            model = FSDP1(tiny_mlp().cuda(), use_orig_params=use_orig)
            with pytest.raises(ValueError, match="does not support FSDP1"):
                SNRAdamW(model.parameters())
    finally:
        if started:  # not left to interpreter exit (a process group there can abort it)
            dist.destroy_process_group()


def _accumulating_worker(rank: int, world: int, sync_each: bool, kw: dict):
    """Each rank accumulates 2 micro-batches of 4 samples per step (4 in all per step)."""
    model, opt = fsdp.wrap(tiny_mlp(), lr=1e-2, **kw)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        parts = (slice(rank * 8, rank * 8 + 4), slice(rank * 8 + 4, rank * 8 + 8))
        for i, part in enumerate(parts):
            model.set_requires_gradient_sync(sync_each or i == 1)  # reduce once, or each time
            loss = torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 2
            loss.backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _four_microbatches(model, opt, before_step=None) -> list[torch.Tensor]:
    """One process, each step's 16 examples as 4 micro-batches: what 2 ranks x 2 see."""
    for step in range(STEPS):
        if before_step is not None:
            before_step(step)
        x, y = _data(step)
        opt.zero_grad()
        for k in range(4):
            part = slice(4 * k, 4 * k + 4)
            (torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 4).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("kw", MODES[2:], ids=lambda kw: kw["mode"])
@pytest.mark.parametrize("sync_each", [False, True], ids=["no-sync", "sync-each"])
def test_fsdp2_cross_sample_with_gradient_accumulation_equals_one_process(sync_each, kw):
    """Cross-sample statistics under FSDP2 come from the unsharded parameters' gradients, per
    backward pass and per rank: 2 ranks x 2 micro-batches equal one process with 4."""
    model = tiny_mlp()
    ref = _four_microbatches(model, SNRAdamW(model.parameters(), lr=1e-2, **kw))
    for out in run_distributed(_accumulating_worker, 2, sync_each, kw):
        for p, q in zip(out, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_cross_sample_under_fsdp2_without_attach_says_what_to_do():
    out = run_distributed(_unattached_worker, 2)
    for msg in out:
        assert "opt.attach_fsdp(model)" in msg


def _unattached_worker(rank: int, world: int):
    model = fsdp.shard(tiny_mlp())
    opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample")
    x, y = _data(0)
    torch.nn.functional.cross_entropy(model(x[rank::2]), y[rank::2]).backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e)
    return "no error"


def _frozen_and_added_worker(rank: int, world: int):
    """cross_sample under FSDP2: a frozen parameter in the optimizer (fine-tuning), and a
    layer added with add_param_group after attach_fsdp; 2 ranks x 2 micro-batches."""
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    model = fsdp.shard(model)
    opt = SNRAdamW([model[0].weight, model[0].bias], lr=1e-2, estimator="cross_sample")
    opt.attach_fsdp(model)
    half = slice(rank * 8, (rank + 1) * 8)
    for step in range(STEPS):
        if step == 2:
            opt.add_param_group({"params": list(model[2].parameters())})
        x, y = _data(step)
        opt.zero_grad()
        for k in range(2):
            part = slice(half.start + 4 * k, half.start + 4 * k + 4)
            (torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def test_fsdp2_cross_sample_with_a_frozen_parameter_and_a_group_added_later():
    model = tiny_mlp()
    model[0].bias.requires_grad_(False)
    opt = SNRAdamW([model[0].weight, model[0].bias], lr=1e-2, estimator="cross_sample")

    def add_layer(step):
        if step == 2:
            opt.add_param_group({"params": list(model[2].parameters())})

    ref = _four_microbatches(model, opt, add_layer)
    for out in run_distributed(_frozen_and_added_worker, 2):
        for p, q in zip(out, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- frameworks that shard later
def _swap_like_accelerate(opt, model, before: dict) -> None:
    """What Accelerate's FSDP2 preparation (and so HF Trainer's) does to an optimizer built on
    the plain parameters: after ``fully_shard``, each parameter in its groups is replaced by the
    DTensor of the same name (accelerate.utils.fsdp_utils.fsdp2_switch_optimizer_parameters)."""
    name_of = {id(p): n for n, p in before.items()}
    now = dict(model.named_parameters())
    for group in opt.param_groups:
        group["params"] = [now[name_of[id(p)]] for p in group["params"]]


def _sharded_later_run(rank: int, kw: dict, path: str) -> dict:
    """``path="framework"``: the optimizer is built on the plain parameters and the model is
    sharded afterwards, as Accelerate and HF Trainer do under FSDP2; ``"direct"``: torch FSDP2
    + SNRAdamW built on the DTensors (snr_dist.fsdp.wrap). 2 ranks x 2 micro-batches."""
    import torch.distributed as dist

    model = tiny_mlp()
    if path == "framework":
        # the data-parallel group, which the cross-sample estimator needs before sharding
        group = dist.group.WORLD if kw["estimator"] == "cross_sample" else "auto"
        opt = SNRAdamW(model.parameters(), lr=1e-2, process_group=group, **kw)
        before = dict(model.named_parameters())
        fsdp.shard(model)
        _swap_like_accelerate(opt, model, before)
        if kw["estimator"] == "cross_sample":
            # what snr_dist.integrations.accelerate.prepare and SNRTrainer call there
            from snr_dist.integrations.wiring import adopt_fsdp2

            adopt_fsdp2(model, opt)
    else:
        model, opt = fsdp.wrap(model, lr=1e-2, **kw)
    half = slice(rank * 8, (rank + 1) * 8)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        for k in range(2):
            part = slice(half.start + 4 * k, half.start + 4 * k + 4)
            (torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
        opt.step()
    metrics = opt.metrics()
    return {
        "params": [p.full_tensor().detach().clone() for p in model.parameters()],
        "ran": [(g["estimator"], g["mode"]) for g in metrics["groups"]],
        "distributor": metrics["parallel"]["mode"],
        "gates": [m["gate_mean"] for m in metrics["params"].values()],
    }


def _sharded_later_worker(rank: int, world: int, kws: list[dict]):
    out = []
    for kw in kws:
        try:
            framework = _sharded_later_run(rank, kw, "framework")
        except Exception as err:  # noqa: BLE001 - reported to the test
            framework = {"error": f"{type(err).__name__}: {err}"}
        out.append((framework, _sharded_later_run(rank, kw, "direct")))
    # FSDP1's flat parameters swapped in the same way are refused at the first step
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        _set_fsdp_flattened(p)
    x, y = _data(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    try:
        opt.step()
        fsdp1 = None
    except ValueError as err:
        fsdp1 = str(err)
    return out, fsdp1


def test_optimizer_built_before_fully_shard_steps_on_the_sharded_distributor():
    """Issue 34.4: Accelerate and HF Trainer build the optimizer on plain tensors and put FSDP2's
    DTensors in its groups afterwards. The optimizer kept its local distributor: subspace mode
    then gated each rank's rows differently. Now the first step picks the sharded distributor
    (every rank says so through opt.metrics()) and equals torch FSDP2 + SNRAdamW built on the
    DTensors, in each mode (diagonal temporal, elementwise, matched before); FSDP1's flat
    parameters swapped in are refused at the first step."""
    kws = MODES
    for out, fsdp1 in run_distributed(_sharded_later_worker, 2, kws):
        for kw, (framework, direct) in zip(kws, out):
            assert "error" not in framework, (kw, framework["error"])
            assert (framework["distributor"], direct["distributor"]) == ("sharded",) * 2, kw
            assert framework["ran"] == [(kw["estimator"], kw["mode"])]
            for p, q in zip(framework["params"], direct["params"]):
                torch.testing.assert_close(
                    p, q, rtol=0, atol=1e-5, msg=lambda m, kw=kw: f"{kw}: {m}"
                )
            assert framework["gates"] == pytest.approx(direct["gates"], abs=1e-6), kw
        assert fsdp1 is not None and "does not support FSDP1" in fsdp1
