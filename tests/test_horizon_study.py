"""The horizon study (issue 33): one run per configuration read at every length, longer runs
continued bit for bit from saved states, the smaller-step control, pair-flip noise, and the
low-rank control (``complement="closed"``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snr_dist import SNRAdamW
from snr_dist.experiments import horizon
from snr_dist.experiments.data import pair_flip_label_noise, parse_noise
from snr_dist.experiments.study import (
    GATE_MATCHED,
    Job,
    StudyConfig,
    mean_gate,
    run_study,
    train_job,
)
from snr_dist.options import SNROptions

CONFIG = {
    "name": "hz",
    "study": "label_noise_horizon",
    "seeds": [0],
    "workers": 1,
    "task": {"noise": [0.0, 0.4], "hidden": [16], "horizons": [20, 40, 80], "clean_steps": 40},
    "budget": {
        "steps": 40,
        "batch_size": 64,
        "eval_every": 20,
        "eval_dense_until": 20,
        "eval_dense_every": 5,
        "monitor": True,
        "extend_to": 80,
    },
    "methods": [
        {"name": "AdamW", "type": "adamw", "lr": [1e-3, 1e-2], "lr_warmup": 10},
        {"name": "SNR diag", "type": "snr_adamw", "lr": [1e-2], "lr_warmup": 10},
        {
            "name": "span",
            "type": "snr_adamw",
            "lr": [1e-2],
            "lr_warmup": 10,
            "snr": {"mode": "subspace", "rank": 4, "gate": "none", "complement": "closed"},
        },
        {
            "name": "cross",
            "type": "snr_adamw",
            "lr": [1e-2],
            "lr_warmup": 10,
            "microbatches": 2,
            "snr": {"estimator": "cross_sample"},
        },
    ],
    "oracle_early_stopping": ["AdamW"],
    "gate_matched": ["SNR diag"],
}


def _history(rec):
    keys = ("step", "test_acc", "train_loss", "memorised", "stop_ratio", "stop_cross")
    return [tuple(h.get(k) for k in keys) for h in rec["history"]]


def test_longer_runs_continue_bit_for_bit_and_every_horizon_is_read(tmp_path):
    cfg = StudyConfig.model_validate(CONFIG)
    records = run_study(cfg, tmp_path, progress=False)
    keys = [json.loads(k) for k in records]
    grid = [k for k in keys if len(k) == 5]
    longer = [k for k in keys if len(k) == 6]
    matched = [k for k in keys if len(k) == 7]
    assert len(grid) == 2 * 5  # two settings x five grid points
    assert {k[1] for k in longer} == {"AdamW", "SNR diag", "span", "cross"}
    assert all(k[0] == 0.4 and k[5] == 80 for k in longer)  # clean runs are not extended
    assert [k[1] for k in matched] == [GATE_MATCHED.format("SNR diag")]
    # the clean setting's runs stop at its own length
    clean = [r for k, r in zip(keys, records.values()) if k[0] == 0.0]
    assert all(r["history"][-1]["step"] == 40 for r in clean)
    # an extension equals training from scratch to its length (model, optimizer, schedule,
    # batch order and monitor restored from the saved state)
    straight = cfg.model_copy(
        update={"budget": cfg.budget.model_copy(update={"steps": 80, "extend_to": 0})}
    )
    for key in longer:
        rec = records[json.dumps(key)]
        ref = train_job(straight, Job(*key[:5]))
        assert _history(rec) == _history(ref), key[1]
    # the smaller-step control: AdamW at SNR diag's lr times its mean gate
    snr_key = next(k for k in grid if k[0] == 0.4 and k[1] == "SNR diag")
    gate = mean_gate(records[json.dumps(snr_key)]["history"], 40)
    spec = json.loads(matched[0][6])
    assert 0 < gate < 1 and spec["lr"] == [float(f"{1e-2 * gate:.3g}")]
    # the report reads each horizon, with per-horizon selection and the oracle row
    rows = horizon.horizon_rows(cfg, records)
    assert sorted(rows[0.4]) == [20, 40, 80] and sorted(rows[0.0]) == [20, 40]
    names_80 = [r.method for r in rows[0.4][80]]
    assert "AdamW + oracle early stop" in names_80 and GATE_MATCHED.format("SNR diag") in names_80
    mon = horizon.monitor_rows(cfg, records)
    assert {r["rule"] for r in mon} == {horizon._rule_name(s) for s in horizon.RULES}
    assert horizon.recommended_rule(mon) in {r["rule"] for r in mon}


def test_rerun_reuses_every_finished_run(tmp_path):
    cfg = StudyConfig.model_validate(
        {**CONFIG, "methods": CONFIG["methods"][:2], "gate_matched": ["SNR diag"]}
    )
    first = run_study(cfg, tmp_path, progress=False)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    again = run_study(cfg, tmp_path, progress=False)
    assert again.keys() == first.keys()
    assert (tmp_path / "results.jsonl").read_text().splitlines() == lines  # nothing re-ran


def test_stop_rules_need_patience_and_min_step():
    steps = range(100, 1600, 100)
    ratios = [2.0, 2.0, 0.5, 0.5, 0.5, 0.5, 0.4, 0.5, 0.9, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7]
    hist = [{"step": s, "stop_ratio": r} for s, r in zip(steps, ratios)]
    # below 1 from step 300 (MIN_STEP): the condition holds at 300, 400, 500: fires at 500
    assert hist[horizon.stop_index(hist, "below", 1.0, 200)]["step"] == 500
    assert horizon.stop_index(hist, "below", 0.3, 100) == len(hist) - 1  # never: the end
    # the lowest reading is 0.4 (step 700); above 0.4 * 2 = 0.8 from step 900 on
    assert hist[horizon.stop_index(hist, "rise", 1.0, 200)]["step"] == 1100
    # a reading missing (no statistic yet) is skipped
    hist[3]["stop_ratio"] = None
    assert hist[horizon.stop_index(hist, "below", 1.0, 200)]["step"] == 500


def test_the_bundled_config_smoke_runs_and_writes_the_report(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "snr_dist.cli",
            "experiment",
            "label_noise_horizon",
            "--smoke",
            "--no-progress",
            "--workers",
            "1",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "label_noise_horizon-smoke"
    report = (folder / "report.md").read_text()
    for name in ("horizon.png", "frontier.png", "monitor.png", "summary.json"):
        assert (folder / name).is_file(), name
    assert "validation-free stop" in report and "80 steps" in report
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["recommended_rule"] in {horizon._rule_name(s) for s in horizon.RULES}


def test_pair_flip_noise_moves_exactly_the_fraction_one_class_up():
    y = torch.arange(1000) % 10
    noisy, flipped = pair_flip_label_noise(y, 0.3, 10, torch.Generator().manual_seed(0))
    assert int(flipped.sum()) == 300
    assert torch.equal(noisy[flipped], (y[flipped] + 1) % 10)
    assert torch.equal(noisy[~flipped], y[~flipped])
    assert parse_noise(0.2) == ("symmetric", 0.2)
    assert parse_noise("pairflip:0.3") == ("pairflip", 0.3)
    for bad in ("pairflip", "flip:0.3", "pairflip:x", "pairflip:1.5"):
        with pytest.raises(ValueError, match="label noise"):
            parse_noise(bad)


@pytest.mark.parametrize("gate", ["none", "wiener"])
def test_a_closed_complement_keeps_every_update_in_the_tracked_span(gate):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 30))
    b = torch.nn.Parameter(torch.randn(30))
    opt = SNRAdamW(
        [w, b], lr=1e-2, weight_decay=0.0, mode="subspace", rank=4, gate=gate, complement="closed"
    )
    for step in range(6):
        before = w.detach().clone()
        # the basis that gates this step (refreshes come after the update)
        q = opt.state[w]["basis"].clone() if step else None
        opt.zero_grad()
        ((torch.randn(40, 30) * w).sum() + (b**2).sum()).backward()
        opt.step()
        if q is None:  # the first step creates the tracker (a random basis) as it steps
            continue
        d = w.detach() - before  # the basis is on the columns (30 < 40)
        outside = d - (d @ q) @ q.T
        # (fp32 rounding of w itself is the floor: a small gated step is near it)
        assert float(outside.detach().norm()) <= 1e-4 * float(d.norm()) + 1e-6 * float(
            w.detach().norm()
        )
    m = opt.metrics()["params"]
    assert m["group0.param0"]["reservoir_gate"] == 0.0
    with pytest.raises(ValueError, match="complement"):
        SNROptions(complement="closed")  # diagonal mode has no span
    with pytest.raises(ValueError, match="complement"):
        SNROptions(mode="subspace", complement="open")


def test_horizon_config_refuses_what_cannot_run(tmp_path):
    from snr_dist.experiments.config import ConfigError
    from snr_dist.experiments.study import load_study

    bad = dict(CONFIG, budget={**CONFIG["budget"], "extend_to": 30})
    path = Path(tmp_path) / "bad.yaml"
    path.write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="extend_to = 30"):
        load_study(path)
    with pytest.raises(ValueError, match="gate_matched"):
        StudyConfig.model_validate({**CONFIG, "gate_matched": ["AdamW"]})
    with pytest.raises(ValueError, match="cross_sample"):
        StudyConfig.model_validate(
            {**CONFIG, "methods": [{**CONFIG["methods"][3], "microbatches": 1}]}
        )


def test_fewer_seeds_for_a_method_and_for_the_longer_runs(tmp_path):
    """`MethodConfig.seeds` runs a costly method on fewer seeds (same hash: adding or dropping
    seeds keeps its finished runs); `budget.extend_methods`/`extend_seeds` pick which selected
    points run longer, and the gate-matched control runs on the extension's seeds."""
    methods = [dict(m) for m in CONFIG["methods"][:2]]
    methods[1]["seeds"] = [1]
    budget = {**CONFIG["budget"], "extend_methods": ["SNR diag"], "extend_seeds": [1]}
    cfg = StudyConfig.model_validate(
        {
            **CONFIG,
            "seeds": [0, 1],
            "task": {**CONFIG["task"], "noise": [0.4]},
            "methods": methods,
            "budget": budget,
        }
    )
    assert cfg.seeds_for("AdamW") == [0, 1] and cfg.seeds_for("SNR diag") == [1]
    records = run_study(cfg, tmp_path, progress=False)
    keys = [json.loads(k) for k in records]
    grid = [(k[1], k[3]) for k in keys if len(k) == 5]
    assert sorted(grid) == [("AdamW", 0), ("AdamW", 0), ("AdamW", 1), ("AdamW", 1), ("SNR diag", 1)]
    assert [(k[1], k[3]) for k in keys if len(k) == 6] == [("SNR diag", 1)]
    assert [k[3] for k in keys if len(k) == 7] == [1]
    report = horizon.horizon_rows(cfg, records)
    row = next(r for r in report[0.4][80] if r.method == "SNR diag")
    assert len(row.summaries) == 1
    # the seed list is not part of the method's identity: all seeds again reuses seed 1's run
    methods[1]["seeds"] = None
    more = StudyConfig.model_validate({**cfg.model_dump(mode="json"), "methods": methods})
    from snr_dist.experiments.study import all_jobs

    assert {j.key for j in all_jobs(cfg)} < {j.key for j in all_jobs(more)}
    with pytest.raises(ValueError, match=r"seeds = \[7\]: none among the study's seeds"):
        StudyConfig.model_validate({**CONFIG, "methods": [{**CONFIG["methods"][0], "seeds": [7]}]})
    with pytest.raises(ValueError, match=r"budget.extend_methods = \['nope'\]"):
        StudyConfig.model_validate(
            {**CONFIG, "budget": {**CONFIG["budget"], "extend_methods": ["nope"]}}
        )


def test_a_method_in_some_settings_and_hashes_that_outlive_new_options():
    """`MethodConfig.settings` keeps a method out of the other settings (its jobs and rows);
    an option added to SNROptions later (state_dtype) leaves the hashes of methods that keep
    its default as they were, so finished runs stay reusable (this hash is the label_noise_horizon
    runs' SNR diag, written before state_dtype existed)."""
    from snr_dist.experiments.study import MethodConfig, all_jobs, method_hash

    methods = [dict(m) for m in CONFIG["methods"][:2]]
    methods[1]["settings"] = [0.4]
    cfg = StudyConfig.model_validate({**CONFIG, "methods": methods})
    assert {j.setting for j in all_jobs(cfg) if j.method == "SNR diag"} == {0.4}
    assert cfg.runs_in("AdamW", 0.0) and not cfg.runs_in("SNR diag", 0.0)
    snr_diag = {"name": "SNR diag", "type": "snr_adamw", "lr": [1e-3, 3e-3, 1e-2, 3e-2]}
    snr_diag |= {"lr_warmup": 50, "snr": {"mode": "diagonal"}}
    assert method_hash(MethodConfig.model_validate(snr_diag)) == "3d7696ae33223e17"
    bf16 = MethodConfig.model_validate({**snr_diag, "snr": {"state_dtype": "bfloat16"}})
    assert method_hash(bf16) != "3d7696ae33223e17"
