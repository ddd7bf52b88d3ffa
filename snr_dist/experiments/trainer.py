"""Train every configured optimizer on the same data, model init and batch order, side by side.

One process, or many under ``torchrun`` (the world is read from the environment): each global
batch is split evenly across ranks (and each rank's share into ``train.microbatches``), the
model is wrapped in DDP or sharded with FSDP2, and the loss is scaled so that the averaged
gradient is exactly the one-process gradient of the whole batch. Only rank 0 writes files.

Each (optimizer, seed) run appends its evaluations to ``metrics.jsonl`` as it goes. With
``train.checkpoint_every`` the run checkpoints every that many epochs and at its end (DCP,
`snr_dist.checkpoint`; DeepSpeed's ``engine.save_checkpoint`` under ``--deepspeed``), and a
restarted job (e.g. ``torchrun --max-restarts``) resumes every run from its last checkpoint.
Wall time counts training only.

Testing hooks, to exercise elastic restarts: ``SNR_DIST_FAIL_AT_EPOCH=k`` (with
``SNR_DIST_FAIL_RANK``, default 1) kills that rank with ``os._exit`` at the start of epoch ``k``
of the first run, in the first attempt of a torchrun job only; with ``SNR_DIST_FAIL_NODE=1``
(set for one torchrun agent) its worker kills that agent and itself instead, whatever its rank:
a lost node. ``SNR_DIST_HOLD_AT_EPOCH=k`` with ``SNR_DIST_HOLD_BELOW_WORLD=n`` holds the first
run at the start of epoch ``k`` while the job has fewer than ``n`` ranks (torchrun restarts the
workers when a node joins; ``SNR_DIST_HOLD_S``, default 600, ends the wait).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from snr_dist import SNRAdamW
from snr_dist import checkpoint as ckpt
from snr_dist.experiments.config import ConfigError, ExperimentConfig, OptimizerConfig
from snr_dist.experiments.data import NoisyDataset, load_digits_noisy
from snr_dist.experiments.models import mlp
from snr_dist.integrations import early_stop, telemetry
from snr_dist.integrations.tensorboard import TensorBoardSink
from snr_dist.integrations.tensorboard import require as require_tensorboard


def build_optimizer(ocfg: OptimizerConfig, params, process_group="auto") -> torch.optim.Optimizer:
    """``process_group``: the data-parallel group under DDP (FSDP2 brings its own mesh)."""
    common = dict(lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay)
    if ocfg.type == "adamw":
        return torch.optim.AdamW(params, foreach=True, **common)
    return SNRAdamW(params, **common, snr=ocfg.snr, process_group=process_group)


@dataclass(frozen=True)
class World:
    """This process's place in the job (a single process is rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    strategy: str = "none"  # none | ddp | fsdp2

    @property
    def main(self) -> bool:
        return self.rank == 0

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            return DistributedDataParallel(model)
        if self.strategy == "fsdp2":
            from snr_dist.fsdp import shard

            return shard(model)
        return model

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def init_world(cfg: ExperimentConfig, deepspeed: bool = False) -> World:
    """Join the torchrun job described by the environment, if any (DeepSpeed: always, as a
    job of one process when not launched by torchrun)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if deepspeed and size <= 1:
        from snr_dist.distributors.ports import free_port

        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if not dist.is_initialized():
            dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
        return World(0, 1, "deepspeed")
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = cfg.distributed.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    strategy = "deepspeed" if deepspeed else cfg.distributed.strategy
    return World(dist.get_rank(), dist.get_world_size(), strategy)


@dataclass
class Trainable:
    """One model + optimizer, plain torch (optionally DDP/FSDP2) or a DeepSpeed engine: the
    few operations the training loop needs, so the loop is the same for both."""

    module: torch.nn.Module  # what to call, put in train/eval mode, and checkpoint
    opt: torch.optim.Optimizer  # what metrics() and checkpoints read
    engine: Any = None  # a DeepSpeed engine, if any
    half: bool = False  # feed bf16 inputs (DeepSpeed bf16 config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.bfloat16() if self.half else x).float()

    def zero_grad(self) -> None:
        if self.engine is None:
            self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        if self.engine is None:
            loss.backward()
        else:  # the loss is already scaled for accumulation and the data-parallel average
            self.engine.backward(loss, scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps the optimizer at its accumulation boundary

    def step(self) -> None:
        if self.engine is None:
            self.opt.step()


def build_trainable(
    ocfg: OptimizerConfig,
    net: torch.nn.Module,
    world: World,
    ds_config: dict | None,
    micro_per_rank: int,
    micro_size: int,
) -> Trainable:
    if ds_config is None:
        model = world.parallelize(net)
        group = dist.group.WORLD if world.strategy == "ddp" else "auto"
        opt = build_optimizer(ocfg, model.parameters(), group)
        if world.strategy == "fsdp2" and isinstance(opt, SNRAdamW):
            opt.attach_fsdp(model)  # cross-sample: each rank's gradient before the reduction
        return Trainable(model, opt)
    import deepspeed

    from snr_dist import deepspeed as snr_ds

    cfg = dict(ds_config)
    # The experiment decides the optimizers and the batch; the JSON the rest (ZeRO, dtype).
    cfg.pop("snr_preconditioner", None)
    cfg.update(
        train_micro_batch_size_per_gpu=micro_size,
        gradient_accumulation_steps=micro_per_rank,
        train_batch_size=micro_size * micro_per_rank * world.size,
    )
    adam = {"lr": ocfg.lr, "betas": list(ocfg.betas), "weight_decay": ocfg.weight_decay}
    if ocfg.type == "snr_adamw":
        cfg["optimizer"] = {"type": "AdamW", "params": adam}
        snr = snr_ds.experiment_options(ocfg.snr, ds_config)
        cfg["snr_preconditioner"] = snr.model_dump(exclude={"snr_beta2"})
        engine, opt, _, _ = snr_ds.initialize(model=net, config=cfg)
        opt = getattr(opt, "optimizer", opt) if not isinstance(opt, SNRAdamW) else opt
    else:
        cfg.pop("optimizer", None)
        cfg["zero_allow_untested_optimizer"] = True
        base = torch.optim.AdamW(
            net.parameters(), lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay
        )
        engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=base, config=cfg)
    half = bool((cfg.get("bf16") or {}).get("enabled"))
    return Trainable(engine, opt, engine=engine, half=half)


def _monitor(run: Trainable, ds_config: dict | None, n: int, tc) -> Any:
    """A `StopMonitor` on the optimizer that steps: ZeRO's partitions (stage >= 1) are shards,
    joined over the world; DDP's and one process's parameters are whole on every rank;
    FSDP2's DTensors carry their own mesh."""
    sharded = False
    if run.engine is not None:
        sharded = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0)) >= 1
    group = dist.group.WORLD if sharded and dist.is_initialized() else None
    return early_stop.build(
        _client_optimizer(run.opt), n, min(tc.batch_size, n - 1), process_group=group
    )


def _client_optimizer(opt):
    """The SNRAdamW inside a DeepSpeed ZeRO wrapper, if any."""
    return opt if isinstance(opt, SNRAdamW) else getattr(opt, "optimizer", opt)


@torch.no_grad()
def evaluate(model, data: NoisyDataset) -> dict[str, float]:
    """``model``: a module or a `Trainable` (whose forward casts inputs as its engine needs)."""
    module = model.module if isinstance(model, Trainable) else model
    forward = model.forward if isinstance(model, Trainable) else model
    module.eval()
    out_test = forward(data.x_test)
    out_train = forward(data.x_train)
    pred_train = out_train.argmax(1)
    flipped = data.flipped
    res = {
        "test_acc": float((out_test.argmax(1) == data.y_test).float().mean()),
        "test_loss": float(F.cross_entropy(out_test, data.y_test)),
        "train_loss": float(F.cross_entropy(out_train, data.y_train)),
        "clean_train_acc": float((pred_train[~flipped] == data.y_train[~flipped]).float().mean()),
        "memorised": (
            float((pred_train[flipped] == data.y_train[flipped]).float().mean())
            if flipped.any()
            else 0.0
        ),
    }
    module.train()
    return res


@dataclass
class RunResult:
    optimizer: str
    seed: int
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        best = max(self.history, key=lambda h: h["test_acc"])
        last = self.history[-1]
        fired = next((h for h in self.history if h.get("stop_step") is not None), None)
        return {
            "stop_step": None if fired is None else fired["stop_step"],
            "test_acc_at_stop": None if fired is None else fired["test_acc"],
            "optimizer": self.optimizer,
            "seed": self.seed,
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "final_test_acc": last["test_acc"],
            "final_memorised": last["memorised"],
            "peak_memorised": max(h["memorised"] for h in self.history),
            "wall_s": self.wall_s,
        }


def _maybe_fail(epoch: int, world: World, first_run: bool) -> None:
    """The testing hooks of the module docstring: a rank (or a whole node) lost at the start
    of an epoch, and a job held until it has grown back."""
    fail_at = os.environ.get("SNR_DIST_FAIL_AT_EPOCH")
    node = os.environ.get("SNR_DIST_FAIL_NODE") == "1"
    if (
        fail_at is not None
        and first_run
        and epoch == int(fail_at)
        and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        and (node or world.rank == int(os.environ.get("SNR_DIST_FAIL_RANK", "1")))
    ):
        if node:  # the node goes: its torchrun agent (this worker's parent) with it
            import signal

            os.kill(os.getppid(), signal.SIGKILL)
        os._exit(17)
    hold_at = os.environ.get("SNR_DIST_HOLD_AT_EPOCH")
    below = int(os.environ.get("SNR_DIST_HOLD_BELOW_WORLD", "0"))
    if hold_at is not None and first_run and epoch == int(hold_at) and world.size < below:
        print(
            f"  holding at epoch {epoch} on {world.size} rank(s) until the job grows",
            flush=True,
        )
        deadline = time.monotonic() + float(os.environ.get("SNR_DIST_HOLD_S", "600"))
        while time.monotonic() < deadline:  # until torchrun restarts this worker
            time.sleep(0.5)


def train_run(
    cfg: ExperimentConfig,
    ocfg: OptimizerConfig,
    seed: int,
    data: NoisyDataset,
    sink=None,
    progress: bool = True,
    world: World | None = None,
    ckpt_dir: Path | None = None,
    first_run: bool = False,
    ds_config: dict | None = None,
    tb_dir: Path | None = None,
) -> RunResult:
    """One optimizer, one seed. ``sink(record)`` receives every evaluation record; with
    ``tb_dir`` rank 0 also writes TensorBoard event files there."""
    world = world or World()
    tc = cfg.train
    net = mlp(data.num_features, cfg.model.hidden, data.num_classes, cfg.model.activation, seed)
    micro_size = max(1, tc.batch_size // (world.size * tc.microbatches))
    run = build_trainable(ocfg, net, world, ds_config, tc.microbatches, micro_size)
    model, opt = run.module, run.opt
    snr_opt = _client_optimizer(opt)
    snr_opt = snr_opt if isinstance(snr_opt, SNRAdamW) else None
    layers = telemetry.layer_groups(net) if snr_opt is not None else {}
    monitor = _monitor(run, ds_config, len(data.x_train), tc) if tc.stop_monitor != "none" else None
    tb = TensorBoardSink(tb_dir) if tb_dir is not None and world.main else None
    order = torch.Generator().manual_seed(10_000 + seed)  # same batches for every optimizer
    n = len(data.x_train)
    result = RunResult(ocfg.name, seed)
    steps, start = 0, 1
    extra = None
    if ckpt_dir is not None:
        fingerprint = run_fingerprint(cfg, ocfg, seed, ds_config)
        if tc.resume and _has_checkpoint(run, ckpt_dir, world):
            check_resumable(ckpt_dir, fingerprint)  # before anything is loaded
            extra = _resume(run, ckpt_dir)
        if extra is None and world.main:
            _write_fingerprint(ckpt_dir, fingerprint)
    if extra is not None:
        steps = extra["steps"]
        start = extra["epoch"] + 1
        if world.main:
            print(f"  {ocfg.name} seed {seed}: resumed after epoch {extra['epoch']}", flush=True)
        result.history, result.wall_s = extra["history"], extra["wall_s"]
        order.set_state(torch.tensor(extra["order_rng"], dtype=torch.uint8))
        if monitor is not None:
            early_stop.load(monitor, ckpt_dir, steps)
        if sink is not None:
            for rec in result.history:
                sink(rec)
    bar = tqdm(
        range(start, tc.epochs + 1),
        desc=f"{ocfg.name} seed={seed}",
        disable=not (progress and world.main),
        leave=False,
        dynamic_ncols=True,
    )
    for epoch in bar:
        _maybe_fail(epoch, world, first_run)
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        for begin in range(0, n, tc.batch_size):
            idx = perm[begin : begin + tc.batch_size]
            if len(idx) < tc.microbatches * world.size:
                continue  # too small to split; its samples come back next epoch
            mine = idx.tensor_split(world.size)[world.rank]
            chunks = mine.tensor_split(tc.microbatches)
            run.zero_grad()
            for i, chunk in enumerate(chunks):
                weighted = snr_opt is not None and tc.microbatches * world.size > 1
                ctx = snr_opt.microbatch(len(chunk)) if weighted else contextlib.nullcontext()
                sync = contextlib.nullcontext()
                if run.engine is None and world.strategy == "ddp" and i < len(chunks) - 1:
                    sync = model.no_sync()  # reduce once, after the last micro-batch
                with ctx, sync:
                    # sum over the micro-batch / whole-batch size, times the world size that
                    # the data-parallel average divides by: the one-process mean-loss gradient
                    loss = (
                        F.cross_entropy(
                            run.forward(data.x_train[chunk]),
                            data.y_train[chunk],
                            reduction="sum",
                        )
                        / len(idx)
                        * world.size
                    )
                    run.backward(loss)
            run.step()
            steps += 1
        result.wall_s += time.perf_counter() - t0
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            rec = {
                "optimizer": ocfg.name,
                "seed": seed,
                "epoch": epoch,
                "step": steps,
                **evaluate(run, data),
                "wall_s": result.wall_s,
            }
            scalars, hists = {}, {}
            if snr_opt is not None:
                g = snr_opt.metrics()["groups"][0]
                rec["gate_mean"] = g["gate_mean"]
                rec["frac_gate_below_0.1"] = g["frac_gate_below_0.1"]
                scalars, hists = telemetry.collect(snr_opt, layers, gates=tb is not None)
                rec["layer_gate_mean"] = {
                    k.rsplit("/", 1)[0]: v
                    for k, v in scalars.items()
                    if k.endswith("/gate_mean") and not k.startswith("all/")
                }
            if monitor is not None:  # every rank reads (a sharded run joins partial sums)
                rec["stop_ratio"] = monitor.read().get("ratio")
                rec["stop_step"] = monitor.stop_step
                if rec["stop_ratio"] is not None:
                    scalars["stop/ratio"] = rec["stop_ratio"]
            if tb is not None:
                tb.write(rec, steps, scalars, hists)
            result.history.append(rec)
            bar.set_postfix(test=f"{rec['test_acc']:.3f}", mem=f"{rec['memorised']:.3f}")
            if sink is not None:
                sink(rec)
        if (
            ckpt_dir is not None
            and tc.checkpoint_every
            and (epoch % tc.checkpoint_every == 0 or epoch == tc.epochs)
        ):
            extra = {
                "epoch": epoch,
                "steps": steps,
                "history": result.history,
                "wall_s": result.wall_s,
                "order_rng": order.get_state().tolist(),
            }
            _save(run, ckpt_dir, steps, extra, world)
            if monitor is not None:
                early_stop.save(monitor, ckpt_dir, steps)
        stop_now = monitor is not None and tc.stop_monitor == "stop" and monitor.should_stop
        if stop_now and result.history and result.history[-1]["epoch"] == epoch:
            if world.main:
                print(
                    f"  {ocfg.name} seed {seed}: the stop monitor fired at step "
                    f"{monitor.stop_step}; stopped after epoch {epoch}",
                    flush=True,
                )
            break
    bar.close()
    if tb is not None:
        tb.close()
    return result


_DS_CLIENT_KEY = "snr_dist_run"  # the run's own state inside a DeepSpeed checkpoint


class ResumeMismatch(ConfigError):
    """A run's checkpoints were written with another configuration."""


def run_fingerprint(
    cfg: ExperimentConfig, ocfg: OptimizerConfig, seed: int, ds_config: dict | None
) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote its checkpoints: everything that
    shapes its trajectory. ``train.epochs`` may grow (a run is extended by resuming it), and
    evaluation, progress and checkpoint cadence may change, as may the ranks and the strategy
    (DCP checkpoints reshard; a layout they cannot take is refused by the load itself)."""
    ds = ds_config or {}
    return {
        "seed": seed,
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", include={"batch_size", "microbatches"}),
        "optimizer": ocfg.model_dump(mode="json"),
        "deepspeed": {
            "zero_stage": ds.get("zero_optimization", {}).get("stage", 0) if ds else None,
            "snr_preconditioner": ds.get("snr_preconditioner"),
            "bf16": bool(ds.get("bf16", {}).get("enabled", False)),
        },
    }


def _fingerprint_path(ckpt_dir: Path) -> Path:
    # beside the checkpoint folder: a save replaces the folder itself
    return ckpt_dir.with_name(f"{ckpt_dir.name}.config.json")


def _write_fingerprint(ckpt_dir: Path, fingerprint: dict) -> None:
    path = _fingerprint_path(ckpt_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Values both records hold that differ: a key one release records and another does not
    (an option added since) cannot be compared, so it does not count."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) & set(new)):
            out += _differences(old[key], new[key], f"{where}.{key}" if where else key)
        return out
    return [] if old == new else [f"{where}: {old!r} then, {new!r} now"]


def check_resumable(ckpt_dir: Path, fingerprint: dict) -> None:
    """Refuse to resume checkpoints written with another configuration (a resumed run would
    mix two runs, and its report would name only the second). Checkpoints of releases that
    wrote no fingerprint resume unchecked."""
    path = _fingerprint_path(ckpt_dir)
    if not path.is_file():
        return
    diffs = _differences(json.loads(path.read_text()), json.loads(json.dumps(fingerprint)))
    if diffs:
        raise ResumeMismatch(
            f"{ckpt_dir}: checkpoints of a run with another configuration ("
            + "; ".join(diffs)
            + "). Resume with the configuration they were written with, or start this one "
            "elsewhere (--output-dir) or over them (--set train.resume=false)"
        )


def _save(run: Trainable, ckpt_dir: Path, steps: int, extra: dict, world: World) -> None:
    """DCP (`snr_dist.checkpoint`) for plain / DDP / FSDP2 runs; DeepSpeed's own
    ``save_checkpoint`` (which carries the SNR state) for engine runs. A DeepSpeed checkpoint
    goes to a new tag and ``latest`` moves to it only once it is written; the previous tag is
    removed after that, so a failure mid-save leaves the last good checkpoint."""
    if run.engine is None:
        ckpt.save(ckpt_dir, run.module, run.opt, steps, extra=extra)
        return
    tag = f"epoch{extra['epoch']}"
    before = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
    run.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={_DS_CLIENT_KEY: extra})
    world.barrier()
    if world.main and before not in (None, tag):
        import shutil

        shutil.rmtree(ckpt_dir / before, ignore_errors=True)


def _has_checkpoint(run: Trainable, ckpt_dir: Path, world: World) -> bool:
    if run.engine is not None:
        return (ckpt_dir / "latest").is_file()
    if world.main:
        ckpt.settle(ckpt_dir)  # a save interrupted between its two renames
    world.barrier()
    return (ckpt_dir / ckpt.META).is_file()


def _resume(run: Trainable, ckpt_dir: Path) -> dict | None:
    """The saved run state (``epoch``, ``steps``, ``history``, ...) after loading the model and
    optimizer from ``ckpt_dir``, or None when there is nothing to resume from."""
    if run.engine is None:
        if not (ckpt_dir / ckpt.META).is_file():
            return None
        steps = ckpt.load(ckpt_dir, run.module, run.opt)
        extra = ckpt.read_meta(ckpt_dir)["extra"]
        return {"steps": steps, **extra}
    if not (ckpt_dir / "latest").is_file():
        return None
    from snr_dist.deepspeed import load_checkpoint

    # DeepSpeed's loader, resharding a checkpoint of another world size (an elastic restart
    # on fewer or more ranks)
    path, client = load_checkpoint(run.engine, str(ckpt_dir))
    if path is None or _DS_CLIENT_KEY not in (client or {}):
        raise RuntimeError(
            f"{ckpt_dir}: a DeepSpeed checkpoint without snr-dist's run state "
            f"(client_state key {_DS_CLIENT_KEY!r}); remove the folder to start over"
        )
    return client[_DS_CLIENT_KEY]


def run_experiment(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    progress: bool | None = None,
    world: World | None = None,
    ds_config: dict | None = None,
    report_to: str = "none",
) -> list[RunResult]:
    """Every optimizer x seed; rank 0 writes ``metrics.jsonl`` under ``out_dir`` when given.
    ``ds_config``: a DeepSpeed JSON config (the optimizers come from ``cfg``; its
    ``snr_preconditioner`` block overrides the keys it names). ``report_to="tensorboard"``:
    event files under ``out_dir/tensorboard/<optimizer>-seed<seed>/``."""
    if report_to not in ("none", "tensorboard"):
        raise ValueError(f"Invalid report_to: {report_to!r}; allowed: 'none', 'tensorboard'")
    if report_to == "tensorboard":
        if out_dir is None:
            raise ValueError("report_to='tensorboard' needs an out_dir for the event files")
        require_tensorboard()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world = world or World()
    per_step = cfg.train.microbatches * world.size
    if cfg.train.batch_size < per_step:
        raise ConfigError(
            f"train.batch_size = {cfg.train.batch_size}: each step splits a batch into "
            f"train.microbatches ({cfg.train.microbatches}) per rank x {world.size} ranks, so "
            f"it must be >= {per_step} (a smaller batch would train no step)"
        )
    progress = cfg.train.progress if progress is None else progress
    results = []
    handle = None
    metrics = partial = None
    if out_dir is not None and world.main:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        # written aside and moved into place when every run has finished: a run that fails
        # leaves the previous metrics.jsonl (and the report made from it) as they were
        metrics = Path(out_dir) / "metrics.jsonl"
        partial = metrics.with_name("metrics.jsonl.partial")
        handle = open(partial, "w")  # noqa: SIM115 - closed below
    try:

        def sink(rec):
            if handle is not None:
                handle.write(json.dumps(rec) + "\n")
                handle.flush()

        first = True
        for seed in cfg.train.seeds:
            data = load_digits_noisy(cfg.data.label_noise, cfg.data.test_fraction, seed)
            for ocfg in cfg.optimizers:
                ckpt_dir = None
                if out_dir is not None and cfg.train.checkpoint_every:
                    ckpt_dir = Path(out_dir) / "checkpoints" / f"{ocfg.name}-seed{seed}"
                tb_dir = None
                if report_to == "tensorboard":
                    tb_dir = Path(out_dir) / "tensorboard" / f"{ocfg.name}-seed{seed}"
                results.append(
                    train_run(
                        cfg,
                        ocfg,
                        seed,
                        data,
                        sink,
                        progress,
                        world,
                        ckpt_dir,
                        first,
                        ds_config,
                        tb_dir,
                    )
                )
                first = False
    finally:
        if handle is not None:
            handle.close()
    if partial is not None:
        os.replace(partial, metrics)
    return results
