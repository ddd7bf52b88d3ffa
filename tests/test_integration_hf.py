"""Hugging Face: SNRAdamW in transformers.Trainer and under accelerate (DDP, DeepSpeed ZeRO-2).

Real libraries on the CPU, a tiny GPT-2 built from its config, generated token data. The
distributed tests run 2 real gloo processes; the docs tests run each page's example.
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port, run_distributed

pytest.importorskip("transformers", reason="the hf extra is not installed")
pytest.importorskip("accelerate", reason="the hf extra is not installed")

from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from snr_dist import SNRAdamW  # noqa: E402
from snr_dist.integrations.transformers import (  # noqa: E402
    SNRMetricsCallback,
    add_snr_metrics,
    snr_adamw,
    unwrap,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "integrations"
SEQ = 16
N_SEQ = 64


def tiny_gpt2(seed: int = 0, dropout: float = 0.1) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def tokens() -> torch.Tensor:
    """``N_SEQ`` sequences, each an arithmetic progression mod 64 (step 1, 2 or 3): learnable."""
    return torch.stack([(torch.arange(SEQ) * (1 + i % 3) + i) % 64 for i in range(N_SEQ)])


class TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x = tokens()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _args(out: Path, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=8,
        learning_rate=1e-2,
        warmup_steps=2,
        lr_scheduler_type="linear",
        max_grad_norm=0.5,
        bf16=True,
        use_cpu=True,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------- Trainer
SUBSPACE_X = dict(estimator="cross_sample", mode="subspace", rank=4, refresh_every=3)


def _trainer(out: Path, how: str, snr: dict, seed: int = 0, **overrides) -> Trainer:
    model = tiny_gpt2(seed)
    args = _args(out, **overrides)
    if how == "optimizer_cls_and_kwargs":
        return Trainer(
            model=model,
            args=args,
            train_dataset=TokenData(),
            optimizer_cls_and_kwargs=snr_adamw(args, **snr),
        )
    opt = SNRAdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01, **snr)
    return Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(opt, None))


@pytest.mark.parametrize(
    "how, snr",
    [("optimizer_cls_and_kwargs", {}), ("optimizers", SUBSPACE_X)],
    ids=["cls_and_kwargs-diagonal-temporal", "prebuilt-subspace-cross_sample"],
)
def test_trainer_resume_equals_uninterrupted(tmp_path, how, snr):
    """gradient accumulation 2, clipping, warmup + linear decay, bf16 autocast on the CPU;
    stopped at step 3 (mid-epoch) and resumed in a new Trainer with other initial weights, the
    run ends where the uninterrupted one does (1e-5)."""
    full = _trainer(tmp_path / "full", how, snr, save_strategy="steps", save_steps=3)
    dtypes = []
    mlp = full.model.transformer.h[0].mlp.c_fc
    hook = mlp.register_forward_hook(lambda m, a, out: dtypes.append(out.dtype))
    full.train()
    hook.remove()
    opt = unwrap(full.optimizer)
    assert isinstance(opt, SNRAdamW) and opt.param_groups[0]["estimator"] == snr.get(
        "estimator", "temporal"
    )
    assert set(dtypes) == {torch.bfloat16}  # Trainer's autocast ran the forward in bf16
    assert all(p.dtype == torch.float32 for p in full.model.parameters())
    logs = [h for h in full.state.log_history if "loss" in h]
    assert max(h["grad_norm"] for h in logs) > 0.5  # max_grad_norm clipped something
    lrs = [h["learning_rate"] for h in logs]
    assert lrs[0] < 1e-2 and lrs[-1] < lrs[1]  # warmup, then linear decay
    losses = _losses(full)
    assert losses[-1] < losses[0] - 0.2

    checkpoint = tmp_path / "full" / "checkpoint-3"
    resumed = _trainer(tmp_path / "resumed", how, snr, seed=1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 8
    assert _max_diff(full.model, resumed.model) < 1e-5

    if how == "optimizers":
        # the check above can fail: without the optimizer state the resumed run differs
        bare = tmp_path / "bare"
        shutil.copytree(checkpoint, bare)
        fresh = SNRAdamW(tiny_gpt2().parameters(), lr=1e-2, weight_decay=0.01, **snr)
        torch.save(fresh.state_dict(), bare / "optimizer.pt")  # the scheduler's stays
        lost = _trainer(tmp_path / "lost", how, snr, seed=1)
        lost.train(resume_from_checkpoint=str(bare))
        assert _max_diff(full.model, lost.model) > 1e-4


def _event_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in root.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_metrics_callback_reaches_tensorboard(tmp_path):
    """add_snr_metrics: the telemetry reaches report_to=["tensorboard"] every logging_steps
    (read back with tensorboard's EventAccumulator) and the Trainer's log_history; passed as
    Trainer(callbacks=[...]) instead, it runs after the loggers, and says so."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    trainer = _trainer(tmp_path / "tb", "optimizer_cls_and_kwargs", {}, report_to=["tensorboard"])
    add_snr_metrics(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], SNRMetricsCallback)
    with pytest.raises(ValueError, match="already has an SNRMetricsCallback"):
        add_snr_metrics(trainer)
    trainer.train()
    scalars = _event_scalars(tmp_path / "tb")
    keys = ("gate_mean", "closed_frac", "snr_q10", "snr_q50", "snr_q90")
    for group in ("all", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"):
        for key in keys:
            values = scalars[f"train/snr/{group}/{key}"]
            assert [s for s, _ in values] == [2, 4, 6, 8]
            assert all(math.isfinite(v) for _, v in values)
    gates = [v for _, v in scalars["train/snr/all/gate_mean"]]
    assert all(0.0 <= g <= 1.0 for g in gates)
    q = {k: scalars[f"train/snr/all/{k}"][-1][1] for k in ("snr_q10", "snr_q50", "snr_q90")}
    assert q["snr_q10"] <= q["snr_q50"] <= q["snr_q90"]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert all("snr/all/gate_mean" in h for h in logged)

    late = _trainer(tmp_path / "late", "optimizer_cls_and_kwargs", {}, report_to=["tensorboard"])
    late.add_callback(SNRMetricsCallback())
    with pytest.warns(UserWarning, match="run after the report_to loggers"):
        late.train()
    assert not any("snr/" in tag for tag in _event_scalars(tmp_path / "late"))
    assert "snr/all/gate_mean" in [h for h in late.state.log_history if "loss" in h][0]


def test_metrics_callback_refuses_another_optimizer():
    model = tiny_gpt2()
    with pytest.raises(TypeError, match="optimizer is AdamW, with no SNRAdamW"):
        SNRMetricsCallback().values(torch.optim.AdamW(model.parameters()), model)
    with pytest.raises(TypeError, match="prefix must be a str"):
        SNRMetricsCallback(prefix=1)


class _Microbatches(TrainerCallback):
    """Before each optimizer step: how many gradient contributions the cross-sample estimator
    recorded for each parameter since the last step."""

    def __init__(self) -> None:
        self.counts: list[set[int]] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap(optimizer)
        params = [p for g in opt.param_groups for p in g["params"]]
        stats = opt._engine.capture.stats
        self.counts.append({stats[p].count if p in stats else 0 for p in params})


def test_cross_sample_fed_by_gradient_accumulation(tmp_path):
    """In one process each backward pass of Trainer's gradient accumulation is one micro-batch
    of the cross-sample estimator: 2 per step with gradient_accumulation_steps=2, the first step
    refuses with 1, and an epoch's short last window carries the statistics over."""
    snr = dict(estimator="cross_sample")
    trainer = _trainer(tmp_path / "acc2", "optimizer_cls_and_kwargs", snr)
    seen = _Microbatches()
    trainer.add_callback(seen)
    trainer.train()
    assert seen.counts == [{2}] * 8
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.2

    one = _trainer(
        tmp_path / "acc1", "optimizer_cls_and_kwargs", snr, gradient_accumulation_steps=1
    )
    with pytest.raises(RuntimeError, match="needs >= 2 gradient contributions"):
        one.train()

    # an epoch of 4 batches with accumulation 3 ends in a window of 1, on which Trainer
    # steps: the step carries the statistics over (and says so once) instead of failing
    odd = _trainer(
        tmp_path / "acc3",
        "optimizer_cls_and_kwargs",
        snr,
        gradient_accumulation_steps=3,
        per_device_train_batch_size=16,
        max_steps=-1,
        num_train_epochs=2,
    )
    seen = _Microbatches()
    odd.add_callback(seen)
    with pytest.warns(UserWarning, match="fewer than 2 micro-batch") as caught:
        odd.train()
    assert len([w for w in caught if "fewer than 2" in str(w.message)]) == 1
    assert seen.counts == [{3}, {1}, {3}, {1}]
    assert odd.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in odd.model.parameters())


def test_snr_adamw_takes_the_training_arguments(tmp_path):
    args = _args(tmp_path, learning_rate=3e-3, adam_beta1=0.8, adam_epsilon=1e-6)
    cls, kw = snr_adamw(args, estimator="cross_sample")
    assert cls is SNRAdamW
    assert kw == dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, estimator="cross_sample")
    with pytest.raises(ValueError, match="'lr' comes from TrainingArguments"):
        snr_adamw(args, lr=1e-3)
    trainer = Trainer(
        model=tiny_gpt2(), args=args, train_dataset=TokenData(), optimizer_cls_and_kwargs=(cls, kw)
    )
    opt = unwrap(trainer.create_optimizer())
    assert [g["weight_decay"] for g in opt.param_groups] == [args.weight_decay, 0.0]
    assert opt.param_groups[0]["betas"] == (0.8, 0.999)
    # Trainer.hyperparameter_search sets each trial's values on the same args, then builds
    # the trial's optimizer: the values reach it (they are read when it is built)
    args.learning_rate, args.adam_beta2, args.adam_epsilon = 5e-4, 0.95, 1e-7
    trainer.optimizer = None
    opt = unwrap(trainer.create_optimizer())
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 5e-4]
    assert opt.param_groups[0]["betas"] == (0.8, 0.95)
    assert opt.param_groups[0]["eps"] == 1e-7


# ------------------------------------------------------------------------------- accelerate
PARTS = 4  # micro-batches of 4 sequences per optimizer step: 2 ranks x accumulation 2
STEPS = 12  # 3 epochs of 64 sequences
DDP_CONFIGS = {
    "temporal": dict(),
    "cross_sample": dict(estimator="cross_sample"),
    "subspace-temporal": dict(mode="subspace", rank=3, refresh_every=4),
    "subspace-cross_sample": dict(
        estimator="cross_sample", mode="subspace", rank=3, refresh_every=4
    ),
}
# ZeRO row shards track bases on the column side (as snr_dist.deepspeed does).
DS_CONFIGS = {
    "temporal": dict(),
    "subspace-cross_sample": dict(
        estimator="cross_sample", mode="subspace", rank=3, refresh_every=4, basis_side="cols"
    ),
}


def _reference(snr: dict, epochs: int = 3) -> tuple[list[torch.Tensor], list[float]]:
    """One process: each step's 16 sequences as 4 micro-batches of 4 (= the distributed runs'
    global batch), no clipping."""
    model = tiny_gpt2(dropout=0.0)
    # local (also when computed inside a rank of a distributed test)
    opt = SNRAdamW(model.parameters(), lr=1e-2, process_group=None, **snr)
    batches = tokens().split(4)
    losses = []
    for _ in range(epochs):
        for step in range(len(batches) // PARTS):
            opt.zero_grad()
            for b in batches[step * PARTS : (step + 1) * PARTS]:
                loss = model(input_ids=b, labels=b).loss
                (loss / PARTS).backward()
                losses.append(loss.item())
            opt.step()
    return [p.detach().clone() for p in model.parameters()], losses


def _accelerate_env(rank: int, world: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        DS_ACCELERATOR="cpu",
    )


def _group(snr: dict):
    import torch.distributed as dist

    return dist.group.WORLD if snr.get("estimator") == "cross_sample" else "auto"


def _result(model, opt, losses) -> dict:
    view = opt.zero_view
    state = (view.inner if view is not None else opt).state
    return {
        "params": [p.detach().float().clone() for p in model.parameters()],
        "losses": losses,
        "ran": _what_ran(opt.metrics()),
        "distributor": opt.distributor.name,
        "steps": int(max(st["step"].item() for st in state.values())),
    }


def _accelerate_train(accelerator, snr: dict, helper: bool = True) -> dict:
    """3 epochs of the accelerate loop; the optimizer prepared through snr-dist's helper, or
    (``helper=False``) through ``accelerator.prepare`` alone."""
    from snr_dist.integrations import accelerate as snr_accelerate

    model = tiny_gpt2(dropout=0.0)
    opt = SNRAdamW(model.parameters(), lr=1e-2, process_group=_group(snr), **snr)
    loader = torch.utils.data.DataLoader(tokens(), batch_size=4)
    objects = (model, opt, loader)
    if helper:
        pmodel, popt, ploader = snr_accelerate.prepare(accelerator, *objects)
    else:
        pmodel, popt, ploader = accelerator.prepare(*objects)
    return _result(model, opt, _accelerate_loop(accelerator, pmodel, popt, ploader, 3))


def _accelerate_loop(accelerator, model, opt, loader, epochs: int) -> list[float]:
    """The script's loop: ``epochs`` over the loader, accumulation as the Accelerator says."""
    losses = []
    for _ in range(epochs):
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch, labels=batch).loss
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            losses.append(loss.item())
    return losses


def _ddp_worker(rank: int, world: int) -> dict:
    from accelerate import Accelerator

    from snr_dist.integrations import accelerate as snr_accelerate

    _accelerate_env(rank, world)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accelerator.distributed_type == "MULTI_CPU" and accelerator.num_processes == world
    out = {name: _accelerate_train(accelerator, snr) for name, snr in DDP_CONFIGS.items()}
    model = tiny_gpt2()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample", process_group=None)
    try:
        snr_accelerate.prepare(accelerator, model, opt)
    except ValueError as err:
        out["error"] = str(err)
    return out


DS_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0: see docs/integrations/accelerate.md
    "zero_optimization": {"stage": 2},
}


def _ds_worker(rank: int, world: int) -> dict:
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import InitProcessGroupKwargs
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    _accelerate_env(rank, world)
    # what the docs say about clipping: a plugin argument of 0 leaves DeepSpeed's default
    facts = {
        "deepspeed_default": GRADIENT_CLIPPING_DEFAULT,
        "plugin_argument_0": DeepSpeedPlugin(
            zero_stage=2, gradient_clipping=0.0
        ).deepspeed_config.get("gradient_clipping", "absent"),
    }
    plugin = DeepSpeedPlugin(hf_ds_config=dict(DS_CONFIG))
    # on the CPU, accelerate counts the processes only with an explicit backend
    kwargs = dict(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    out = {"facts": facts}
    for name, snr in DS_CONFIGS.items():
        # one Accelerator per DeepSpeed engine (accelerator.backward drives its last one);
        # the first one sets up the shared state, DeepSpeed plugin included
        accelerator = Accelerator(**kwargs)
        kwargs = {}
        assert accelerator.distributed_type == "DEEPSPEED"
        assert accelerator.num_processes == world
        # diagonal temporal runs on ZeRO's flat partitions as is: plain accelerator.prepare
        out[name] = _accelerate_train(accelerator, snr, helper=name != "temporal")
    out["config"] = dict(accelerator.deepspeed_config)
    # without the helper, on ZeRO's flat partitions: subspace (here with cross-sample) has no
    # matrices left, and the first step refuses, naming the fix (before 0.3 subspace temporal
    # ran silently as the diagonal rule)
    try:
        _accelerate_train(Accelerator(), DS_CONFIGS["subspace-cross_sample"], helper=False)
    except Exception as err:  # noqa: BLE001 - reported to the test
        out["no_helper_cross_sample"] = f"{type(err).__name__}: {err}"
    model = tiny_gpt2(dropout=0.0)
    opt = SNRAdamW(model.parameters(), lr=1e-2, mode="subspace", rank=3)
    loader = torch.utils.data.DataLoader(tokens(), batch_size=4)
    accelerator = Accelerator()
    pmodel, _, ploader = accelerator.prepare(model, opt, loader)
    try:
        for batch in ploader:
            with accelerator.accumulate(pmodel):
                accelerator.backward(pmodel(input_ids=batch, labels=batch).loss)
    except RuntimeError as err:
        out["no_helper_subspace"] = str(err)
    return out


def _check_parity(ranks: list[dict], configs: dict) -> None:
    for name, snr in configs.items():
        ref, ref_losses = _reference(snr)
        for out in ranks:
            run = out[name]
            assert run["steps"] == STEPS
            ran = (snr.get("estimator", "temporal"), snr.get("mode", "diagonal"), True)
            assert run["ran"][:-1] == [ran], (name, run["ran"])  # every rank, opt.metrics()
            for p, q in zip(run["params"], ref):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
            losses = run["losses"]
            assert sum(losses[-4:]) < sum(losses[:4]) - 4 * 0.3  # the loss falls
        # the ranks' micro-batches together are the reference's
        mine = sorted(x for out in ranks for x in out[name]["losses"])
        torch.testing.assert_close(mine, sorted(ref_losses), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_accelerate_ddp_equals_one_process():
    """accelerator.prepare(model, opt, loader), DDP on 2 CPU processes (gloo), accumulation 2:
    equal to one process with the global batch as 4 micro-batches (1e-5), diagonal and subspace,
    temporal and cross-sample; cross-sample with an optimizer local to its rank is refused."""
    ranks = run_distributed(_ddp_worker, 2, timeout=240)
    _check_parity(ranks, DDP_CONFIGS)
    assert ranks[0]["temporal"]["distributor"] == "local"
    assert ranks[0]["cross_sample"]["distributor"] == "replicated"
    assert "needs the data-parallel group" in ranks[0]["error"]
    assert "process_group=None" in ranks[0]["error"]


@pytest.mark.slow
def test_accelerate_deepspeed_zero2_equals_one_process():
    """Accelerate's DeepSpeed plugin, ZeRO stage 2 on 2 CPU processes, accumulation 2, no
    clipping: diagonal temporal through plain accelerator.prepare (on ZeRO's flat partitions)
    and subspace cross-sample through snr_dist.integrations.accelerate.prepare (on row shards)
    equal one process with the global batch as 4 micro-batches (1e-5), and the loss falls."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ranks = run_distributed(_ds_worker, 2, timeout=300)
    # accelerate up to 1.15 dropped a falsy gradient_clipping (leaving DeepSpeed's 1.0); 1.16
    # keeps it (the docs say both)
    import accelerate
    from packaging.version import Version

    kept = Version(accelerate.__version__) >= Version("1.16")
    expected = {"deepspeed_default": 1.0, "plugin_argument_0": 0.0 if kept else "absent"}
    assert ranks[0]["facts"] == expected
    config = ranks[0]["config"]
    assert config["zero_optimization"]["stage"] == 2
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.0
    assert config["train_micro_batch_size_per_gpu"] == 4
    _check_parity(ranks, DS_CONFIGS)
    assert ranks[0]["temporal"]["distributor"] == "local"  # elementwise, on the partitions
    assert ranks[0]["subspace-cross_sample"]["distributor"] == "zero"  # row shards
    refused = ranks[0]["no_helper_cross_sample"]
    assert refused.startswith("RuntimeError") and "flat 1-D tensors" in refused
    refused = ranks[0]["no_helper_subspace"]
    assert "flat 1-D tensors" in refused and "snr_dist.integrations.accelerate.prepare" in refused


# ------------------------------------------------------------- framework paths (issue 34)
# Each path either runs what was configured (checked through opt.metrics() on every rank, and
# against the direct snr-dist path) or refuses before the first step, naming the way that works.
ZERO_SUB_X = dict(
    estimator="cross_sample", mode="subspace", rank=3, refresh_every=2, basis_side="cols"
)
FW_STEPS = 4  # optimizer steps of the framework runs: 2 ranks x 4 sequences x accumulation 2


def _ds_json(stage: int, snr: dict | None = None, optimizer_block: bool = True) -> dict:
    """A DeepSpeed config as HF Trainer users write it: "auto" where Trainer fills it in."""
    cfg = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if optimizer_block:
        auto = dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto")
        cfg["optimizer"] = {"type": "AdamW", "params": auto}
    if snr is not None:
        cfg["snr_preconditioner"] = dict(snr)
    return cfg


class _Recorder:
    """Trainer's data collator, recording the batches in the order Trainer consumes them."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, features):
        x = torch.stack([f["input_ids"] for f in features])
        self.batches.append(x)
        return {"input_ids": x, "labels": x}


def _fw_args(out: Path, ds: dict | None, **overrides) -> TrainingArguments:
    kw = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=FW_STEPS,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.01,
        max_grad_norm=0.0,  # clipping rescales after the statistics: off for exact parity
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
        deepspeed=ds,
    )
    kw.update(overrides)
    return TrainingArguments(**kw)


def _run_trainer(cls, out: Path, ds: dict | None, seed: int = 0, snr=None, resume=None, **kw):
    """Train ``cls`` (Trainer or SNRTrainer) on the tiny GPT-2 without dropout; the outcome:
    what ran (through opt.metrics() on this rank), the batches, the parameters, or the error."""
    from deepspeed.utils import safe_get_full_fp32_param

    args = _fw_args(out, ds, **kw)
    record = _Recorder()
    extra = {} if snr is None else {"optimizer_cls_and_kwargs": snr_adamw(args, **snr)}
    trainer = cls(
        model=tiny_gpt2(seed, dropout=0.0),
        args=args,
        train_dataset=TokenData(),
        data_collator=record,
        **extra,
    )
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(err).__name__}: {err}"}
    opt = unwrap(trainer.optimizer)
    inner = getattr(trainer.optimizer, "optimizer", None)
    params = []
    for p in trainer.model.parameters():
        full = safe_get_full_fp32_param(p) if ds is not None else None
        params.append((p if full is None else full).detach().float().clone())
    return {
        "runs": type(getattr(inner, "optimizer", inner)).__name__,
        "metrics": None if opt is None else opt.metrics(),
        "batches": record.batches,
        "params": params,
        "logs": trainer.state.log_history,
        "decay": trainer.get_decay_parameter_names(trainer.model),
    }


def _direct_deepspeed(
    stage: int, snr: dict, batches: list, decay: list[str] | None, steps: int = FW_STEPS
):
    """The direct snr-dist path: snr_dist.deepspeed.initialize with Trainer's two param groups
    (``decay``: the names with weight decay; None: one group), the same micro-batches in the
    same order; full fp32 parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    from snr_dist import deepspeed as snr_ds

    model = tiny_gpt2(0, dropout=0.0)
    named = list(model.named_parameters())
    groups = [p for _, p in named]
    if decay is not None:
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
    cfg = {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "snr_preconditioner": dict(snr),
        "steps_per_print": 10**9,
    }
    engine, opt, _, _ = snr_ds.initialize(model=model, model_parameters=groups, config=cfg)
    # the loss as Trainer computes it: summed over the tokens, divided by the labels of the
    # step on every rank (transformers 5 counts all 16 of a sequence; 15 are predicted), times
    # the ranks (DeepSpeed then averages over them)
    tokens_per_step = 2 * 2 * batches[0].numel()
    for b in batches[: 2 * steps]:
        loss = engine(input_ids=b, labels=b, num_items_in_batch=tokens_per_step).loss * 2
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
    params = []
    for p in model.parameters():
        full = safe_get_full_fp32_param(p)
        params.append((p if full is None else full).detach().float().clone())
    from snr_dist.integrations import telemetry

    client = unwrap(opt)
    scalars = telemetry.scalars(client, telemetry.layer_groups(model))
    engine.destroy()
    return {"params": params, "metrics": client.metrics(), "scalars": scalars}


def _what_ran(metrics: dict | None) -> list[tuple]:
    """(estimator, mode, has a gate mean) per param group, and the distributor."""
    if metrics is None:
        return []
    groups = [
        (g["estimator"], g["mode"], g.get("gate_mean") is not None) for g in metrics["groups"]
    ]
    return groups + [metrics["parallel"]["mode"]]


# the four modes, as each framework test sweeps them (ZeRO 1-3 row shards keep bases on the
# column side, as snr_dist.deepspeed does; the one-process references are told the same)
SUB_COLS = dict(mode="subspace", rank=3, refresh_every=2, basis_side="cols")
FOUR_MODES = {
    "diagonal-temporal": {},
    "diagonal-cross_sample": dict(estimator="cross_sample"),
    "subspace-temporal": SUB_COLS,
    "subspace-cross_sample": ZERO_SUB_X,
}


def _deepspeed_json_worker(rank: int, world: int, tmp: str) -> dict:
    """HF Trainer and Accelerate with the DeepSpeed JSON's blocks, in the same two processes:
    plain Trainer and SNRTrainer at ZeRO-2 (subspace cross-sample, 4 steps), then SNRTrainer and
    Accelerate's plugin with DummyOptim for each ZeRO stage 1-3 and mode."""
    _accelerate_env(rank, world)
    out: dict = {}
    tmp = Path(tmp)
    ds = _ds_json(2, ZERO_SUB_X)
    # plain Trainer: the JSON's "optimizer" block made it drop snr_adamw before issue 34
    out["plain"] = _run_trainer(Trainer, tmp / f"plain{rank}", ds, snr={})
    out["accelerate"] = _accelerate_json(ZERO_SUB_X)
    SNRTrainer = _snr_trainer()
    if SNRTrainer is None:
        return out
    out["snr_trainer"] = run = _run_trainer(SNRTrainer, tmp / f"snr{rank}", _ds_json(2, ZERO_SUB_X))
    if "error" not in run:
        out["direct"] = _direct_deepspeed(2, ZERO_SUB_X, run["batches"], run["decay"])
    out["sweep"] = {}
    for stage in (1, 2, 3):
        for name, snr in FOUR_MODES.items():
            cfg = _ds_json(stage, snr)
            run = _run_trainer(SNRTrainer, tmp / f"s{rank}", cfg, max_steps=2)
            cell = {"trainer": _what_ran(run.get("metrics")), "error": run.get("error")}
            if "error" not in run:
                direct = _direct_deepspeed(stage, snr, run["batches"], run["decay"], steps=2)
                cell["apart"] = max(
                    (p - q).abs().max().item() for p, q in zip(run["params"], direct["params"])
                )
            cell["accelerate"] = _accelerate_json(snr, stage, 1, names=("dummy",))["dummy"]
            out["sweep"][stage, name] = cell
    return out


def _snr_trainer():
    """SNRTrainer (None before issue 34, so that the old paths' results still come back)."""
    try:
        from snr_dist.integrations.transformers import SNRTrainer
    except ImportError:
        return None
    return SNRTrainer


def _accelerate_json(snr: dict, stage: int = 2, epochs: int = 3, names=("dummy", "conflict")):
    """Accelerate's DeepSpeed plugin with the blocks in its config: a DummyOptim (the optimizer
    from the config) becomes SNRAdamW; an SNRAdamW that runs other options is refused."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DummyOptim, InitProcessGroupKwargs

    from snr_dist.integrations import accelerate as snr_accelerate

    out = {}
    for name in names:
        cfg = copy.deepcopy(DS_CONFIG) | {"snr_preconditioner": dict(snr)}
        cfg["zero_optimization"]["stage"] = stage
        if name == "dummy":
            cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
        AcceleratorState._reset_state(True)  # a new plugin (the Trainers set up theirs)
        accelerator = Accelerator(
            deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=cfg),
            kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
        )
        model = tiny_gpt2(dropout=0.0)
        if name == "dummy":
            opt = DummyOptim(model.parameters(), lr=1e-2, weight_decay=0.01)
        else:
            opt = SNRAdamW(model.parameters(), lr=1e-2)  # the default: diagonal, temporal
        loader = torch.utils.data.DataLoader(tokens(), batch_size=4)
        try:
            pmodel, popt, ploader = snr_accelerate.prepare(accelerator, model, opt, loader)
            losses = _accelerate_loop(accelerator, pmodel, popt, ploader, epochs)
        except Exception as err:  # noqa: BLE001 - reported to the test
            out[name] = {"error": f"{type(err).__name__}: {err}"}
            continue
        snr_opt = unwrap(popt)
        inner = getattr(popt, "optimizer", None)
        if epochs < 3:  # a sweep: checked against the reference here, in the worker
            ref, _ = _reference(snr, epochs)
            apart = max((p - q).abs().max().item() for p, q in zip(model.parameters(), ref))
            out[name] = {"ran": _what_ran(unwrap(popt).metrics()), "apart": apart}
            continue
        out[name] = {
            "runs": type(getattr(inner, "optimizer", inner)).__name__,
            "params": [p.detach().float().clone() for p in model.parameters()],
            "losses": losses,
            "metrics": None if snr_opt is None else snr_opt.metrics(),
        }
    return out


@pytest.mark.slow
def test_deepspeed_json_configures_snr_through_trainer_and_accelerate(tmp_path):
    """Issue 34.1: with the JSON's "optimizer" block, plain Trainer dropped
    optimizer_cls_and_kwargs=snr_adamw(args) for DeepSpeed's own Adam, and Trainer and
    Accelerate never read the "snr_preconditioner" block. Now plain Trainer refuses before the
    first step, naming SNRTrainer; SNRTrainer and Accelerate's plugin (with DummyOptim) run the
    block's subspace cross-sample SNRAdamW on row shards, seen on every rank through
    opt.metrics(), equal to the direct snr-dist path; an SNRAdamW with other options than the
    block's is refused."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ranks = run_distributed(_deepspeed_json_worker, 2, str(tmp_path), timeout=600)
    asked = [("cross_sample", "subspace", True)] * 2 + ["zero"]
    for out in ranks:
        plain = out["plain"]
        assert "error" in plain, (
            f"plain Trainer ran {plain.get('runs')}: {_what_ran(plain.get('metrics'))}"
        )
        assert plain["error"].startswith("RuntimeError") and "SNRTrainer" in plain["error"]
        assert "ZeRO stage 2" in plain["error"]
        acc = out["accelerate"]
        dummy = acc["dummy"]
        assert "error" not in dummy, dummy.get("error")
        assert dummy["runs"] == "SNRAdamW", f"DummyOptim ran {dummy['runs']}"
        assert _what_ran(dummy["metrics"]) == [("cross_sample", "subspace", True), "zero"]
        conflict = acc["conflict"]
        assert "error" in conflict, f"ran {_what_ran(conflict.get('metrics'))}"
        assert "snr_preconditioner.estimator = 'cross_sample'" in conflict["error"]
        assert "DummyOptim" in conflict["error"]
        run = out["snr_trainer"]
        assert "error" not in run, run.get("error")
        assert run["runs"] == "SNRAdamW"
        assert _what_ran(run["metrics"]) == asked
        for p, q in zip(run["params"], out["direct"]["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        assert _what_ran(out["direct"]["metrics"]) == asked
        for (stage, name), cell in out["sweep"].items():
            estimator, mode = name.split("-")[::-1]
            rows = "local" if name == "diagonal-temporal" else "zero"
            assert cell["error"] is None, (stage, name, cell["error"])
            assert cell["trainer"] == [(estimator, mode, True)] * 2 + [rows], (stage, name)
            assert cell["apart"] <= 1e-5, (stage, name, cell["apart"])
            acc = cell["accelerate"]
            assert "error" not in acc, (stage, name, acc.get("error"))
            assert acc["ran"] == [(estimator, mode, True), rows], (stage, name)
            assert acc["apart"] <= 1e-5, (stage, name, acc["apart"])
    ref, _ = _reference(ZERO_SUB_X)
    for out in ranks:
        for p, q in zip(out["accelerate"]["dummy"]["params"], ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def _zero3_telemetry_worker(rank: int, world: int, tmp: str) -> dict:
    """ZeRO-3, diagonal temporal SNRAdamW: plain Trainer with snr_adamw(args) and the telemetry
    callback, then snr_dist.deepspeed.initialize with Trainer's two param groups and with one."""
    _accelerate_env(rank, world)
    ds = _ds_json(3, optimizer_block=False)
    args = _fw_args(Path(tmp) / f"z3{rank}", ds)
    record = _Recorder()
    trainer = Trainer(
        model=tiny_gpt2(0, dropout=0.0),
        args=args,
        train_dataset=TokenData(),
        data_collator=record,
        optimizer_cls_and_kwargs=snr_adamw(args),
    )
    add_snr_metrics(trainer)
    trainer.train()
    decay = trainer.get_decay_parameter_names(trainer.model)
    logged = [sorted(k for k in h if k.startswith("snr/")) for h in trainer.state.log_history]
    out = {"trainer": unwrap(trainer.optimizer).metrics(), "logged": logged}
    out["two_groups"] = _direct_deepspeed(3, {}, record.batches, decay)
    out["one_group"] = _direct_deepspeed(3, {}, record.batches, None)
    return out


@pytest.mark.slow
def test_zero3_telemetry_for_any_number_of_param_groups(tmp_path):
    """Issue 34.2: ZeRO-3 puts its flat partitions in the client optimizer's param groups only
    during step(); opt.metrics() had no gate mean for Trainer's two groups (nor for two groups
    through snr_dist.deepspeed.initialize), no snr/ key was logged, and with one group the
    telemetry scalars were empty. Now each partition is reported under its group, on every
    rank, and the telemetry reaches Trainer's logs."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ranks = run_distributed(_zero3_telemetry_worker, 2, str(tmp_path), timeout=600)
    for out in ranks:
        assert _what_ran(out["trainer"]) == [("temporal", "diagonal", True)] * 2 + ["local"]
        for entry in out["logged"][:FW_STEPS]:  # each step's log (the summary has none)
            assert "snr/all/gate_mean" in entry, out["logged"]
        for name in ("two_groups", "one_group"):
            direct = out[name]
            groups = 2 if name == "two_groups" else 1
            assert _what_ran(direct["metrics"]) == [("temporal", "diagonal", True)] * groups + [
                "local"
            ]
            assert 0.0 <= direct["scalars"]["snr/all/gate_mean"] <= 1.0, direct["scalars"]


def _ranks_apart(model) -> float:
    """The largest difference between this rank's parameters and the other rank's."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    both = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(both, flat)
    return (both[0] - both[1]).abs().max().item()


def _ddp_trainer(out: Path, **trainer_kwargs) -> dict:
    """12 steps of Trainer's DDP (2 CPU processes, gloo, accumulation 2) on the tiny GPT-2."""
    # no weight decay: Trainer's two groups then run the one group built by hand
    args = _fw_args(out, None, max_steps=12, ddp_backend="gloo", weight_decay=0.0)
    model = trainer_kwargs.pop("model", None) or tiny_gpt2(0, dropout=0.0)
    if "snr" in trainer_kwargs:
        trainer_kwargs["optimizer_cls_and_kwargs"] = snr_adamw(args, **trainer_kwargs.pop("snr"))
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), **trainer_kwargs)
    try:
        trainer.train()
        error = None
    except Exception as err:  # noqa: BLE001 - reported to the test
        error = f"{type(err).__name__}: {err}"
    opt = unwrap(trainer.optimizer)
    return {
        "error": error,
        "apart": _ranks_apart(trainer.model),
        "metrics": None if opt is None or error else opt.metrics(),
        "losses": _losses(trainer),
        "params": [p.detach().clone() for p in trainer.model.parameters()],
    }


def _before_init_worker(rank: int, world: int, tmp: str) -> dict:
    """SNRAdamW(estimator="cross_sample") built before torch.distributed started (process_group
    "auto", and dist.group.WORLD, which is None then), handed to Trainer's DDP; then the paths
    that build it after: snr_adamw(args, ...) and an explicit group."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    tmp = Path(tmp)
    early = {}
    for name, group in (("auto", "auto"), ("world", dist.group.WORLD)):
        model = tiny_gpt2(0, dropout=0.0)
        opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample", process_group=group)
        early[name] = (model, opt)
    out = {}
    for name, (model, opt) in early.items():  # Trainer starts torch.distributed
        out[name] = _ddp_trainer(tmp / f"{name}{rank}", model=model, optimizers=(opt, None))
    for name, snr in FOUR_MODES.items():  # the paths that work, in each mode
        snr = {k: v for k, v in snr.items() if k != "basis_side"}
        good = _ddp_trainer(tmp / f"cls{rank}", snr=snr)
        model = tiny_gpt2(0, dropout=0.0)
        # Trainer's two param groups, in its order (a tracker's seed follows its position)
        decay = Trainer.get_decay_parameter_names(None, model)
        named = list(model.named_parameters())
        groups = [[p for n, p in named if n in decay], [p for n, p in named if n not in decay]]
        group = dist.group.WORLD if snr.get("estimator") == "cross_sample" else "auto"
        opt = SNRAdamW(
            [{"params": g} for g in groups],
            lr=1e-2,
            weight_decay=0.0,
            process_group=group,
            **snr,
        )
        explicit = _ddp_trainer(tmp / f"exp{rank}", model=model, optimizers=(opt, None))
        out[name] = (good, explicit)
    return out


@pytest.mark.slow
def test_cross_sample_built_before_the_process_group_is_refused_or_resolved(tmp_path):
    """Issue 34.3: Trainer(optimizers=(SNRAdamW(..., estimator="cross_sample"), None)) with the
    optimizer built before torch.distributed started ran it local to each rank ("auto" could
    not ask for the group, dist.group.WORLD was None), and the DDP replicas drifted apart. Now
    its first step refuses, naming the way that works; snr_adamw(args, ...) resolves the group
    when Trainer builds the optimizer, and equals an optimizer built with the group."""
    ranks = run_distributed(_before_init_worker, 2, str(tmp_path), timeout=600, init=False)
    for out in ranks:
        for name in ("auto", "world"):
            run = out[name]
            assert run["error"] is not None, f"{name}: trained, ranks apart by {run['apart']}"
            assert run["error"].startswith("ValueError")
            assert "built before torch.distributed was initialised" in run["error"]
            assert "snr_adamw(args, estimator='cross_sample')" in run["error"]
            assert run["losses"] == []  # refused at the first step
        for name in FOUR_MODES:
            good, explicit = out[name]
            assert good["error"] is None and explicit["error"] is None, name
            assert good["apart"] == 0.0 and explicit["apart"] == 0.0, name
            estimator, mode = name.split("-")[::-1]
            group = "replicated" if estimator == "cross_sample" else "local"
            assert _what_ran(good["metrics"]) == [(estimator, mode, True)] * 2 + [group], name
            torch.testing.assert_close(good["losses"], explicit["losses"], rtol=0, atol=1e-5)
            for p, q in zip(good["params"], explicit["params"]):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def _zero_cross_sample_worker(rank: int, world: int, tmp: str) -> dict:
    """ZeRO-2, the cross-sample estimator with accumulation 2 (no blocks in the JSON): plain
    Trainer, SNRTrainer stopped at step 2 and resumed in a new one, and accelerator.prepare
    without snr-dist's helper."""
    import torch.distributed as dist
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import InitProcessGroupKwargs

    _accelerate_env(rank, world)
    tmp = Path(tmp)
    ds = _ds_json(2, optimizer_block=False)
    cross = dict(estimator="cross_sample")
    # with the group, as the docs said before issue 34
    explicit = dict(cross, process_group=dist.group.WORLD)
    out = {"plain": _run_trainer(Trainer, tmp / f"plain{rank}", ds, snr=explicit)}
    SNRTrainer = _snr_trainer()
    if SNRTrainer is not None:
        kw = dict(snr=cross, save_strategy="steps", save_steps=2)
        out["full"] = _run_trainer(SNRTrainer, tmp / "full", ds, **kw)
        resume = str(tmp / "full" / "checkpoint-2")
        out["resumed"] = _run_trainer(SNRTrainer, tmp / f"r{rank}", ds, 1, resume=resume, **kw)
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(
        deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=copy.deepcopy(DS_CONFIG)),
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
    )
    try:
        _accelerate_train(accelerator, cross, helper=False)
    except RuntimeError as err:
        out["prepare_alone"] = str(err)
    return out


@pytest.mark.slow
def test_zero_cross_sample_through_trainer_resumes_and_refusals_name_the_way(tmp_path):
    """Issue 34.5: under ZeRO the cross-sample estimator failed with "saw 0 ... run several
    backward passes", naming neither ZeRO nor a fix a Trainer user can call, and a hand-made
    attach in on_train_begin lost the resume. Now plain Trainer refuses before the first step
    naming SNRTrainer; SNRTrainer runs it on row shards (opt.metrics() on every rank) and a run
    resumed from its step-2 checkpoint ends where the uninterrupted one does; without the
    helper the first step names ZeRO and the ways that work."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    ranks = run_distributed(_zero_cross_sample_worker, 2, str(tmp_path), timeout=600)
    for out in ranks:
        plain = out["plain"]
        assert "error" in plain, f"plain Trainer ran {_what_ran(plain.get('metrics'))}"
        assert "estimator='cross_sample' under DeepSpeed ZeRO stage 2" in plain["error"]
        assert "SNRTrainer" in plain["error"]
        alone = out["prepare_alone"]
        assert "DeepSpeed ZeRO" in alone and "flat partitions" in alone
        for way in ("snr_dist.integrations.accelerate.prepare", "SNRTrainer", "attach_zero"):
            assert way in alone, alone
        full, resumed = out["full"], out["resumed"]
        assert "error" not in full, full.get("error")
        assert "error" not in resumed, resumed.get("error")
        ran = [("cross_sample", "diagonal", True)] * 2 + ["zero"]
        assert _what_ran(full["metrics"]) == _what_ran(resumed["metrics"]) == ran
        for p, q in zip(full["params"], resumed["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------- docs
def _example(page: str) -> str:
    """The python block under the page's "## A complete example" heading."""
    text = (DOCS / page).read_text()
    section = text.split("## A complete example", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"{page}: no python block under '## A complete example'"
    return match.group(1)


def _run(cmd: list[str], cwd: Path, timeout: float) -> str:
    # the installed package, as users run it: the checkout's root is not put on sys.path
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout


def test_docs_huggingface_example_runs(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    script = tmp_path / "train.py"
    script.write_text(_example("huggingface.md"))
    out = _run([sys.executable, str(script)], tmp_path, timeout=300)
    first, last = (float(x) for x in re.search(r"loss (\S+) -> (\S+)", out).groups())
    assert last < first
    gate = float(re.search(r"snr/all/gate_mean (\S+)", out).group(1))
    assert 0.0 <= gate <= 1.0
    assert list(tmp_path.rglob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddp", "deepspeed"])
def test_docs_accelerate_example_runs(tmp_path, variant):
    if variant == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    script = tmp_path / "train.py"
    script.write_text(_example("accelerate.md"))
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(script)]
    if variant == "deepspeed":
        cmd.append("--deepspeed")
    out = _run(cmd, tmp_path, timeout=300)
    first, last = (float(x) for x in re.search(r"loss (\S+) -> (\S+)", out).groups())
    assert last < first


# ------------------------------------------------------------------ the validation-free stop
def _stop_trainer(out: Path, seed: int = 0, resume_from=None, **stop) -> tuple[Trainer, object]:
    from snr_dist.integrations.transformers import add_stop_monitor

    model = tiny_gpt2(seed)
    args = _args(out, max_steps=12, save_strategy="steps", save_steps=6, bf16=False)
    base = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), optimizers=(base, None))
    cb = add_stop_monitor(trainer, check_every=1, min_steps=0, resume_from=resume_from, **stop)
    return trainer, cb


def test_stop_monitor_stops_a_trainer_and_resumes_its_reading(tmp_path):
    """Any optimizer (here torch's AdamW, behind Accelerate's wrapper): the reading reaches the
    logs, resume from a checkpoint reads what the uninterrupted run reads, and a rule that
    fires ends the run early."""
    full, cb = _stop_trainer(tmp_path / "full", threshold=-1.0)  # never fires
    full.train()
    assert full.state.global_step == 12 and cb.monitor.step == 12
    assert any("stop/ratio" in h for h in full.state.log_history)
    assert (tmp_path / "full" / "checkpoint-6" / "stop-monitor.rank0.pt").is_file()
    checkpoint = tmp_path / "full" / "checkpoint-6"
    resumed, cb2 = _stop_trainer(tmp_path / "resumed", 1, checkpoint, threshold=-1.0)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert cb2.monitor.read() == cb.monitor.read()
    stopped, cb3 = _stop_trainer(tmp_path / "stopped", threshold=1e9, patience=2)  # fires
    stopped.train()
    assert cb3.monitor.stop_step == 4  # the first reading (step 2: one pair) + 2 steps
    assert stopped.state.global_step == 4
    assert any(h.get("stop/step") == 4 for h in stopped.state.log_history)
