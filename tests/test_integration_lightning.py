"""Lightning integration: SNRAdamW under Lightning's real training loop (automatic
optimization, gradient accumulation and clipping, checkpoint resume, DDP) and
`SNRMetricsCallback` writing real TensorBoard and CSV logs. A 2-layer GPT-2 learns arithmetic
token sequences on the CPU; nothing is mocked."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from distributed_utils import run_distributed

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.core.optimizer import LightningOptimizer  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from snr_dist import SNRAdamW, SNRPreconditioner  # noqa: E402
from snr_dist.integrations import telemetry  # noqa: E402
from snr_dist.integrations.lightning import SNRMetricsCallback, unwrap  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "integrations" / "lightning.md"
VOCAB, SEQ = 64, 16
KEYS = telemetry.KEYS


def sequences(n: int, seed: int = 0) -> torch.Tensor:
    """``start + k * stride (mod VOCAB)``: learnable from the first two tokens."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def gpt2(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,  # no dropout: runs compare bit for bit
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model(input_ids=batch, labels=batch).loss


class TinyGPT(pl.LightningModule):
    """Returns SNRAdamW (``snr`` options), optionally with a step-interval StepLR."""

    def __init__(self, seed: int = 0, scheduler: bool = False, optimizer=None, **snr) -> None:
        super().__init__()
        self.model = gpt2(seed)
        self.snr, self.scheduler, self.optimizer_cls = snr, scheduler, optimizer
        self.losses: list[float] = []
        self.norms: list[tuple[float, float]] = []  # (before, after) gradient clipping

    def training_step(self, batch, batch_idx):
        loss = lm_loss(self.model, batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        if self.optimizer_cls is not None:
            return self.optimizer_cls(self.parameters(), lr=3e-3)
        opt = SNRAdamW(self.parameters(), lr=3e-3, **self.snr)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        assert isinstance(unwrap(optimizer), SNRAdamW)
        before = _grad_norm(self)
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.norms.append((before, _grad_norm(self)))


def _grad_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()


class ResumableBatches:
    """Consecutive batches of ``data`` whose position survives a checkpoint: Lightning saves
    and restores a training loader that has ``state_dict`` / ``load_state_dict``."""

    def __init__(self, data: torch.Tensor, batch_size: int) -> None:
        self.data, self.batch_size, self.pos = data, batch_size, 0

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def __iter__(self):
        while self.pos < len(self):
            i, self.pos = self.pos, self.pos + 1
            yield self.data[i * self.batch_size : (i + 1) * self.batch_size]
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def trainer(**kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kw})


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=".*dirpath has changed.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        yield


# ---------------------------------------------------------------- the training loop


@pytest.mark.parametrize("estimator", ["temporal", "cross_sample"])
def test_accumulation_and_clipping_equal_a_plain_loop(estimator):
    """Lightning's closure, accumulation (loss / 2 per micro-batch) and clipping (inside the
    closure, before the step) feed SNRAdamW exactly what a hand-written loop does."""
    data, steps, clip = sequences(128), 8, 0.5  # one epoch: 16 batches of 8
    module = TinyGPT(estimator=estimator)
    reference = copy.deepcopy(module.model)
    trainer(max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=clip).fit(
        module, torch.utils.data.DataLoader(data, batch_size=8)
    )
    opt = SNRAdamW(reference.parameters(), lr=3e-3, estimator=estimator)
    batches = data.split(8)
    for s in range(steps):
        opt.zero_grad()
        for batch in batches[2 * s : 2 * s + 2]:
            (lm_loss(reference, batch) / 2).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        opt.step()
    assert max_diff(module.model, reference) < 1e-6
    before = [b for b, _ in module.norms]
    after = [a for _, a in module.norms]
    assert len(module.norms) == steps
    assert max(before) > clip, before  # clipping did something ...
    assert all(a <= clip * (1 + 1e-5) for a in after), after  # ... and held the norm
    assert module.losses[-1] < module.losses[0]


@pytest.mark.parametrize(
    ("estimator", "ckpt_step", "loader"),
    [
        ("temporal", 3, "resumable"),  # mid-epoch: 4 optimizer steps per epoch
        ("cross_sample", 3, "resumable"),
        ("cross_sample", 4, "plain"),  # the end of the first epoch, a plain DataLoader
    ],
)
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, estimator, ckpt_step, loader):
    """fit(ckpt_path=...) from a mid-run checkpoint ends where the uninterrupted run ends:
    optimizer state (Adam's and the SNR statistics), scheduler, loop and data position."""
    data = sequences(64)  # 8 batches of 8: 4 optimizer steps per epoch with accumulation 2

    def loader_():
        if loader == "resumable":
            return ResumableBatches(data, 8)
        return torch.utils.data.DataLoader(data, batch_size=8)

    def run(module, ckpt_path=None, folder="resumed"):
        t = trainer(
            max_steps=12,
            accumulate_grad_batches=2,
            gradient_clip_val=0.5,
            enable_checkpointing=True,
            callbacks=[
                ModelCheckpoint(
                    dirpath=tmp_path / folder,
                    every_n_train_steps=1,
                    save_top_k=-1,
                    filename="{step}",
                )
            ],
        )
        t.fit(module, loader_(), ckpt_path=ckpt_path)
        return t

    full = TinyGPT(seed=0, scheduler=True, estimator=estimator)
    t_full = run(full, folder="full")
    ckpt = tmp_path / "full" / f"step={ckpt_step}.ckpt"
    assert ckpt.exists(), sorted(os.listdir(tmp_path / "full"))

    resumed = TinyGPT(seed=1, scheduler=True, estimator=estimator)  # other initial weights
    assert max_diff(full, resumed) > 1e-2
    t_resumed = run(resumed, ckpt_path=ckpt)
    assert t_resumed.global_step == 12
    assert len(resumed.losses) == 2 * (12 - ckpt_step)  # only the missing micro-batches ran
    assert resumed.losses == pytest.approx(full.losses[2 * ckpt_step :], abs=1e-5)
    assert max_diff(full, resumed) < 1e-5
    lr = [t.optimizers[0].param_groups[0]["lr"] for t in (t_full, t_resumed)]
    assert lr[0] == lr[1] == pytest.approx(3e-3 * 0.5**4)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    kinds = set(saved["state"][0])
    assert {"step", "exp_avg", "exp_avg_sq"} < kinds  # Adam's state and the SNR statistics

    class ForgetOptimizerState(TinyGPT):
        def on_load_checkpoint(self, checkpoint):
            checkpoint["optimizer_states"][0]["state"] = {}

    control = ForgetOptimizerState(seed=1, scheduler=True, estimator=estimator)
    run(control, ckpt_path=ckpt, folder="control")
    assert max_diff(full, control) > 1e-3  # the equality above needs the optimizer state


def test_plain_dataloader_mid_epoch_restarts_the_epoch(tmp_path):
    """The limit the docs state: mid-epoch, a plain DataLoader's position is not saved;
    Lightning warns and the resumed run sees other batches."""
    data = sequences(64)
    full, resumed = TinyGPT(seed=0), TinyGPT(seed=1)
    kw = dict(max_steps=6, accumulate_grad_batches=2, enable_checkpointing=True)
    save = ModelCheckpoint(
        dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    trainer(callbacks=[save], **kw).fit(full, torch.utils.data.DataLoader(data, batch_size=8))
    again = ModelCheckpoint(
        dirpath=tmp_path / "resumed", every_n_train_steps=3, save_top_k=-1, filename="{step}"
    )
    with pytest.warns(UserWarning, match="not resumable"):
        trainer(callbacks=[again], **kw).fit(
            resumed,
            torch.utils.data.DataLoader(data, batch_size=8),
            ckpt_path=tmp_path / "step=3.ckpt",
        )
    assert max_diff(full, resumed) > 1e-3


def test_cross_sample_needs_accumulation_under_lightning():
    """Each backward is one micro-batch of the cross-sample estimator: with accumulation 2 it
    trains; with 1 the first step stops with snr-dist's message."""
    data = torch.utils.data.DataLoader(sequences(256), batch_size=8, shuffle=False)
    module = TinyGPT(estimator="cross_sample")
    trainer(max_steps=40, accumulate_grad_batches=2).fit(module, data)
    first, last = module.losses[:4], module.losses[-4:]
    assert sum(last) / 4 < sum(first) / 4 - 0.5, (first, last)

    single = TinyGPT(estimator="cross_sample")
    with pytest.raises(RuntimeError, match="needs >= 2 gradient contributions per step"):
        trainer(max_steps=2).fit(single, data)


class _UnfreezeEmbeddings(pl.callbacks.BaseFinetuning):
    """Lightning's gradual unfreezing: the token embedding is frozen before training and
    unfrozen at epoch 1; the optimizer already holds it, so Lightning only sets requires_grad."""

    def freeze_before_training(self, pl_module):
        self.freeze(pl_module.model.transformer.wte)

    def finetune_function(self, pl_module, epoch, optimizer):
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.model.transformer.wte, optimizer)


@pytest.mark.filterwarnings("ignore:The provided params to be frozen already exist")
def test_cross_sample_with_epoch_remainders_and_gradual_unfreezing():
    """Epochs of 5 batches with accumulation 2 end in a window of 1 (Lightning steps on it:
    the statistics carry over), and BaseFinetuning's unfreezing at epoch 1 reaches the
    optimizer: the embedding trains from then on, observed from its first step."""
    data = torch.utils.data.DataLoader(sequences(40), batch_size=8, shuffle=False)
    module = TinyGPT(estimator="cross_sample")
    wte = module.model.transformer.wte.weight
    start = wte.detach().clone()
    seen_at_epoch_1: list[float] = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                assert torch.equal(wte, start)  # frozen
            elif not seen_at_epoch_1:
                state = unwrap(trainer.optimizers[0]).state[wte]
                seen_at_epoch_1.append(float(state["var_avg"].abs().sum()))

    callbacks = [_UnfreezeEmbeddings(), Watch()]
    run = trainer(max_epochs=3, accumulate_grad_batches=2, callbacks=callbacks)
    with pytest.warns(UserWarning, match="fewer than 2 micro-batch") as caught:
        run.fit(module, data)
    assert not [w for w in caught if "became trainable" in str(w.message)]
    assert run.global_step == 9  # 3 per epoch: windows of 2, 2 and 1
    assert seen_at_epoch_1 and seen_at_epoch_1[0] > 0
    assert not torch.equal(wte, start)
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---------------------------------------------------------------- telemetry


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("mode", ["diagonal", "subspace"])
def test_metrics_callback_logs_to_tensorboard_and_csv(tmp_path, mode):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv_logger = CSVLogger(tmp_path, name="csv")
    module = TinyGPT(mode=mode, rank=4, refresh_every=2)
    t = trainer(
        max_steps=6,
        accumulate_grad_batches=2,
        logger=[tb, csv_logger],
        callbacks=[SNRMetricsCallback(every_n_steps=2)],
        log_every_n_steps=50,  # the callback logs on its own schedule, not Lightning's
    )
    t.fit(module, torch.utils.data.DataLoader(sequences(128), batch_size=8))

    opt = module.optimizers()  # a LightningOptimizer, posing as a subclass of SNRAdamW
    assert isinstance(opt, LightningOptimizer) and isinstance(opt, SNRAdamW)
    assert type(t.optimizers[0]) is SNRAdamW and unwrap(opt) is t.optimizers[0]
    groups = telemetry.layer_groups(module)
    final = telemetry.scalars(t.optimizers[0], groups)
    layer_names = set(groups.values()) | {"all"}
    assert "model.transformer.h.1.mlp.c_fc" in layer_names

    scalars = _tensorboard_scalars(Path(tb.log_dir))
    snr_tags = {tag for tag in scalars if tag.startswith("snr/")}
    assert snr_tags == {f"snr/{name}/{k}" for name in layer_names for k in KEYS}
    for tag in snr_tags:
        steps = [s for s, _ in scalars[tag]]
        values = [v for _, v in scalars[tag]]
        assert steps == [2, 4, 6], (tag, steps)  # per optimizer step, not per micro-batch
        assert all(math.isfinite(v) for v in values), (tag, values)
        assert values[-1] == pytest.approx(final[tag], rel=1e-5, abs=1e-6)  # fp32 in the file
    for name in layer_names:
        last = {k: scalars[f"snr/{name}/{k}"][-1][1] for k in KEYS}
        assert 0.0 <= last["gate_mean"] <= 1.0 and 0.0 <= last["closed_frac"] <= 1.0
        assert last["snr_q10"] <= last["snr_q50"] * (1 + 1e-6) + 1e-9
        assert last["snr_q50"] <= last["snr_q90"] * (1 + 1e-6) + 1e-9
    assert final["snr/all/gate_mean"] < 1.0  # the gate acted

    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("snr/all/gate_mean")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert float(rows[-1]["snr/all/gate_mean"]) == pytest.approx(final["snr/all/gate_mean"])


def test_metrics_callback_refuses_what_it_cannot_log():
    with pytest.raises(ValueError, match="every_n_steps must be an int >= 1, got 0"):
        SNRMetricsCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="every_n_steps must be an int >= 1, got 2.5"):
        SNRMetricsCallback(every_n_steps=2.5)
    module = TinyGPT(optimizer=torch.optim.AdamW)
    t = trainer(max_steps=1, callbacks=[SNRMetricsCallback(every_n_steps=1)])
    with pytest.raises(ValueError, match=r"no SNRAdamW or SNRPreconditioner .*\['AdamW'\]"):
        t.fit(module, torch.utils.data.DataLoader(sequences(16), batch_size=8))


def test_unwrap_finds_the_snr_optimizer_and_nothing_else():
    w = torch.nn.Parameter(torch.zeros(3))
    pre = SNRPreconditioner(torch.optim.SGD([w], lr=0.1))
    assert unwrap(pre) is pre  # not its base optimizer
    assert unwrap(torch.optim.SGD([w], lr=0.1)) is None
    assert unwrap(None) is None


# ---------------------------------------------------------------- docs and DDP


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


# Set by a launcher, these would tell Lightning that the processes already exist.
_LAUNCH_VARS = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def _run_script(path: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS},
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    proc = subprocess.run(
        [sys.executable, str(path)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.mark.slow
def test_docs_example_runs(tmp_path):
    """The page's example, as written except for its step count."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    blocks = _python_blocks(DOC.read_text())
    assert len(blocks) == 1, f"{DOC} should hold exactly one python block, found {len(blocks)}"
    code, n = re.subn(r"^MAX_STEPS = \d+$", "MAX_STEPS = 20", blocks[0], flags=re.M)
    assert n == 1, "the example must set MAX_STEPS = <int> on a line of its own"
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = _run_script(script, tmp_path, timeout=240)
    assert re.search(r"final train_loss \d+\.\d+", proc.stdout), proc.stdout[-2000:]
    scalars = _tensorboard_scalars(tmp_path / "logs" / "tiny_gpt" / "version_0")
    assert [s for s, _ in scalars["snr/all/gate_mean"]] == [10, 20]
    loss = [v for _, v in scalars["train_loss"]]
    assert loss[-1] < loss[0], loss
    assert (tmp_path / "logs" / "tiny_gpt" / "version_1" / "metrics.csv").exists()


DDP_SCRIPT = """
import json, sys
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
sys.path.insert(0, {tests!r})
from test_integration_lightning import TinyGPT, sequences, trainer
from snr_dist import SNRAdamW
from snr_dist.integrations.lightning import SNRMetricsCallback

SUB = dict(mode="subspace", rank=3, refresh_every=4, basis_side="cols")  # FSDP2: column side
MODES = {{
    "cross_sample": dict(estimator="cross_sample"),
    "temporal": dict(),
    "subspace-temporal": SUB,
    "subspace-cross_sample": dict(SUB, estimator="cross_sample"),
}}

class DDPGPT(TinyGPT):
    def configure_optimizers(self):
        group = dist.group.WORLD if self.snr.get("estimator") == "cross_sample" else "auto"
        return SNRAdamW(self.parameters(), lr=3e-3, process_group=group, **self.snr)

class FSDP2GPT(TinyGPT):
    # ModelParallelStrategy: configure_model shards, configure_optimizers then sees DTensors
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def configure_optimizers(self):
        opt = SNRAdamW(self.parameters(), lr=3e-3, **self.snr)
        if self.snr.get("estimator") == "cross_sample":
            opt.attach_fsdp(self)  # each rank's own gradient, on FSDP2's unsharded parameters
        return opt

def full(module):
    return torch.cat([getattr(p, "full_tensor", lambda: p)().detach().reshape(-1)
                      for p in module.parameters()])

if __name__ == "__main__":
    out = {{}}
    for name, snr in MODES.items():  # one Lightning run after the other, DDP then FSDP2
        first = name == "cross_sample"
        for kind, cls in (("ddp", DDPGPT), ("fsdp2", FSDP2GPT)):
            module = cls(**snr)
            log = first and kind == "ddp"
            strategy = "ddp" if kind == "ddp" else ModelParallelStrategy(
                data_parallel_size=2, tensor_parallel_size=1)
            t = trainer(strategy=strategy, devices=2, max_steps=15,
                        logger=CSVLogger("logs") if log else False,
                        callbacks=[SNRMetricsCallback(every_n_steps=5)] if log else [])
            t.fit(module, torch.utils.data.DataLoader(sequences(256), batch_size=8))
            flat = full(module)
            gathered = [torch.zeros_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            metrics = t.optimizers[0].metrics()
            out[name + "/" + kind] = dict(
                world=t.optimizers[0].distributor.world, losses=module.losses,
                ranks_differ=(gathered[0] - gathered[1]).abs().max().item(),
                ran=[(g["estimator"], g["mode"]) for g in metrics["groups"]],
                distributor=metrics["parallel"]["mode"], params=flat.tolist())
    with open(f"ddp_rank{{t.global_rank}}.json", "w") as f:
        json.dump(out, f)
    # Lightning leaves the process group up; left to interpreter exit, a gloo rank can abort
    # (SIGABRT after the work is done: benchmarks/gloo_exit.py)
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_and_fsdp2_two_processes(tmp_path):
    """strategy="ddp", devices=2 on the CPU: Lightning launches the second process itself;
    the cross-sample estimator pools the two ranks' gradients (process_group=WORLD), and
    the callback logs from rank 0. Then every mode under DDP and under FSDP2
    (ModelParallelStrategy, the model sharded in configure_model), one run after the other:
    every rank says what ran through opt.metrics(), the ranks agree, the loss falls, and FSDP2
    ends where DDP does."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    _run_script(script, tmp_path, timeout=400)
    names = ["cross_sample", "temporal", "subspace-temporal", "subspace-cross_sample"]
    for rank in (0, 1):
        runs = json.loads((tmp_path / f"ddp_rank{rank}.json").read_text())
        assert list(runs) == [f"{n}/{k}" for n in names for k in ("ddp", "fsdp2")]
        for key, out in runs.items():
            name, kind = key.split("/")
            cross = name.endswith("cross_sample")
            mode = "subspace" if name.startswith("subspace") else "diagonal"
            assert out["ran"] == [["cross_sample" if cross else "temporal", mode]], key
            distributor = "sharded" if kind == "fsdp2" else "replicated" if cross else "local"
            assert out["distributor"] == distributor, key
            assert out["world"] == (2 if cross or kind == "fsdp2" else 1), key
            assert out["ranks_differ"] == 0.0, key
            losses = out["losses"]
            assert len(losses) == 15
            assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, (key, losses)
        for name in names:
            ddp, fsdp2 = runs[f"{name}/ddp"]["params"], runs[f"{name}/fsdp2"]["params"]
            torch.testing.assert_close(torch.tensor(fsdp2), torch.tensor(ddp), rtol=0, atol=1e-5)
    with open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("snr/all/gate_mean")]
    assert [int(r["step"]) for r in rows] == [5, 10, 15]
    assert all(math.isfinite(float(r["snr/all/closed_frac"])) for r in rows)


# ---------------------------------------------------------------- DeepSpeed strategy (issue 34)
def _lightning_strategy(cls, cfg: dict):
    """Lightning's DeepSpeed strategy as far as the CPU lets it run: its ``setup_environment``
    refuses any accelerator but CUDA, and it hands DeepSpeed ``root_device.index`` (None for a
    plain "cpu" device), so the strategy gets indexed CPU devices and its model-and-optimizer
    setup, the part that calls ``deepspeed.initialize``, is called as ``init_deepspeed`` calls
    it."""
    return cls(config=copy.deepcopy(cfg), parallel_devices=[torch.device("cpu", i) for i in (0, 1)])


def _strategy_run(rank: int, cls, cfg: dict, snr: dict | None, gas: int, ckpt=None):
    from conftest import tiny_mlp
    from test_deepspeed import STEPS, _params, _train

    model = tiny_mlp(seed=0 if ckpt is None or ckpt[1] == "save" else 5)
    opt = None
    if snr is not None:  # configure_optimizers' optimizer (None: the config's "optimizer" block)
        import torch.distributed as dist

        group = dist.group.WORLD if snr.get("estimator") == "cross_sample" else "auto"
        opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, process_group=group, **snr)
    engine, ds_opt = _lightning_strategy(cls, cfg)._setup_model_and_optimizer(model, opt)
    try:
        if ckpt is None:
            _train(engine, rank, gas, 0, STEPS)
        elif ckpt[1] == "save":
            _train(engine, rank, gas, 0, 3)
            engine.save_checkpoint(ckpt[0], tag="step3")
            return None
        else:  # as Lightning's DeepSpeedStrategy.load_checkpoint, after the setup
            engine.load_checkpoint(ckpt[0], tag="step3")
            _train(engine, rank, gas, 3, STEPS)
    except RuntimeError as err:
        return {"error": str(err)}
    metrics = unwrap(ds_opt).metrics()
    out = {
        "params": _params(engine),
        "ran": [(g["estimator"], g["mode"]) for g in metrics["groups"]],
    }
    out["distributor"] = metrics["parallel"]["mode"]
    engine.destroy()
    return out


def _strategy_worker(rank: int, world: int, tmp: str):
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from test_deepspeed import SUB, XDIAG, XSUB, _config, _ds_env

    _ds_env(rank, world)
    out = {}

    def cfg(snr, gas, blocks=False):
        c = _config(2, snr, micro=8 // gas, gas=gas)
        c["zero_allow_untested_optimizer"] = True  # Lightning's own default config says so
        if not blocks:
            del c["optimizer"], c["snr_preconditioner"]
        return c

    # Lightning's own strategy: the elementwise mode runs on ZeRO's partitions; the cross-sample
    # estimator gets no per-rank gradients there and its first step says what to do
    out["stock_diagonal"] = _strategy_run(rank, DeepSpeedStrategy, cfg({}, 1), {}, 1)
    out["stock_cross"] = _strategy_run(rank, DeepSpeedStrategy, cfg(XDIAG, 2), XDIAG, 2)
    try:
        from snr_dist.integrations.lightning import SNRDeepSpeedStrategy
    except ImportError:  # before issue 34: the stock strategy's results still come back
        return out
    out["snr_cross"] = _strategy_run(rank, SNRDeepSpeedStrategy, cfg(XSUB, 2), XSUB, 2)
    # the config's "optimizer" block: Lightning skips configure_optimizers, the strategy builds
    # SNRAdamW from the blocks
    out["snr_blocks"] = _strategy_run(rank, SNRDeepSpeedStrategy, cfg(XSUB, 2, True), None, 2)
    path = str(Path(tmp) / "ckpt")
    for phase in ("save", "resume"):
        out[phase] = _strategy_run(rank, SNRDeepSpeedStrategy, cfg(XSUB, 1), XSUB, 1, (path, phase))
    out["sweep"] = {}
    for stage in (1, 2, 3):
        for snr in ({}, XDIAG, SUB, XSUB):
            c = _config(stage, snr, micro=4, gas=2)
            c["zero_allow_untested_optimizer"] = True
            del c["optimizer"], c["snr_preconditioner"]
            run = _strategy_run(rank, SNRDeepSpeedStrategy, c, snr, 2)
            out["sweep"][stage, tuple(sorted(snr.items()))] = run
    return out


@pytest.mark.slow
def test_deepspeed_strategy_runs_snr_on_row_shards(tmp_path):
    """Issue 34.5 (Lightning): Lightning's DeepSpeedStrategy refuses the CPU, so its
    model-and-optimizer setup runs here on 2 CPU processes (DeepSpeed's CPU accelerator, gloo).
    With Lightning's own strategy the diagonal temporal mode equals the direct snr-dist path,
    and the cross-sample estimator's first step refuses, now naming ZeRO and
    SNRDeepSpeedStrategy. SNRDeepSpeedStrategy runs subspace cross-sample on row shards (from
    configure_optimizers, or from the config's blocks), seen on every rank through
    opt.metrics(), equal to the direct path, and a checkpoint loaded after its setup (as
    Lightning restores one) resumes to the uninterrupted run; then every ZeRO stage 1-3 in each
    mode, equal to the one-process path."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    from test_deepspeed import XSUB, _reference

    ranks = run_distributed(_strategy_worker, 2, str(tmp_path), timeout=600)
    ref = {"diag": _reference({}, parts=2), "xsub": _reference(XSUB, parts=4)}
    refs: dict = {}
    resumed = _reference(XSUB, parts=2)
    for out in ranks:
        stock = out["stock_diagonal"]
        assert stock["ran"] == [("temporal", "diagonal")] and stock["distributor"] == "local"
        for p, q in zip(stock["params"], ref["diag"]):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        refused = out["stock_cross"]
        assert "error" in refused, f"ran {refused.get('ran')}"
        assert "DeepSpeed ZeRO" in refused["error"] and "SNRDeepSpeedStrategy" in refused["error"]
        for name in ("snr_cross", "snr_blocks"):
            run = out[name]
            assert "error" not in run, (name, run.get("error"))
            assert (run["ran"], run["distributor"]) == ([("cross_sample", "subspace")], "zero")
            for p, q in zip(run["params"], ref["xsub"]):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
        assert out["resume"]["distributor"] == "zero"
        for p, q in zip(out["resume"]["params"], resumed):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        for (stage, items), run in out["sweep"].items():
            snr = dict(items)
            assert "error" not in run, (stage, snr, run.get("error"))
            mode = (snr.get("estimator", "temporal"), snr.get("mode", "diagonal"))
            rows = "local" if mode == ("temporal", "diagonal") else "zero"
            assert (run["ran"], run["distributor"]) == ([mode], rows), (stage, snr)
            key = tuple(sorted(snr.items()))
            if key not in refs:
                refs[key] = _reference(snr, parts=4)
            for p, q in zip(run["params"], refs[key]):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_stop_monitor_callback_stops_a_lightning_run_and_checkpoints(tmp_path):
    """On a plain torch optimizer behind Lightning's wrapper: the stop ends fit early, and the
    monitor's state rides in Lightning's checkpoint."""
    from snr_dist.integrations.lightning import StopMonitorCallback

    class AdamWGPT(TinyGPT):
        def configure_gradient_clipping(self, optimizer, *args, **kwargs):
            pl.LightningModule.configure_gradient_clipping(self, optimizer, *args, **kwargs)

    loader = torch.utils.data.DataLoader(sequences(64), batch_size=8)
    cb = StopMonitorCallback(check_every=1, min_steps=0, threshold=1e9, patience=3)
    t = trainer(max_steps=20, callbacks=[cb], default_root_dir=str(tmp_path))
    t.fit(AdamWGPT(optimizer=torch.optim.AdamW), loader)
    assert cb.monitor.stop_step == 5  # the first reading at step 2, + 3 steps
    assert t.global_step in (5, 6)  # Lightning ends the epoch loop at its next check
    t.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if "StopMonitorCallback" in k)
    assert saved["monitor"]["step"] == cb.monitor.step
    with pytest.raises(ValueError, match="every_n_steps"):
        StopMonitorCallback(every_n_steps=0)
