"""Claim experiments: every method x learning-rate grid x seed, run in a small process pool.

A study (`snr_dist.experiments.studies`) says what is swept (noise levels, widths, tasks), how a
run is trained and stopped, and how a run is summarised. This module does the rest, the same way
for every study:

- **Jobs** are ``(setting, method, grid point, seed)``. Each runs in a worker process with one
  torch thread (two workers use the two cores of a small machine fully). Data split, label noise,
  model initialisation and batch order come from the seed, so every method sees the same ones.
- **Nothing is lost**: each finished job is appended to ``results.jsonl``; a rerun of the same
  config skips finished jobs (``--fresh`` starts over).
- **Selection** is honest: each method's grid point is chosen per setting by the study's score on
  *validation* data (mean over seeds; a point whose run diverged on any seed is never chosen);
  test numbers are only reported. The optional "oracle early
  stopping" rows are the exception by design: they stop each run at its best *test* accuracy, the
  upper bound that early stopping could reach.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from snr_dist.experiments.config import ConfigError, apply_overrides, format_errors
from snr_dist.options import SNROptions


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodConfig(_Strict):
    """One optimizer setup; ``lr`` and ``weight_decay`` are grids (every combination runs)."""

    name: str = Field(min_length=1)
    type: Literal["adamw", "snr_adamw"]
    lr: list[float] = Field(min_length=1)
    weight_decay: list[float] = Field(default_factory=lambda: [0.01], min_length=1)
    betas: tuple[float, float] = (0.9, 0.999)
    snr: SNROptions | None = None
    # linear lr warm-up over the first steps (lr * step / lr_warmup), as transformer recipes
    # do; 0: constant lr
    lr_warmup: int = Field(default=0, ge=0)
    # each step's batch as this many equal micro-batches, one backward pass each (gradient
    # accumulation; what the cross-sample estimator reads)
    microbatches: int = Field(default=1, ge=1)
    # the seeds this method runs (those of the study's it lists; None: all of them). A costly
    # method can run fewer seeds than the others; its rows then say so. Not part of the
    # method's hash: each job's key carries its seed.
    seeds: list[int] | None = Field(default=None, min_length=1)
    # the settings this method runs in (None: every setting of the study); like seeds, not part
    # of the method's hash
    settings: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> MethodConfig:
        if self.type == "adamw" and self.snr is not None:
            raise ValueError("'snr' options apply only to type 'snr_adamw'")
        if any(lr <= 0 for lr in self.lr) or any(wd < 0 for wd in self.weight_decay):
            raise ValueError("lr values must be > 0 and weight_decay values >= 0")
        if self.snr is not None and self.snr.estimator == "cross_sample" and self.microbatches < 2:
            raise ValueError(
                f"microbatches = {self.microbatches}: estimator 'cross_sample' needs >= 2 "
                "(it measures the spread of one step's micro-batch gradients)"
            )
        return self

    def grid(self) -> list[dict[str, float]]:
        return [{"lr": lr, "weight_decay": wd} for lr in self.lr for wd in self.weight_decay]


class BudgetConfig(_Strict):
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    eval_every: int = Field(ge=1)
    # Record each SNR optimizer's per-parameter gate mean and SNR quantiles at every evaluation
    # (``history[i]["gates"]``; a picture in the report).
    trace_gates: bool = False
    # Also evaluate every ``eval_dense_every`` steps up to ``eval_dense_until`` (early speed at
    # a finer grain than a long run's ``eval_every``).
    eval_dense_until: int = Field(default=0, ge=0)
    eval_dense_every: int = Field(default=10, ge=1)
    # Attach a `snr_dist.stopping.StopMonitor` (defaults) to every run and record its reading
    # (``stop_ratio``, ``stop_step``) and the mean gate of SNR runs at each evaluation.
    monitor: bool = False
    # After the grid, run each method's selected point (per setting, all seeds) again to this
    # many steps: one longer run per selected configuration, evaluated at every horizon.
    extend_to: int = Field(default=0, ge=0)
    # the settings whose selected points are extended (empty: every setting with the budget's
    # length); it only decides which longer runs exist, so it is not part of the config hash
    extend_settings: list[Any] = Field(default_factory=list)
    # the methods and seeds whose selected points are extended (empty: every method, each
    # with its own seeds); like extend_settings, not part of the config hash
    extend_methods: list[str] = Field(default_factory=list)
    extend_seeds: list[int] = Field(default_factory=list)


# BudgetConfig fields added after runs were published: left out of the config hash at their
# default, so studies that do not use them keep their finished runs
_LATER_BUDGET_FIELDS = ("eval_dense_until", "eval_dense_every", "monitor", "extend_to")


class StudyConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    study: Literal[
        "label_noise",
        "label_noise_horizon",
        "grokking",
        "double_descent",
        "convergence",
        "entk_partition",
    ]
    output_dir: str = "runs/experiments"
    seeds: list[int] = Field(min_length=1)
    workers: int = Field(default=2, ge=1)
    task: dict[str, Any] = Field(default_factory=dict)
    budget: BudgetConfig
    methods: list[MethodConfig] = Field(min_length=1)
    oracle_early_stopping: list[str] = Field(default_factory=list)
    # the smaller-step control: for each SNR method named here, AdamW at that method's selected
    # lr times its mean gate over the run (per setting, every seed), run to the longest horizon
    gate_matched: list[str] = Field(default_factory=list)
    # the report also lists every grid point of every method (where a method's optimum sits,
    # and how narrow it is, is part of the result when grids differ between methods)
    report_grid: bool = False
    smoke: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_seeds(self) -> StudyConfig:
        for m in self.methods:
            if m.seeds and not set(m.seeds) & set(self.seeds):
                raise ValueError(
                    f"methods[{m.name!r}].seeds = {m.seeds}: none among the study's seeds "
                    f"{self.seeds} (a method runs the seeds both list)"
                )
        names = {m.name for m in self.methods}
        unknown = [n for n in self.budget.extend_methods if n not in names]
        if unknown:
            raise ValueError(
                f"budget.extend_methods = {self.budget.extend_methods}: {unknown} not among "
                f"the methods {sorted(names)}"
            )
        return self

    def runs_in(self, method: str, setting: Any) -> bool:
        """Whether ``method`` runs in ``setting`` (`MethodConfig.settings`)."""
        m = next((m for m in self.methods if m.name == method), None)
        return m is None or m.settings is None or any(str(s) == str(setting) for s in m.settings)

    def seeds_for(self, method: str) -> list[int]:
        """The seeds ``method`` runs: the study's, those in `MethodConfig.seeds` where set."""
        m = next((m for m in self.methods if m.name == method), None)
        if m is None or not m.seeds:
            return list(self.seeds)
        return [s for s in self.seeds if s in m.seeds]

    @model_validator(mode="after")
    def _names(self) -> StudyConfig:
        names = [m.name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"method names must be unique, repeated: {dup}")
        snr_names = [m.name for m in self.methods if m.type == "snr_adamw"]
        stray = sorted(set(self.gate_matched) - set(snr_names))
        if stray:
            raise ValueError(
                f"gate_matched names {stray}, not SNR methods; SNR methods: {snr_names}"
            )
        if self.gate_matched and not self.budget.monitor:
            raise ValueError("gate_matched reads the runs' mean gates: set budget.monitor: true")
        unknown = sorted(set(self.oracle_early_stopping) - set(names))
        if unknown:
            raise ValueError(
                f"oracle_early_stopping names unknown methods {unknown}; known: {names}"
            )
        return self


def load_study(
    path: str | Path, overrides: list[str] | None = None, smoke: bool = False
) -> StudyConfig:
    """Read, apply the ``smoke`` overrides (when asked) and ``--set`` ones, validate the whole
    config including the study's own ``task`` section; `ConfigError` lists every problem."""
    from snr_dist.experiments.studies import STUDIES

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    if smoke:
        smoke_set = raw.get("smoke") or {}
        raw = apply_overrides(raw, [f"{k}={json.dumps(v)}" for k, v in smoke_set.items()])
        raw["name"] = f"{raw.get('name', 'study')}-smoke"
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(p))) from None
    study = STUDIES[cfg.study]
    try:
        study.task_model.model_validate(cfg.task)
    except ValidationError as e:
        lines = [f"{p}: invalid config"]
        for err in e.errors(include_url=False):
            key = "task." + ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(study.task_model.model_fields)
                lines.append(f"  - {key}: unknown key (allowed keys: {allowed})")
            else:
                lines.append(f"  - {key} = {err.get('input')!r}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    if cfg.budget.extend_to and cfg.budget.extend_to <= cfg.budget.steps:
        raise ConfigError(
            f"{p}: budget.extend_to = {cfg.budget.extend_to}: must be above budget.steps "
            f"({cfg.budget.steps}) (0: no extension)"
        )
    every = cfg.task.get("record_every")
    if every is not None and every % cfg.budget.eval_every:
        raise ConfigError(
            f"{p}: task.record_every = {every}: must be a multiple of budget.eval_every "
            f"({cfg.budget.eval_every}); records are taken at evaluations"
        )
    if every is not None and cfg.budget.steps % every:
        raise ConfigError(
            f"{p}: task.record_every = {every}: budget.steps ({cfg.budget.steps}) must be a "
            "multiple of it, so that the last record (the report's 'final' columns) is taken at "
            "the final step"
        )
    return cfg


@dataclass(frozen=True)
class Job:
    setting: Any
    method: str
    point: int
    seed: int
    method_hash: str = ""
    steps: int = 0  # 0: the budget's; else an extension run of the selected point
    spec: str = ""  # a method that no config lists (`gate_matched_jobs`), as JSON

    @property
    def key(self) -> str:
        fields = [self.setting, self.method, self.point, self.seed, self.method_hash]
        if self.steps or self.spec:
            fields.append(self.steps)
        if self.spec:
            fields.append(self.spec)
        return json.dumps(fields)


def _digest(d: Any) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(cfg: StudyConfig) -> str:
    """What makes results comparable: everything but where and how fast they are produced, how
    they are reported and which methods run (each job's key carries its own method's
    definition), plus the package version (results of other code are not reused). So adding or
    changing one method reruns only that method's jobs."""
    from snr_dist import __version__

    exclude = {
        "output_dir",
        "workers",
        "smoke",
        "methods",
        "oracle_early_stopping",
        "report_grid",
        "gate_matched",
    }
    d = cfg.model_dump(mode="json", exclude=exclude)
    for name in _LATER_BUDGET_FIELDS:
        if d["budget"][name] == BudgetConfig.model_fields[name].default:
            del d["budget"][name]
    for name in ("extend_settings", "extend_methods", "extend_seeds"):
        del d["budget"][name]  # which longer runs exist: their keys carry it
    d["snr_dist_version"] = __version__
    return _digest(d)


# MethodConfig fields added after runs were published: left out of a method's hash while at
# their default, so methods that do not use them keep their hashes (and finished runs)
_LATER_FIELDS = ("lr_warmup", "microbatches")
# SNROptions fields added after runs were published, with their defaults: left out likewise
_LATER_SNR_FIELDS = {"state_dtype": "float32"}


def method_hash(method: MethodConfig) -> str:
    d = method.model_dump(mode="json", exclude={"seeds", "settings"})
    for name in _LATER_FIELDS:
        if d[name] == MethodConfig.model_fields[name].default:
            del d[name]
    for name, default in _LATER_SNR_FIELDS.items():
        if d.get("snr") is not None and d["snr"].get(name) == default:
            del d["snr"][name]
    return _digest(d)


def build_optimizer(method: MethodConfig, point: dict[str, float], params) -> torch.optim.Optimizer:
    from snr_dist import SNRAdamW

    common = dict(lr=point["lr"], weight_decay=point["weight_decay"], betas=method.betas)
    if method.type == "adamw":
        return torch.optim.AdamW(params, foreach=True, **common)
    return SNRAdamW(params, **common, snr=method.snr)


def job_method(cfg: StudyConfig, job: Job) -> MethodConfig:
    if job.spec:
        return MethodConfig.model_validate_json(job.spec)
    return next(m for m in cfg.methods if m.name == job.method)


def run_steps(cfg: StudyConfig, job: Job) -> int:
    """How long ``job`` trains: an extension's own length, else its setting's, else the
    budget's."""
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES[cfg.study]
    if job.steps:
        return job.steps
    if study.steps_for is not None:
        own = study.steps_for(study.task_model.model_validate(cfg.task), job.setting)
        if own:
            return own
    return cfg.budget.steps


def extends(cfg: StudyConfig, setting: Any) -> bool:
    """Whether ``budget.extend_to`` applies to a setting (not to one with its own length)."""
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES[cfg.study]
    if not cfg.budget.extend_to:
        return False
    if cfg.budget.extend_settings and setting not in cfg.budget.extend_settings:
        return False
    if study.steps_for is None:
        return True
    return not study.steps_for(study.task_model.model_validate(cfg.task), setting)


def state_path(state_dir: Path, job: Job) -> Path:
    """Where a grid run leaves its final state for an extension (`extension_jobs`)."""
    grid = Job(job.setting, job.method, job.point, job.seed, job.method_hash)
    return state_dir / f"{_digest(grid.key)}.pt"


def train_job(cfg: StudyConfig, job: Job, state_dir: Path | None = None) -> dict[str, Any]:
    """Train one run and return its record (history of evaluations, wall time, stop step).

    With ``state_dir`` and ``budget.extend_to``, a grid run saves its final state there and an
    extension run continues from it (the same steps, bit for bit, as training from scratch:
    model, optimizer, lr schedule, batch order, monitor and history are all restored)."""
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES[cfg.study]
    task_cfg = study.task_model.model_validate(cfg.task)
    task = study.make_task(task_cfg, job.setting, job.seed)
    method = job_method(cfg, job)
    point = method.grid()[job.point]
    model = task.model(job.seed)
    opt = build_optimizer(method, point, model.parameters())
    budget = cfg.budget
    monitor = None
    if budget.monitor:
        from snr_dist.stopping import StopMonitor

        monitor = StopMonitor(opt, dataset_size=task.n_train, batch_size=budget.batch_size)
    warmup = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / method.lr_warmup))
        if method.lr_warmup
        else None
    )
    order = torch.Generator().manual_seed(10_000 + job.seed)
    steps = run_steps(cfg, job)
    callback = study.callback(task_cfg, task, job) if study.callback else None
    names = {p: n for n, p in model.named_parameters()}
    history: list[dict[str, Any]] = []
    perm, cursor, wall, stopped = torch.randperm(task.n_train, generator=order), 0, 0.0, None
    first = 1
    saved = state_path(state_dir, job) if state_dir is not None else None
    if job.steps and saved is not None and saved.is_file():
        state = torch.load(saved, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if warmup is not None:
            warmup.load_state_dict(state["warmup"])
        if monitor is not None and state["monitor"] is not None:
            monitor.load_state_dict(state["monitor"])
        order.set_state(state["order"])
        perm, cursor, wall = state["perm"], state["cursor"], state["wall"]
        history = state["history"]
        first = state["step"] + 1
    if callback is not None and first == 1:
        callback(model, 0, history)
    for step in range(first, steps + 1):
        t0 = time.perf_counter()
        if cursor + budget.batch_size > task.n_train:
            perm, cursor = torch.randperm(task.n_train, generator=order), 0
        idx = perm[cursor : cursor + budget.batch_size]
        cursor += budget.batch_size
        opt.zero_grad(set_to_none=True)
        if method.microbatches == 1:
            task.loss(model, idx).backward()
        else:  # equal parts of the batch, each loss weighted by its share (a mean over idx)
            for part in idx.chunk(method.microbatches):
                (task.loss(model, part) * (len(part) / len(idx))).backward()
        opt.step()
        if warmup is not None:
            warmup.step()
        wall += time.perf_counter() - t0
        dense = step <= budget.eval_dense_until and step % budget.eval_dense_every == 0
        if dense or step % budget.eval_every == 0 or step == steps:
            rec = {"step": step, "wall_s": wall, **task.evaluate(model)}
            if not torch.isfinite(torch.tensor(rec["train_loss"])):
                rec["diverged"] = True
            if budget.trace_gates and hasattr(opt, "metrics"):
                rec["gates"] = gate_trace(opt, names)
            if monitor is not None:
                rec.update(_monitor_reading(monitor, opt))
            history.append(rec)
            if callback is not None:
                callback(model, step, history)
            if rec.get("diverged"):  # stopped, but not at a target: ``stopped`` stays None
                break
            if study.stop(task_cfg, rec, history):
                stopped = step
                break
    if saved is not None and not job.steps and extends(cfg, job.setting) and stopped is None:
        state = {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "warmup": None if warmup is None else warmup.state_dict(),
            "monitor": None if monitor is None else monitor.state_dict(),
            "order": order.get_state(),
            "perm": perm,
            "cursor": cursor,
            "wall": wall,
            "history": history,
            "step": history[-1]["step"],
        }
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, saved)
    return {
        "key": job.key,
        "history": history,
        "wall_s": wall,
        "stopped": stopped,
        "threads": torch.get_num_threads(),
        # the last bits of every run depend on the kernels' instruction set (see `report.cpu`)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def _monitor_reading(monitor, opt) -> dict[str, Any]:
    reading = monitor.read()
    out = {"stop_ratio": reading.get("ratio"), "stop_step": monitor.stop_step}
    # the monitor's raw averages, so that other stopping rules can be read off line
    out.update({f"stop_{k}": reading.get(k) for k in ("cross", "scatter", "square")})
    if hasattr(opt, "metrics"):  # the mean gate over every coordinate (the effective lr factor)
        groups = opt.metrics()["params"].values()
        sizes = [math.prod(g["shape"]) for g in groups]
        out["gate_mean"] = sum(g["gate_mean"] * n for g, n in zip(groups, sizes)) / sum(sizes)
    return out


def gate_trace(opt, names: dict) -> dict[str, dict[str, float]]:
    """Per parameter: gate mean, share of gates below 0.1, SNR quantiles (``opt.metrics``)."""
    keep = ("gate_mean", "frac_gate_below_0.1", "snr_q10", "snr_q50", "snr_q90")
    return {
        name: {k: m[k] for k in keep if k in m} for name, m in opt.metrics(names)["params"].items()
    }


def _worker(args: tuple[dict, Job, Path | None]) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg_dict, job, state_dir = args
    return train_job(StudyConfig.model_validate(cfg_dict), job, state_dir)


def all_jobs(cfg: StudyConfig) -> list[Job]:
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES[cfg.study]
    settings = study.settings(study.task_model.model_validate(cfg.task))
    return [
        Job(s, m.name, i, seed, method_hash(m))
        for s in settings
        for seed in cfg.seeds
        for m in cfg.methods
        if seed in cfg.seeds_for(m.name) and cfg.runs_in(m.name, s)
        for i in range(len(m.grid()))
    ]


def run_study(
    cfg: StudyConfig, out_dir: Path, progress: bool = True, fresh: bool = False
) -> dict[str, dict]:
    """Run the missing jobs (in ``cfg.workers`` processes) and return ``{job key: record}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "results.jsonl"
    digest = config_hash(cfg)
    done: dict[str, dict] = {}
    if path.is_file() and not fresh:
        text = path.read_text()
        lines = text.splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a write cut short (a kill, a full disk)
                continue
            kept.append(line)
            if rec.get("config") == digest:
                done[rec["key"]] = rec
        if len(kept) < len(lines):
            print(
                f"{path}: {len(lines) - len(kept)} incomplete record(s) left out "
                "(their runs run again)",
                flush=True,
            )
        if len(kept) < len(lines) or not text.endswith("\n"):
            # rewritten whole, so that what is appended starts a line of its own
            path.write_text("".join(line + "\n" for line in kept))
    elif path.is_file():
        path.unlink()
    loaded = done
    grid = all_jobs(cfg)
    wanted = {j.key for j in grid}
    done = {k: v for k, v in loaded.items() if k in wanted}  # other methods' or old grids' runs
    jobs = [j for j in grid if j.key not in done]
    if done and progress:
        print(f"{len(done)} finished runs reused from {path} (--fresh to rerun)", flush=True)
    with open(path, "a") as sink:

        def keep(rec: dict) -> None:
            rec["config"] = digest
            done[rec["key"]] = rec
            sink.write(json.dumps(rec) + "\n")
            sink.flush()

        states = out_dir / "states" if cfg.budget.extend_to else None
        _execute(cfg, jobs, keep, progress, cfg.name, states)
        if cfg.budget.extend_to:
            longer = extension_jobs(cfg, done)
            done.update({j.key: loaded[j.key] for j in longer if j.key in loaded})
            todo = [j for j in longer if j.key not in done]
            desc = f"{cfg.name} to {cfg.budget.extend_to} steps"
            _execute(cfg, todo, keep, progress, desc, states)
        if cfg.gate_matched:
            matched = gate_matched_jobs(cfg, done)
            done.update({j.key: loaded[j.key] for j in matched if j.key in loaded})
            todo = [j for j in matched if j.key not in done]
            _execute(cfg, todo, keep, progress, f"{cfg.name}: AdamW at gated steps", None)
    return done


def _cost(cfg: StudyConfig, job: Job) -> float:
    """A job's relative cost, to start the longest first (a shorter tail on the pool)."""
    method = job_method(cfg, job)
    per_step = 1.0 + 0.4 * (method.microbatches > 1)
    if method.snr is not None:
        per_step += 0.5 * (method.snr.mode == "subspace") + 1.0 * (
            method.snr.estimator == "cross_sample"
        )
    return run_steps(cfg, job) * per_step


def _execute(
    cfg: StudyConfig, jobs: list[Job], keep, progress: bool, desc: str, states: Path | None
) -> None:
    # methods in the config's order (a study cut short has its first methods complete), the
    # longest jobs first within a method (a shorter tail on the pool)
    order = {m.name: i for i, m in enumerate(cfg.methods)}
    jobs = sorted(jobs, key=lambda j: (order.get(j.method, len(order)), -_cost(cfg, j)))
    cfg_dict = cfg.model_dump(mode="json")
    with tqdm(total=len(jobs), desc=desc, disable=not progress) as bar:
        if cfg.workers == 1 or len(jobs) <= 1:
            # one torch thread, as in each worker process: results do not depend on --workers
            # (thread counts change reduction orders) and the report's "one thread" holds
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for job in jobs:
                    keep(train_job(cfg, job, states))
                    bar.update(1)
            finally:
                torch.set_num_threads(threads)
        else:
            ctx = mp.get_context("spawn")
            env_threads = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"
            try:
                with ctx.Pool(min(cfg.workers, len(jobs))) as pool:
                    work = [(cfg_dict, j, states) for j in jobs]
                    for rec in pool.imap_unordered(_worker, work):
                        keep(rec)
                        bar.update(1)
            finally:
                if env_threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = env_threads


GATE_MATCHED = "AdamW at {}'s step"


def mean_gate(history: list[dict], until: int) -> float | None:
    """The run's gate averaged over its evaluations up to step ``until``."""
    gates = [h["gate_mean"] for h in history if h["step"] <= until and "gate_mean" in h]
    return statistics.fmean(gates) if gates else None


def gate_matched_jobs(cfg: StudyConfig, records: dict[str, dict]) -> list[Job]:
    """`StudyConfig.gate_matched`: AdamW at the effective step of each named SNR method, the
    control for "the gate only makes the step smaller": its lr is the SNR method's selected lr
    times the mean gate of its runs (over the seeds and the first ``budget.steps`` steps)."""
    out = []
    for setting, rows in select(cfg, records).items():
        if not extends(cfg, setting):
            continue
        for row in rows:
            if row.method not in cfg.gate_matched:
                continue
            snr = next(m for m in cfg.methods if m.name == row.method)
            gates = [mean_gate(h, cfg.budget.steps) for h in row.histories]
            if any(g is None for g in gates):
                continue
            lr = float(f"{row.point['lr'] * statistics.fmean(gates):.3g}")
            method = MethodConfig(
                name=GATE_MATCHED.format(row.method),
                type="adamw",
                lr=[lr],
                weight_decay=[row.point["weight_decay"]],
                betas=snr.betas,
                lr_warmup=snr.lr_warmup,
            )
            spec = method.model_dump_json()
            steps = cfg.budget.extend_to or cfg.budget.steps
            mh = method_hash(method)
            seeds = cfg.seeds_for(row.method)
            if cfg.budget.extend_to and cfg.budget.extend_seeds:  # they run to extend_to
                seeds = [s for s in seeds if s in cfg.budget.extend_seeds]
            out += [Job(setting, method.name, 0, s, mh, steps, spec) for s in seeds]
    return out


def extension_jobs(cfg: StudyConfig, records: dict[str, dict]) -> list[Job]:
    """``budget.extend_to``: each method's selected grid point (per setting, by the study's
    validation score at ``budget.steps``), every seed, run again to ``extend_to`` steps. The
    runs are deterministic, so their first ``budget.steps`` steps repeat the grid run's."""
    out = []
    for setting, rows in select(cfg, records).items():
        if not extends(cfg, setting):
            continue
        for row in rows:
            method = next((m for m in cfg.methods if m.name == row.method), None)
            if method is None:  # an oracle row
                continue
            if cfg.budget.extend_methods and method.name not in cfg.budget.extend_methods:
                continue
            point = method.grid().index(row.point)
            mh = method_hash(method)
            seeds = cfg.seeds_for(method.name)
            if cfg.budget.extend_seeds:
                seeds = [s for s in seeds if s in cfg.budget.extend_seeds]
            out += [
                Job(setting, method.name, point, seed, mh, cfg.budget.extend_to) for seed in seeds
            ]
    return out


# ---------------------------------------------------------------------- aggregation
def mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), sd


@dataclass
class Row:
    """One method in one setting at its selected grid point."""

    method: str
    point: dict[str, float]
    summaries: list[dict[str, float]]  # one per seed
    histories: list[list[dict]]
    grid: list[Row] = field(default_factory=list)  # every grid point, the selected one included

    def stat(self, key: str) -> tuple[float, float]:
        return mean_sd([s[key] for s in self.summaries if s.get(key) is not None])


def select(cfg: StudyConfig, records: dict[str, dict]) -> dict[Any, list[Row]]:
    """Per setting: each method at its best grid point (by the study's validation score), plus
    the oracle-early-stopping rows."""
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES[cfg.study]
    task_cfg = study.task_model.model_validate(cfg.task)
    out: dict[Any, list[Row]] = defaultdict(list)
    for setting in study.settings(task_cfg):
        for m in cfg.methods:
            if not cfg.runs_in(m.name, setting):
                continue
            candidates = []
            mh = method_hash(m)
            for i, point in enumerate(m.grid()):
                recs = [records[Job(setting, m.name, i, s, mh).key] for s in cfg.seeds_for(m.name)]
                hists = [r["history"] for r in recs]
                stops = [r["stopped"] for r in recs]
                sums = [study.summarise(task_cfg, h, st) for h, st in zip(hists, stops)]
                if any(h[-1].get("diverged") for h in hists):
                    score = -math.inf  # a point that diverges on any seed is never chosen
                else:
                    score = statistics.fmean(study.score(s) for s in sums)
                candidates.append((score, i, point, sums, hists))
            score, i, point, sums, hists = max(candidates, key=lambda c: (c[0], -c[1]))
            grid = [Row(m.name, pt, ss, hs) for _, _, pt, ss, hs in candidates]
            out[setting].append(Row(m.name, point, sums, hists, grid))
            if m.name in cfg.oracle_early_stopping:
                oracle = []
                for _, i, point, _, hists in candidates:
                    cut = [
                        h[: max(range(len(h)), key=lambda k: h[k]["test_acc"]) + 1] for h in hists
                    ]
                    sums = [study.summarise(task_cfg, h, None) for h in cut]
                    oracle.append(
                        (statistics.fmean(s["final_test_acc"] for s in sums), i, point, sums, cut)
                    )
                _, i, point, sums, cut = max(oracle, key=lambda c: (c[0], -c[1]))
                out[setting].append(Row(f"{m.name} + oracle early stop", point, sums, cut))
    return out


def markdown_table(rows: list[Row], columns: list[tuple[str, str, str]], n_seeds: int) -> str:
    head = "| method | lr | wd | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            vals = [s[key] for s in row.summaries if s.get(key) is not None]
            missing = len(row.summaries) - len(vals)
            if not vals:
                cells.append("n/a")
                continue
            mean, sd = mean_sd(vals)
            cell = fmt.format(mean) + (f" ± {fmt.format(sd)}" if n_seeds > 1 else "")
            if missing:
                cell += f" ({len(vals)}/{len(row.summaries)} runs)"
            cells.append(cell)
        lines.append(
            f"| {row.method} | {row.point['lr']:g} | {row.point['weight_decay']:g} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def machine() -> str:
    import platform

    from snr_dist.experiments.report import cpu

    return (
        f"{platform.system()} {platform.machine()} ({cpu()}), {os.cpu_count()} CPU cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
