"""DeepSpeed (real, CPU accelerator, 2 gloo processes): snr-dist enabled from the JSON config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_mlp
from distributed_utils import run_distributed
from test_ddp import _data

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

from snr_dist import SNRAdamW  # noqa: E402
from snr_dist import deepspeed as snr_ds  # noqa: E402

STEPS = 5


def _config(stage: int, snr: dict, micro: int = 8, gas: int = 1, **extra) -> dict:
    cfg = {
        "train_batch_size": micro * gas * 2,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "snr_preconditioner": snr,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,  # DeepSpeed's default clips at 1.0
        "steps_per_print": 10**9,
    }
    cfg.update(extra)
    return cfg


def _reference(snr: dict, parts: int, steps: int = STEPS) -> list[torch.Tensor]:
    """snr-dist without DeepSpeed: one process, the global batch of 16 as ``parts`` micro-batches
    (equal to its DDP path, see test_ddp)."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, **snr)
    size = 16 // parts
    for step in range(steps):
        x, y = _data(step)
        opt.zero_grad()
        for i in range(parts):
            part = slice(i * size, (i + 1) * size)
            (torch.nn.functional.cross_entropy(model(x[part]), y[part]) / parts).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _ds_env(rank: int, world: int) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world)
    )


def _params(engine) -> list[torch.Tensor]:
    """Full fp32 parameters, whatever the stage (ZeRO-3 gathers them)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO: the parameter is whole
        out.append((p if full is None else full).detach().float().clone())
    return out


def _train(engine, rank: int, gas: int, start: int, stop: int) -> None:
    micro = 8 // gas
    for step in range(start, stop):
        x, y = _data(step)
        mine = slice(rank * 8, (rank + 1) * 8)
        xr, yr = x[mine], y[mine]
        for i in range(gas):
            part = slice(i * micro, (i + 1) * micro)
            loss = torch.nn.functional.cross_entropy(engine(xr[part]), yr[part])
            engine.backward(loss)
            engine.step()


def _ds_worker(rank: int, world: int, cfg: dict, gas: int):
    _ds_env(rank, world)
    model = tiny_mlp()
    engine, opt, _, sched = snr_ds.initialize(model=model, config=cfg)
    _train(engine, rank, gas, 0, STEPS)
    lrs = [g["lr"] for g in opt.param_groups]
    sched_lrs = sched.get_last_lr() if sched is not None else None
    view = getattr(opt, "optimizer", opt).zero_view
    cut = None if view is None else sum(len(p.cuts) for b in view.buckets for p in b.pieces)
    params = _params(engine)
    engine.destroy()
    return params, (lrs, sched_lrs, cut)


# ZeRO 1-3 run subspace trackers on row shards (basis on the column side, as under FSDP2); the
# one-process reference is told the same side so that the two runs track the same bases.
SUB = dict(mode="subspace", rank=3, refresh_every=2, basis_side="cols")
XSUB = dict(estimator="cross_sample", **SUB)
XDIAG = dict(estimator="cross_sample", mode="diagonal")
SUPPORTED = [
    (0, dict(mode="diagonal"), 1),
    (0, dict(mode="subspace", rank=3, refresh_every=2), 1),
    (0, dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=2), 2),
    (0, XDIAG, 1),
    (1, dict(mode="diagonal"), 1),
    (2, dict(mode="diagonal"), 2),
    (3, dict(mode="diagonal"), 1),
    (1, SUB, 1),
    (1, XSUB, 1),
    (1, XDIAG, 2),
    (2, SUB, 2),
    (2, XSUB, 2),
    (2, XDIAG, 1),
    (3, SUB, 1),
    (3, XSUB, 2),
    (3, XDIAG, 1),
    (2, dict(SUB, noise="second_moment"), 1),
]


def _ds_workers(rank: int, world: int, runs: list[tuple[dict, int]]):
    """Several engines, one after the other, in the same two processes."""
    return [_ds_worker(rank, world, cfg, gas) for cfg, gas in runs]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_equals_the_plain_ddp_path(stage):
    """Every SUPPORTED case of the stage (one process pair runs them in turn)."""
    cases = [(snr, gas) for s, snr, gas in SUPPORTED if s == stage]
    runs = [(_config(stage, snr, micro=8 // gas, gas=gas), gas) for snr, gas in cases]
    ranks = run_distributed(_ds_workers, 2, runs, timeout=400)
    for i, (snr, gas) in enumerate(cases):
        ref = _reference(snr, parts=2 * gas)
        for out in ranks:
            params, (_, _, cut) = out[i]
            for p, q in zip(params, ref):
                torch.testing.assert_close(
                    p, q, rtol=0, atol=1e-5, msg=lambda m, c=(snr, gas): f"{c}: {m}"
                )
            if stage > 0 and snr_ds.needs_rows(snr_ds.SNROptions(**snr)):
                assert cut > 0, (snr, gas)  # the partitions cut rows: the exchange ran


def _compiled_workers(rank: int, world: int, stages: list[int]):
    import snr_dist.kernels.compiled as mod

    os.environ["SNR_DIST_KERNELS"] = "compile"  # kernels="compile" for the client optimizer
    calls = []
    real = mod.compiled_snr_adamw_step
    mod.compiled_snr_adamw_step = lambda *a, **k: calls.append(len(a[0])) or real(*a, **k)
    out = []
    for stage in stages:
        calls.clear()
        params, _ = _ds_worker(rank, world, _config(stage, dict(mode="diagonal")), 1)
        out.append((params, sum(calls)))
    return out


def test_compiled_step_under_zero_equals_the_ddp_path():
    """kernels="compile" (SNR_DIST_KERNELS) on ZeRO's flat fp32 partitions, stages 2 and 3: the
    compiled pass steps the partitions, the ranks agree on skips on the device."""
    stages = [2, 3]
    ranks = run_distributed(_compiled_workers, 2, stages, timeout=400)
    ref = _reference(dict(mode="diagonal"), parts=2)
    for out in ranks:
        for params, stepped in out:
            assert stepped > 0  # tensors the compiled pass stepped
            for p, q in zip(params, ref):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_scheduler_from_the_json_drives_snr_adamw():
    sched = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 1e-2,
            "warmup_num_steps": 10,
            "warmup_type": "linear",
        },
    }
    cfg = _config(2, dict(mode="diagonal"), scheduler=sched)
    for _, (lrs, sched_lrs, _) in run_distributed(_ds_worker, 2, cfg, 1):
        # the JSON's warm-up schedule set SNRAdamW's learning rate: part way to the maximum
        assert lrs == pytest.approx(sched_lrs)
        assert 0.0 < lrs[0] < 1e-2


BF16_MODES = [dict(mode="diagonal"), XDIAG, SUB, XSUB]


def _bf16_worker(rank: int, world: int, stage: int):
    """Every mode at one stage, one DeepSpeed engine after the other in the same processes."""
    return [_bf16_run(rank, world, stage, snr) for snr in BF16_MODES]


def _bf16_run(rank: int, world: int, stage: int, snr: dict):
    _ds_env(rank, world)
    model = tiny_mlp()
    cfg = _config(stage, snr, bf16={"enabled": True})
    engine, opt, _, _ = snr_ds.initialize(model=model, config=cfg)
    losses = []
    x, y = _data(0)
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(engine(x[rank::2].bfloat16()).float(), y[rank::2])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    base = getattr(opt, "optimizer", opt)
    if base.zero_view is not None:  # row shards: the state lives on them
        base = base.zero_view.inner
    dtypes = {
        v.dtype
        for st in base.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.is_floating_point()
    }
    engine.destroy()
    return losses, dtypes


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_runs_with_fp32_statistics(stage):
    """bf16 on each stage, for each of diagonal / subspace x temporal / cross-sample."""
    for runs in run_distributed(_bf16_worker, 2, stage):
        assert len(runs) == len(BF16_MODES)
        for snr, (losses, dtypes) in zip(BF16_MODES, runs):
            assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], snr
            assert dtypes == {torch.float32}, snr


def _bf16_counts_worker(rank: int, world: int):
    """bf16 at stage 0 with accumulation 2: the cross-sample hooks sit on the model's bf16
    parameters and report under DeepSpeed's fp32 copies, whose ``.grad`` stays empty until the
    step: every micro-batch must still count."""
    _ds_env(rank, world)
    cfg = _config(0, XDIAG, micro=4, gas=2, bf16={"enabled": True})
    engine, opt, _, _ = snr_ds.initialize(model=tiny_mlp(), config=cfg)
    capture = getattr(opt, "optimizer", opt)._engine.capture
    counts = []
    for step in range(3):
        x, y = _data(step)
        mine = slice(rank * 8, (rank + 1) * 8)
        for i in range(2):
            part = slice(mine.start + 4 * i, mine.start + 4 * (i + 1))
            out = engine(x[part].bfloat16()).float()
            engine.backward(torch.nn.functional.cross_entropy(out, y[part]))
            if i == 1:
                counts.append({s.count for s in capture.stats.values()})
            engine.step()
    engine.destroy()
    return counts


def test_bf16_stage0_cross_sample_counts_every_micro_batch():
    for counts in run_distributed(_bf16_counts_worker, 2):
        assert counts == [{2}, {2}, {2}]


def _ckpt_worker(rank: int, world: int, cfg: dict, path: str, phase: str):
    _ds_env(rank, world)
    model = tiny_mlp(seed=0 if phase != "resume" else 5)
    engine, opt, _, _ = snr_ds.initialize(model=model, config=cfg)
    if phase == "save":
        _train(engine, rank, 1, 0, 3)
        engine.save_checkpoint(path, tag="step3")
        return None
    engine.load_checkpoint(path, tag="step3")
    _train(engine, rank, 1, 3, STEPS)
    return _params(engine)


@pytest.mark.parametrize(
    "stage, snr",
    [
        (0, dict(mode="subspace", rank=3, refresh_every=2)),
        (2, dict(mode="diagonal")),
        (1, SUB),
        (3, SUB),
        (2, XSUB),
    ],
    ids=["zero0-subspace", "zero2-diagonal", "zero1-subspace", "zero3-subspace", "zero2-xsubspace"],
)
def test_save_load_continue_equals_uninterrupted(tmp_path, stage, snr):
    cfg = _config(stage, snr)
    run_distributed(_ckpt_worker, 2, cfg, str(tmp_path), "save")
    ref = _reference(snr, parts=2)
    for params in run_distributed(_ckpt_worker, 2, cfg, str(tmp_path), "resume"):
        for p, q in zip(params, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# ZeRO checkpoints on another number of ranks (issue 34.9): the global batch of 16 stays, each
# of W ranks takes 16 / W samples (as gas micro-batches of its share where the case needs them)
RESHARD = [
    (1, SUB, {}, (1, 2, 4)),
    (2, SUB, {}, (1, 2, 4)),
    (3, SUB, {"sub_group_size": 100}, (1, 2, 4)),  # sub-groups that differ with the world
    (2, XSUB, {}, (1, 2)),  # cross-sample pools 2 micro-batches: not the same with 4 ranks
    (2, dict(mode="diagonal"), {}, (1, 2, 4)),  # SNRAdamW's own state on flat partitions
    (3, dict(mode="diagonal"), {"sub_group_size": 100}, (1, 2, 4)),
]


def _reshard_config(stage: int, snr: dict, zero: dict, world: int) -> tuple[dict, int]:
    gas = 2 // world if world < 2 else 1
    cfg = _config(stage, snr, micro=16 // world // gas, gas=gas)
    cfg["train_batch_size"] = 16
    cfg["zero_optimization"].update(zero)
    return cfg, gas


def _train_world(engine, rank: int, world: int, gas: int, start: int, stop: int) -> None:
    share = 16 // world
    micro = share // gas
    for step in range(start, stop):
        x, y = _data(step)
        for i in range(gas):
            part = slice(rank * share + i * micro, rank * share + (i + 1) * micro)
            engine.backward(torch.nn.functional.cross_entropy(engine(x[part]), y[part]))
            engine.step()


def _reshard_worker(rank: int, world: int, path: str, phase: str):
    """Every RESHARD case in turn. ``phase``: "save" (2 ranks: 3 steps, checkpoint "a", 2
    more: the uninterrupted run), "to1" (load "a", 1 step, checkpoint "b", 1 step), "back"
    (load "b", 1 step) or "grow" (load "a", 2 steps)."""
    _ds_env(rank, world)
    out = []
    for i, (stage, snr, zero, worlds) in enumerate(RESHARD):
        if world not in worlds:
            out.append(None)
            continue
        cfg, gas = _reshard_config(stage, snr, zero, world)
        model = tiny_mlp(seed=0 if phase == "save" else 7)  # a resumed run's weights: loaded
        engine, _, _, _ = snr_ds.initialize(model=model, config=cfg)
        folder = os.path.join(path, str(i))
        if phase == "save":
            _train_world(engine, rank, world, gas, 0, 3)
            engine.save_checkpoint(folder, tag="a")
            _train_world(engine, rank, world, gas, 3, STEPS)
        elif phase == "to1":
            engine.load_checkpoint(folder, tag="a")
            _train_world(engine, rank, world, gas, 3, 4)
            engine.save_checkpoint(folder, tag="b")
            _train_world(engine, rank, world, gas, 4, STEPS)
        else:
            loaded, _ = engine.load_checkpoint(folder, tag="b" if phase == "back" else "a")
            assert loaded is not None
            _train_world(engine, rank, world, gas, 4 if phase == "back" else 3, STEPS)
        out.append(_params(engine))
        engine.destroy()
    return out


def test_zero_checkpoints_resume_on_another_number_of_ranks(tmp_path):
    """A ZeRO checkpoint of 2 ranks resumes on 1, that one's on 2 again, and the first on 4:
    engine.load_checkpoint (from snr_dist.deepspeed.initialize) reshards the fp32 weights, the
    row-shard state of subspace and cross-sample trackers and SNRAdamW's flat state; each run
    ends within 1e-6 of the uninterrupted one (DeepSpeed alone refuses another world size)."""
    path = str(tmp_path)
    whole = run_distributed(_reshard_worker, 2, path, "save", timeout=400)[0]
    runs = [
        ("2 -> 1", run_distributed(_reshard_worker, 1, path, "to1", timeout=400)),
        ("1 -> 2", run_distributed(_reshard_worker, 2, path, "back", timeout=400)),
        ("2 -> 4", run_distributed(_reshard_worker, 4, path, "grow", timeout=400)),
    ]
    for what, ranks in runs:
        for out in ranks:
            for case, want, got in zip(RESHARD, whole, out):
                if got is None:
                    continue
                for p, q in zip(got, want):
                    torch.testing.assert_close(
                        p, q, rtol=0, atol=1e-6, msg=lambda m, c=case, w=what: f"{w} {c}: {m}"
                    )


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"snr_preconditioner": {"gaet": "wiener"}}, ["snr_preconditioner.gaet", "unknown key"]),
        ({"snr_preconditioner": {"tau": "high"}}, ["snr_preconditioner.tau", "'high'"]),
        ({"snr_preconditioner": {"rank": 0}}, ["snr_preconditioner.rank", "Invalid rank"]),
        (
            {
                "snr_preconditioner": {"mode": "subspace", "basis_side": "rows"},
                "zero_optimization": {"stage": 2},
            },
            ["basis_side = 'rows'", "ZeRO stage 2", "'cols'"],
        ),
        (
            {"snr_preconditioner": {"estimator": "cross_sample"}, "fp16": {"enabled": True}},
            ["estimator='cross_sample'", "fp16.enabled", "bf16"],
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            ["offload_optimizer.device", "'cpu'", "client optimizer"],
        ),
        ({"zero_optimization": {"stage": 5}}, ["zero_optimization.stage = 5"]),
        ({"optimizer": {"type": "Lamb", "params": {}}}, ["optimizer.type", "'Lamb'"]),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "momentum": 0.9}}},
            ["optimizer.params", "momentum"],
        ),
        ({"optimizer": None}, ['needs an "optimizer" block']),
    ],
)
def test_bad_json_fails_at_initialize_naming_the_problem(patch, words):
    cfg = _config(0, {})
    for k, v in patch.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    with pytest.raises(snr_ds.DeepSpeedConfigError) as e:
        snr_ds.build(cfg, tiny_mlp().parameters())
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def _signature_worker(rank: int, world: int, path: str):
    """The three ways DeepSpeed's tutorials pass the config: config=, config_params= and
    ``--deepspeed_config`` through ``deepspeed.add_config_arguments``."""
    import argparse
    import json

    import deepspeed

    _ds_env(rank, world)
    cfg = json.loads(Path(path).read_text())
    assert snr_ds.add_config_arguments is deepspeed.add_config_arguments  # the rest is theirs
    args = snr_ds.add_config_arguments(argparse.ArgumentParser()).parse_args(
        ["--deepspeed", "--deepspeed_config", path]
    )
    args.local_rank = None
    out = []
    for kw in (dict(config=cfg), dict(config_params=cfg), dict(args=args)):
        engine, _, _, _ = snr_ds.initialize(model=tiny_mlp(), **kw)
        _train(engine, rank, 1, 0, 2)
        out.append(_params(engine))
        engine.destroy()
    return out, args.deepspeed_config, args.local_rank


def test_initialize_takes_the_config_as_deepspeed_does(tmp_path):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(2, dict(mode="diagonal"))))
    for runs, kept, local_rank in run_distributed(_signature_worker, 2, str(path)):
        assert kept == str(path)  # the caller's args are as they were
        assert local_rank is not None  # DeepSpeed still set it
        for other in runs[1:]:
            for p, q in zip(runs[0], other):
                assert torch.equal(p, q)
    with pytest.raises(snr_ds.DeepSpeedConfigError, match="exactly once.*config, config_params"):
        snr_ds.initialize(model=tiny_mlp(), config={}, config_params={})
    with pytest.raises(snr_ds.DeepSpeedConfigError, match="exactly once.*got none"):
        snr_ds.initialize(model=tiny_mlp())


def _layout_worker(rank: int, world: int):
    _ds_env(rank, world)
    engine, opt, _, _ = snr_ds.initialize(model=tiny_mlp(), config=_config(2, SUB))
    _train(engine, rank, 1, 0, 1)
    client = opt.optimizer
    sd = client.state_dict()
    client.load_state_dict(sd)  # its own state loads back
    errors = []
    moved = dict(sd, zero_layout=dict(sd["zero_layout"], rank=1 - rank))
    bare = {k: v for k, v in sd.items() if k != "zero_layout"}
    for bad in (moved, bare):
        try:
            client.load_state_dict(bad)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_row_shard_state_refuses_another_layout():
    """Row-shard state is per rank: loading another rank's (or a world size's) state, or state
    saved without row shards, fails naming why instead of mixing rows."""
    for errors in run_distributed(_layout_worker, 2):
        assert len(errors) == 2
        assert "other row shards" in errors[0] and "same number of data-parallel ranks" in errors[0]
        assert "zero_layout" in errors[1]


def _two_groups(model) -> list[dict]:
    """Weights with decay, biases without: the two groups most training scripts build."""
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() == 1]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0, "lr": 5e-3}]


def _groups_worker(rank: int, world: int, cfg: dict):
    _ds_env(rank, world)
    model = tiny_mlp()
    engine, _, _, _ = snr_ds.initialize(
        model=model, model_parameters=_two_groups(model), config=cfg
    )
    _train(engine, rank, 1, 0, STEPS)
    return _params(engine)


@pytest.mark.parametrize(
    "stage, zero_extra",
    [(2, {}), (3, {"sub_group_size": 100})],
    ids=["zero2", "zero3-small-sub-groups"],
)
def test_row_shards_with_two_param_groups(stage, zero_extra):
    """DeepSpeed steps the client once per param group (stages 1-2) or per sub-group (stage 3,
    here several per group): each call steps its own row shards with its group's options."""
    cfg = _config(stage, XSUB)
    cfg["zero_optimization"].update(zero_extra)
    model = tiny_mlp()
    opt = SNRAdamW(_two_groups(model), lr=1e-2, weight_decay=0.01, **XSUB)
    for step in range(STEPS):
        x, y = _data(step)
        opt.zero_grad()
        for i in range(2):
            part = slice(i * 8, (i + 1) * 8)
            (torch.nn.functional.cross_entropy(model(x[part]), y[part]) / 2).backward()
        opt.step()
    for params in run_distributed(_groups_worker, 2, cfg):
        for p, q in zip(params, model.parameters()):
            torch.testing.assert_close(p, q.detach(), rtol=0, atol=1e-5)


def _plain_deepspeed_worker(rank: int, world: int):
    """DeepSpeed's own initialize with a subspace SNRAdamW: ZeRO hands it flat partitions."""
    import deepspeed

    _ds_env(rank, world)
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, **SUB)
    cfg = _config(2, {})
    cfg.pop("snr_preconditioner")
    cfg.pop("optimizer")
    cfg["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    try:
        _train(engine, rank, 1, 0, 1)
    except RuntimeError as e:
        return str(e)
    return None


def test_subspace_on_flat_partitions_without_row_shards_fails_loudly():
    """Before 0.3 a subspace SNRAdamW given to deepspeed.initialize itself ran silently as the
    diagonal rule on ZeRO's flat partitions; now its first step names the fix."""
    for message in run_distributed(_plain_deepspeed_worker, 2):
        assert message is not None and "flat 1-D tensors" in message
        assert "snr_dist.deepspeed.initialize" in message and "attach_zero" in message


def test_cross_sample_warns_about_deepspeeds_default_clipping():
    cfg = _config(2, XSUB)
    cfg.pop("gradient_clipping")
    with pytest.warns(RuntimeWarning, match="DeepSpeed's default when the key is absent"):
        snr_ds.build(cfg, tiny_mlp().parameters())
