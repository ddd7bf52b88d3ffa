"""``snr-dist entk``: the ENTK target spectrum of an MLP on noisy digits, during training.

Picks ``data.n_points`` training points once, records where their clean targets and their
label noise sit in the ENTK eigenbasis (`snr_dist.entk.record`) at initialisation and every
``training.record_every`` epochs, and writes ``entk.json`` (config, every record, the
training metrics at each record) and ``entk.png`` (energy curves at init and at the end).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from tqdm.auto import tqdm

from snr_dist.experiments.config import ConfigError, OptimizerConfig, _Strict, load_config
from snr_dist.experiments.json_safe import json_safe
from snr_dist.options import SNROptions


class ENTKDataConfig(_Strict):
    dataset: Literal["digits"] = "digits"
    label_noise: float = Field(default=0.4, ge=0, lt=1)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)
    n_points: int = Field(default=200, ge=2)  # training points the kernel is computed on
    seed: int = 0  # split, label noise, the choice of the n_points (and Nystrom landmarks)


class ENTKModelConfig(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [128, 128], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    seed: int = 0

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError(f"every hidden width must be >= 1, got {value}")
        return value


class ENTKTrainingConfig(_Strict):
    optimizer: Literal["adamw", "snr_adamw"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    epochs: int = Field(default=0, ge=0)  # 0: record at initialisation only
    batch_size: int = Field(default=128, ge=1)
    record_every: int = Field(default=10, ge=1)  # epochs
    snr: SNROptions | None = None

    @model_validator(mode="after")
    def _snr_only_for_snr(self) -> ENTKTrainingConfig:
        if self.optimizer == "adamw" and self.snr is not None:
            raise ValueError("'snr' options apply only to optimizer 'snr_adamw'")
        return self


class ENTKKernelConfig(_Strict):
    method: Literal["exact", "nystrom"] = "exact"
    mode: Literal["trace", "full"] = "trace"
    landmarks: int = Field(default=64, ge=1)  # nystrom only
    chunk_size: int | None = Field(default=50, ge=1)  # examples whose Jacobians are held at once


class ENTKConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    threads: int | None = Field(default=None, ge=1)
    data: ENTKDataConfig = ENTKDataConfig()
    model: ENTKModelConfig = ENTKModelConfig()
    training: ENTKTrainingConfig = ENTKTrainingConfig()
    kernel: ENTKKernelConfig = ENTKKernelConfig()

    @model_validator(mode="after")
    def _landmarks_fit(self) -> ENTKConfig:
        if self.kernel.method == "nystrom" and self.kernel.landmarks > self.data.n_points:
            raise ValueError(
                f"kernel.landmarks ({self.kernel.landmarks}) must be <= data.n_points "
                f"({self.data.n_points})"
            )
        return self


def load_entk_config(
    path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None
) -> ENTKConfig:
    """Read, override (``--set``) and validate; `ConfigError` names every bad key."""
    return load_config(path, overrides, raw, schema=ENTKConfig)  # type: ignore[return-value]


def run_entk(cfg: ENTKConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train (if ``training.epochs > 0``) and record; write ``entk.json`` and ``entk.png``
    under ``out_dir``; return the JSON payload."""
    from snr_dist.entk import ENTKCallback, plot_cumulative
    from snr_dist.experiments.data import load_digits_noisy
    from snr_dist.experiments.models import mlp
    from snr_dist.experiments.trainer import build_optimizer, evaluate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    d, t, k = cfg.data, cfg.training, cfg.kernel
    data = load_digits_noisy(d.label_noise, d.test_fraction, d.seed)
    if d.n_points > len(data.x_train):  # the subset is drawn from the training split
        raise ConfigError(
            f"data.n_points = {d.n_points}: the training split has {len(data.x_train)} points "
            f"(data.test_fraction = {d.test_fraction}); allowed: 2 to {len(data.x_train)}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = mlp(
        data.num_features, cfg.model.hidden, data.num_classes, cfg.model.activation, cfg.model.seed
    )
    cb = ENTKCallback(
        data.x_train,
        data.y_train_clean,
        data.y_train,
        num_classes=data.num_classes,
        n_points=d.n_points,
        seed=d.seed,
        kernel=k.method,
        mode=k.mode,
        landmarks=k.landmarks,
        chunk_size=k.chunk_size,
    )
    flipped_in_subset = int(data.flipped[cb.indices].sum())

    def snapshot(epoch: int, step: int) -> None:
        rec = cb.record(net, epoch=epoch, step=step, **evaluate(net, data))
        line = ENTKCallback.summary(rec)
        tqdm.write(f"{line} test acc={rec['test_acc']:.3f} memorised={rec['memorised']:.3f}")

    opt = None
    if t.epochs > 0:
        ocfg = OptimizerConfig(
            name=t.optimizer, type=t.optimizer, lr=t.lr, weight_decay=t.weight_decay, snr=t.snr
        )
        opt = build_optimizer(ocfg, net.parameters())
    order = torch.Generator().manual_seed(10_000 + cfg.model.seed)
    t0 = time.perf_counter()
    snapshot(0, 0)
    step = 0
    diverged = None
    n = len(data.x_train)
    for epoch in tqdm(range(1, t.epochs + 1), desc="train", disable=not progress, leave=False):
        net.train()
        perm = torch.randperm(n, generator=order)
        for begin in range(0, n, t.batch_size):
            idx = perm[begin : begin + t.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            step += 1
        if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
            # a non-finite model has no kernel to decompose: stop, keep what was recorded
            diverged = epoch
            tqdm.write(f"training diverged in epoch {epoch} (non-finite weights): stopped")
            break
        if epoch % t.record_every == 0 or epoch == t.epochs:
            snapshot(epoch, step)
    payload = {
        "name": cfg.name,
        "config": cfg.model_dump(),
        "n_points": len(cb.indices),
        "flipped_in_subset": flipped_in_subset,
        "indices": cb.indices.tolist(),
        "wall_s": time.perf_counter() - t0,
        "diverged_in_epoch": diverged,
        "records": cb.history,
    }
    # strict JSON: a diverged run's non-finite numbers are null
    (out_dir / "entk.json").write_text(json.dumps(json_safe(payload), indent=1))
    first, last = cb.history[0], cb.history[-1]
    shown = [first] if first is last else [first, last]
    plot_cumulative(
        shown,
        out_dir / "entk.png",
        title=f"{cfg.name}: targets in the ENTK eigenbasis ({k.method}, {k.mode}, "
        f"n={len(cb.indices)}; dotted: k90)",
    )
    return payload
