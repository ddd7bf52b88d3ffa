"""`snr-dist train --report-to tensorboard`: real event files, read back with TensorBoard's own
reader; the report's per-layer gate picture."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from snr_dist.cli import main

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


DOC = Path(__file__).resolve().parent.parent / "docs" / "integrations" / "tensorboard.md"


def _documented_command() -> list[str]:
    """The first line of the page's bash block: ``snr-dist train ...``."""
    text = DOC.read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    words = block.splitlines()[0].split()
    assert words[:2] == ["snr-dist", "train"], words
    return words[1:]


def test_report_to_tensorboard_writes_scalars_per_layer_and_gate_histograms(tmp_path):
    args = _documented_command()  # the page's command, with the output under tmp_path
    args[args.index("--output-dir") + 1] = str(tmp_path)
    rc = main(
        [
            *args,
            "--set",
            "train.epochs=3",
            "--set",
            "train.seeds=[0]",
            "--set",
            "train.eval_every=1",
            "--set",
            "model.hidden=[32]",
            "--no-progress",
        ]
    )
    assert rc == 0
    run = tmp_path / "quickstart"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    snr = _events(run / "tensorboard" / "SNRAdamW-seed0")
    tags = snr.Tags()
    # the MLP 64-32-10 has two Linear layers, modules "0" and "2"
    for layer in ("0", "2", "all"):
        for key in ("gate_mean", "closed_frac", "snr_q10", "snr_q50", "snr_q90"):
            events = snr.Scalars(f"snr/{layer}/{key}")
            assert len(events) == 3 and all(math.isfinite(e.value) for e in events)
        assert f"gates/{layer}" in tags["histograms"]
    gates = [e.value for e in snr.Scalars("snr/0/gate_mean")]
    logged = [r["layer_gate_mean"]["0"] for r in records if r["optimizer"] == "SNRAdamW"]
    assert gates == pytest.approx(logged, rel=1e-6)  # the same numbers as metrics.jsonl
    steps = [e.step for e in snr.Scalars("eval/test_acc")]
    assert steps == [r["step"] for r in records if r["optimizer"] == "SNRAdamW"]
    hist = snr.Histograms("gates/0")[-1].histogram_value
    assert hist.num == 64 * 32 + 32 and 0.0 <= hist.min <= hist.max <= 1.0  # one per gate
    adamw = _events(run / "tensorboard" / "AdamW-seed0").Tags()
    assert "eval/test_acc" in adamw["scalars"]
    assert not [t for t in adamw["scalars"] if t.startswith("snr/")]
    report = (run / "report.md").read_text()
    assert "![gates per layer](gates.png)" in report and (run / "gates.png").stat().st_size > 0
