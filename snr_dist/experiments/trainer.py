"""Train every configured optimizer on the same data, model init and batch order, side by side.

Each (optimizer, seed) run appends its evaluations to ``metrics.jsonl`` as it goes, so an
interrupted job keeps everything it measured. Wall time counts training only (evaluation is the
same work for every optimizer).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from snr_dist import SNRAdamW
from snr_dist.experiments.config import ExperimentConfig, OptimizerConfig, SNRConfig
from snr_dist.experiments.data import NoisyDataset, load_digits_noisy
from snr_dist.experiments.models import mlp


def build_optimizer(ocfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    common = dict(lr=ocfg.lr, betas=ocfg.betas, weight_decay=ocfg.weight_decay)
    if ocfg.type == "adamw":
        return torch.optim.AdamW(params, foreach=True, **common)
    snr = (ocfg.snr or SNRConfig()).model_dump()
    return SNRAdamW(params, **common, **snr)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: NoisyDataset) -> dict[str, float]:
    model.eval()
    out_test = model(data.x_test)
    out_train = model(data.x_train)
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
    model.train()
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
        return {
            "optimizer": self.optimizer,
            "seed": self.seed,
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "final_test_acc": last["test_acc"],
            "final_memorised": last["memorised"],
            "peak_memorised": max(h["memorised"] for h in self.history),
            "wall_s": self.wall_s,
        }


def train_run(
    cfg: ExperimentConfig,
    ocfg: OptimizerConfig,
    seed: int,
    data: NoisyDataset,
    sink=None,
    progress: bool = True,
) -> RunResult:
    """One optimizer, one seed. ``sink(record)`` receives every evaluation record."""
    tc = cfg.train
    model = mlp(data.num_features, cfg.model.hidden, data.num_classes, cfg.model.activation, seed)
    opt = build_optimizer(ocfg, model.parameters())
    order = torch.Generator().manual_seed(10_000 + seed)  # same batches for every optimizer
    n = len(data.x_train)
    result = RunResult(ocfg.name, seed)
    steps = 0
    bar = tqdm(
        range(1, tc.epochs + 1),
        desc=f"{ocfg.name} seed={seed}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        for start in range(0, n, tc.batch_size):
            idx = perm[start : start + tc.batch_size]
            if len(idx) < tc.microbatches:
                continue  # too small to split; its samples come back next epoch
            opt.zero_grad(set_to_none=True)
            for chunk in idx.chunk(tc.microbatches):
                weighted = isinstance(opt, SNRAdamW) and tc.microbatches > 1
                ctx = opt.microbatch(len(chunk)) if weighted else contextlib.nullcontext()
                with ctx:
                    # sum over the micro-batch / whole-batch size: the usual mean-loss gradient
                    loss = F.cross_entropy(
                        model(data.x_train[chunk]), data.y_train[chunk], reduction="sum"
                    ) / len(idx)
                    loss.backward()
            opt.step()
            steps += 1
        result.wall_s += time.perf_counter() - t0
        if epoch % tc.eval_every == 0 or epoch == tc.epochs:
            rec = {
                "optimizer": ocfg.name,
                "seed": seed,
                "epoch": epoch,
                "step": steps,
                **evaluate(model, data),
                "wall_s": result.wall_s,
            }
            if isinstance(opt, SNRAdamW):
                g = opt.metrics()["groups"][0]
                rec["gate_mean"] = g["gate_mean"]
                rec["frac_gate_below_0.1"] = g["frac_gate_below_0.1"]
            result.history.append(rec)
            bar.set_postfix(test=f"{rec['test_acc']:.3f}", mem=f"{rec['memorised']:.3f}")
            if sink is not None:
                sink(rec)
    bar.close()
    return result


def run_experiment(
    cfg: ExperimentConfig, out_dir: str | Path | None = None, progress: bool | None = None
) -> list[RunResult]:
    """Every optimizer x seed; writes ``metrics.jsonl`` under ``out_dir`` when given."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    progress = cfg.train.progress if progress is None else progress
    results = []
    handle = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        handle = open(Path(out_dir) / "metrics.jsonl", "w")  # noqa: SIM115 - closed below
    try:

        def sink(rec):
            if handle is not None:
                handle.write(json.dumps(rec) + "\n")
                handle.flush()

        for seed in cfg.train.seeds:
            data = load_digits_noisy(cfg.data.label_noise, cfg.data.test_fraction, seed)
            for ocfg in cfg.optimizers:
                results.append(train_run(cfg, ocfg, seed, data, sink, progress))
    finally:
        if handle is not None:
            handle.close()
    return results
