"""The main job end to end, and the label-noise claim at small scale (real training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from snr_dist.cli import main
from snr_dist.experiments.config import load_config
from snr_dist.experiments.trainer import run_experiment

QUICKSTART = str(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml")


def test_train_command_writes_metrics_report_and_curves(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--config",
            QUICKSTART,
            "--output-dir",
            str(tmp_path),
            "--set",
            "train.epochs=3",
            "--set",
            "train.seeds=[0, 1]",
            "--set",
            "train.eval_every=1",
            "--set",
            "model.hidden=[32]",
            "--no-progress",
        ]
    )
    assert rc == 0
    run_dir = tmp_path / "quickstart"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3  # optimizers x seeds x epochs
    assert {r["optimizer"] for r in records} == {"AdamW", "SNRAdamW"}
    snr = [r for r in records if r["optimizer"] == "SNRAdamW"]
    assert all(0.0 <= r["gate_mean"] <= 1.0 for r in snr)
    report = (run_dir / "report.md").read_text()
    for piece in ("| AdamW |", "| SNRAdamW |", "best test acc", "memorised", "±", "curves.png"):
        assert piece in report
    png = (run_dir / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| SNRAdamW |" in capsys.readouterr().out


def test_cross_sample_with_microbatches_runs(tmp_path):
    cfg = load_config(
        QUICKSTART,
        [
            "train.epochs=2",
            "train.seeds=[0]",
            "train.microbatches=2",
            "model.hidden=[32]",
            "optimizers.1.snr.estimator=cross_sample",
            "optimizers.1.snr.mode=subspace",
            "optimizers.1.snr.rank=4",
            "train.progress=false",
        ],
    )
    results = run_experiment(cfg, tmp_path)
    assert [r.optimizer for r in results] == ["AdamW", "SNRAdamW"]
    assert all(0 <= r.history[-1]["gate_mean"] <= 1 for r in results[1:])


@pytest.mark.slow
def test_label_noise_snr_adamw_memorises_far_less_than_adamw():
    """Digits, 40% flipped labels, same model/init/batches/lr: AdamW memorises > 80% of the
    flipped labels; SNRAdamW (defaults) < 20%."""
    cfg = load_config(
        QUICKSTART,
        [
            "train.epochs=120",
            "train.seeds=[0]",
            "train.eval_every=120",
            "train.progress=false",
            "train.threads=1",
        ],
    )
    adamw, snr = run_experiment(cfg)
    mem_adamw = adamw.history[-1]["memorised"]
    mem_snr = snr.history[-1]["memorised"]
    assert mem_adamw > 0.8, mem_adamw
    assert mem_snr < 0.2, mem_snr
    assert snr.history[-1]["test_acc"] > adamw.history[-1]["test_acc"]
