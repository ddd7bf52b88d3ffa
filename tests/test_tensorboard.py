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
    assert "stop/ratio" in adamw["scalars"] and "stop/ratio" in tags["scalars"]  # any optimizer
    report = (run / "report.md").read_text()
    assert "![gates per layer](gates.png)" in report and (run / "gates.png").stat().st_size > 0


def test_a_histogram_with_nan_gates_is_written_without_them(tmp_path):
    """A diverging run (``skip_nonfinite=False``) can reach non-finite gates; the sink must
    not end the run over its logging: the finite values are written, the rest left out."""
    import torch

    from snr_dist.integrations.tensorboard import TensorBoardSink

    sink = TensorBoardSink(tmp_path)
    gates = torch.tensor([0.2, float("nan"), 0.7, float("inf"), 0.9])
    sink.write({"step": 3, "loss": float("nan")}, 3, histograms={"layer": gates})
    sink.write({"step": 4}, 4, histograms={"all_nan": torch.full((3,), float("nan"))})
    sink.close()
    hist = _events(tmp_path).Histograms("gates/layer")
    assert [h.step for h in hist] == [3]
    assert hist[0].histogram_value.num == 3
    assert math.isclose(hist[0].histogram_value.sum, 1.8, rel_tol=1e-6)
    assert "gates/all_nan" not in _events(tmp_path).Tags()["histograms"]


def test_an_optimizer_over_flat_partitions_still_reports_the_whole_model():
    """DeepSpeed ZeRO 1-3 hand an elementwise SNRAdamW flat partitions that belong to no layer:
    the per-layer scalars cannot exist, the ``all`` ones (what it holds) still do."""
    import torch

    from snr_dist import SNRAdamW
    from snr_dist.integrations import telemetry

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    opt = SNRAdamW([flat], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        flat.grad = torch.randn(flat.shape, generator=gen) + 0.5
        opt.step()
    scalars, hists = telemetry.collect(opt, telemetry.layer_groups(model), gates=True)
    assert sorted(scalars) == [f"all/{k}" for k in sorted(telemetry.KEYS)]
    assert 0.0 <= scalars["all/gate_mean"] <= 1.0
    assert hists["all"].numel() == flat.numel()
