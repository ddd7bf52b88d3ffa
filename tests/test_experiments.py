"""Claim experiments: smoke runs of every study (structure, not outcomes), resumption, the
selection rule, and config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from snr_dist.experiments.config import ConfigError
from snr_dist.experiments.study import (
    Job,
    StudyConfig,
    load_study,
    method_hash,
    run_study,
    select,
)
from snr_dist.experiments.study_report import PER_SEED_FROM

ROOT = Path(__file__).resolve().parents[1]
# every study config, so that a new one cannot ship without its smoke run
# label_noise_horizon writes a report of its own layout (horizons, extensions, the stop):
# tests/test_horizon_study.py smoke-runs it
EXPERIMENTS = sorted(
    p.stem for p in (ROOT / "configs/experiments").glob("*.yaml") if p.stem != "label_noise_horizon"
)


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "snr_dist.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_smoke_run_writes_a_complete_report(name, tmp_path):
    cfg = load_study(ROOT / "configs/experiments" / f"{name}.yaml", smoke=True)
    r = _cli(
        "experiment",
        name,
        "--smoke",
        "--workers",
        "1",
        "--no-progress",
        "--output-dir",
        str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / cfg.name
    report = (out / "report.md").read_text()
    summary = json.loads(
        (out / "summary.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"summary.json holds {c}, not JSON"),
    )
    assert (out / "curves.png").stat().st_size > 1000
    if cfg.budget.trace_gates:  # per-layer gate traces of the SNR rows
        assert (out / "gates.png").stat().st_size > 1000 and "gates.png" in report
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    n_runs = sum(len(m.grid()) for m in cfg.methods) * len(cfg.seeds)
    assert len(lines) == n_runs * len(summary["settings"])
    for rows in summary["settings"].values():
        names = [row["method"] for row in rows]
        expected = [m.name for m in cfg.methods] + [
            f"{m} + oracle early stop" for m in cfg.oracle_early_stopping
        ]
        assert sorted(names) == sorted(expected)
        for m in cfg.methods:
            assert f"| {m.name} |" in report
    if len(cfg.seeds) >= PER_SEED_FROM:  # every seed's value, not only mean ± std
        assert "| method | per seed | " + " | ".join(f"seed {s}" for s in cfg.seeds) in report
        for m in cfg.methods:
            per = [x for x in report.splitlines() if x.startswith(f"| {m.name} | ")][1:]
            assert per and all(x.count("|") == len(cfg.seeds) + 3 for x in per), per
    else:
        assert "| per seed |" not in report
    for rec in lines:
        assert rec["history"], rec["key"]
        assert all(h["step"] <= cfg.budget.steps for h in rec["history"])


def test_rerun_reuses_finished_runs_and_fresh_reruns(tmp_path):
    path = ROOT / "configs/experiments/convergence.yaml"
    cfg = load_study(path, ["seeds=[0]", "methods.1.weight_decay=[0.1]"], smoke=True)
    cfg = cfg.model_copy(update={"workers": 1})
    first = run_study(cfg, tmp_path, progress=False)
    mtime = (tmp_path / "results.jsonl").stat().st_mtime_ns
    second = run_study(cfg, tmp_path, progress=False)
    assert second.keys() == first.keys()
    assert [second[k]["history"] for k in first] == [first[k]["history"] for k in first]
    assert (tmp_path / "results.jsonl").stat().st_mtime_ns == mtime  # nothing re-trained
    # a changed config is not mixed with old results
    changed = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"steps": 20})})
    third = run_study(changed, tmp_path, progress=False)
    assert all(rec["history"][-1]["step"] <= 20 for rec in third.values())
    # a changed method reruns that method's jobs only (each job carries its method's hash)
    run_study(cfg, tmp_path, progress=False, fresh=True)
    before = (tmp_path / "results.jsonl").read_text().splitlines()
    methods = list(cfg.methods)
    methods[0] = methods[0].model_copy(update={"lr": [2e-3]})
    fourth = run_study(cfg.model_copy(update={"methods": methods}), tmp_path, progress=False)
    after = (tmp_path / "results.jsonl").read_text().splitlines()
    added = [json.loads(line) for line in after[len(before) :]]
    assert {json.loads(r["key"])[1] for r in added} == {methods[0].name}
    assert len(fourth) == len(first)


def test_runs_are_deterministic_and_same_batches_for_every_method(tmp_path):
    path = ROOT / "configs/experiments/label_noise.yaml"
    cfg = load_study(path, smoke=True).model_copy(update={"workers": 1})
    a = run_study(cfg, tmp_path / "a", progress=False)
    b = run_study(cfg, tmp_path / "b", progress=False)
    for key in a:
        ha = [{k: v for k, v in h.items() if k != "wall_s"} for h in a[key]["history"]]
        hb = [{k: v for k, v in h.items() if k != "wall_s"} for h in b[key]["history"]]
        assert ha == hb


def test_in_process_runs_use_one_thread_as_workers_do(tmp_path):
    """--workers 1 trains in this process: with one torch thread, as each worker process does
    (thread counts change reduction orders, so results would depend on --workers), and the
    caller's thread count is restored afterwards."""
    path = ROOT / "configs/experiments/convergence.yaml"
    cfg = load_study(path, ["seeds=[0]", "methods.1.weight_decay=[0.1]"], smoke=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        recs = run_study(cfg.model_copy(update={"workers": 1}), tmp_path, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert recs and {rec["threads"] for rec in recs.values()} == {1}


def test_records_and_reports_name_the_kernels_instruction_set(tmp_path):
    """The last bits of a run depend on the instruction set ATen's kernels were built for (a
    seed on an edge lands elsewhere on another CPU), so every record and report says which."""
    from snr_dist.experiments import report, study

    cap = torch.backends.cpu.get_cpu_capability()
    assert f"ATen CPU capability {cap}" in study.machine()
    assert f"ATen CPU capability {cap}" in report.machine()
    path = ROOT / "configs/experiments/convergence.yaml"
    cfg = load_study(path, ["seeds=[0]", "methods.1.weight_decay=[0.1]"], smoke=True)
    recs = run_study(cfg.model_copy(update={"workers": 1}), tmp_path, progress=False)
    assert recs and {rec["cpu_capability"] for rec in recs.values()} == {cap}
    # a worker started with another capability records that one (the variable is read at the
    # first kernel dispatch, so it must be set before the process starts)
    code = "from snr_dist.experiments.study import machine; print(machine())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "ATen CPU capability DEFAULT" in out.stdout, out.stderr


def _fake_records(cfg: StudyConfig, val: dict, test: dict) -> dict:
    recs = {}
    for m in cfg.methods:
        for i in range(len(m.grid())):
            for s in cfg.seeds:
                hist = [
                    {
                        "step": 10,
                        "wall_s": 1.0,
                        "test_acc": test[(m.name, i)] + 0.1,
                        "val_acc": val[(m.name, i)],
                        "val_loss": 1.0,
                        "memorised": 0.0,
                        "train_acc": 1.0,
                        "train_loss": 0.1,
                        "test_loss": 1.0,
                    },
                    {
                        "step": 20,
                        "wall_s": 2.0,
                        "test_acc": test[(m.name, i)],
                        "val_acc": val[(m.name, i)],
                        "val_loss": 1.5,
                        "memorised": 0.5,
                        "train_acc": 1.0,
                        "train_loss": 0.01,
                        "test_loss": 2.0,
                    },
                ]
                job = Job(0.4, m.name, i, s, method_hash(m))
                recs[job.key] = {"history": hist, "stopped": None}
    return recs


def _noise_study(name: str, method: dict, **extra) -> dict:
    """A two-seed label-noise study config with one method ``A`` (for `_fake_records`)."""
    return {
        "name": name,
        "study": "label_noise",
        "seeds": [0, 1],
        "task": {"noise_levels": [0.4]},
        "budget": {"steps": 20, "batch_size": 8, "eval_every": 10},
        "methods": [{"name": "A", "type": "adamw", **method}],
        **extra,
    }


def test_selection_uses_validation_not_test_and_oracle_uses_test():
    raw = _noise_study("sel", {"lr": [1e-3, 3e-3]}, oracle_early_stopping=["A"])
    cfg = StudyConfig.model_validate(raw)
    # point 0: better test, worse validation -> point 1 must be chosen
    recs = _fake_records(
        cfg, val={("A", 0): 0.5, ("A", 1): 0.6}, test={("A", 0): 0.9, ("A", 1): 0.7}
    )
    rows = select(cfg, recs)[0.4]
    plain = next(r for r in rows if r.method == "A")
    assert plain.point["lr"] == 3e-3
    assert plain.stat("final_test_acc")[0] == pytest.approx(0.7)
    assert plain.stat("val_loss_rise")[0] == pytest.approx(0.5)
    oracle = next(r for r in rows if r.method == "A + oracle early stop")
    assert oracle.point["lr"] == 1e-3  # the oracle picks by test accuracy, at its best step
    assert oracle.stat("final_test_acc")[0] == pytest.approx(1.0)
    assert oracle.stat("final_memorised")[0] == 0.0


def test_report_grid_lists_every_grid_point_with_its_own_numbers(tmp_path):
    """`report_grid: true` shows where each method's optimum sits (the grokking study gives
    SNR and AdamW different grids); by default the report shows the selected points only."""
    from snr_dist.experiments import study_report

    raw = _noise_study("grid", {"lr": [1e-3, 3e-3], "weight_decay": [0.5]})
    recs = _fake_records(
        StudyConfig.model_validate(raw),
        val={("A", 0): 0.5, ("A", 1): 0.6},
        test={("A", 0): 0.81, ("A", 1): 0.72},
    )
    for grid in (False, True):
        cfg = StudyConfig.model_validate({**raw, "report_grid": grid})
        text = study_report.write(cfg, select(cfg, recs), tmp_path, "cmd", 1.0)
        assert ("Every grid point" in text) is grid
        point0 = "| A | 0.001 | 0.5 | 0.910 ± 0.000 | 0.810 ± 0.000 |"  # best, final test acc
        assert (point0 in text) is grid  # the point not selected appears only in the grid
        assert "| A | 0.003 | 0.5 | 0.820 ± 0.000 | 0.720 ± 0.000 |" in text


def test_lr_warmup_ramps_the_lr_and_leaves_other_methods_runs_valid(tmp_path):
    """A method with `lr_warmup` trains with lr * step / lr_warmup at first; methods without
    it keep the job hash they had before the option existed (their finished runs stay reused:
    this AdamW's hash is the one its runs carried in 0.3.0)."""
    from snr_dist.experiments.study import MethodConfig, train_job

    adamw = MethodConfig(
        name="AdamW", type="adamw", lr=[0.1], weight_decay=[1.0], betas=(0.9, 0.98)
    )
    assert method_hash(adamw) == "8691d352225694c5"
    assert method_hash(adamw.model_copy(update={"lr_warmup": 10})) != method_hash(adamw)
    raw = {
        "name": "warm",
        "study": "grokking",
        "seeds": [0],
        "task": {"p": 11, "ops": ["add"], "embed": 8, "hidden": 16, "target_acc": 1.0},
        "budget": {"steps": 4, "batch_size": 16, "eval_every": 1},
        "methods": [
            {"name": "A", "type": "adamw", "lr": [0.1], "lr_warmup": 0},
            {"name": "W", "type": "adamw", "lr": [0.1], "lr_warmup": 4},
        ],
    }
    cfg = StudyConfig.model_validate(raw)
    seen = []
    real_step = torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        for m in cfg.methods:
            train_job(cfg, Job("add", m.name, 0, 0, method_hash(m)))
    assert seen[:4] == pytest.approx([0.1] * 4)
    assert seen[4:] == pytest.approx([0.025, 0.05, 0.075, 0.1])


def test_convergence_picks_by_steps_to_the_validation_target_and_reports_test_targets():
    raw = {
        "name": "conv",
        "study": "convergence",
        "seeds": [0],
        "task": {"test_targets": [0.95, 0.97], "val_target": 0.9, "target_loss": 0.05},
        "budget": {"steps": 40, "batch_size": 8, "eval_every": 10},
        "methods": [{"name": "A", "type": "adamw", "lr": [1e-3, 3e-3]}],
    }
    cfg = StudyConfig.model_validate(raw)

    def hist(val_at: int, test_at: int) -> list[dict]:
        return [
            {
                "step": s,
                "wall_s": s / 10,
                "val_acc": 0.95 if s >= val_at else 0.5,
                "test_acc": 0.98 if s >= test_at else 0.5,
                "train_loss": 0.01 if s >= 30 else 1.0,
            }
            for s in (10, 20, 30, 40)
        ]

    m = cfg.methods[0]
    # point 0 reaches the test targets first, point 1 the validation target: 1 is chosen
    recs = {
        Job("clean digits", "A", i, 0, method_hash(m)).key: {"history": h, "stopped": None}
        for i, h in enumerate([hist(30, 10), hist(20, 40)])
    }
    (row,) = select(cfg, recs)["clean digits"]
    assert row.point["lr"] == 3e-3
    assert row.stat("steps_to_val")[0] == 20
    assert row.stat("steps_to_test_95")[0] == 40 and row.stat("steps_to_test_97")[0] == 40
    assert row.stat("wall_to_test_97")[0] == pytest.approx(4.0)
    assert row.stat("steps_to_target")[0] == 30


def test_convergence_report_has_a_column_per_test_target():
    """The columns follow ``task.test_targets`` (a third target was once dropped silently);
    the default targets keep the published headers."""
    from snr_dist.experiments.studies import STUDIES

    study = STUDIES["convergence"]
    labels = [label for _, label, _ in study.columns_for({"test_targets": [0.95, 0.96, 0.97]})]
    assert labels[:6] == [
        "steps to 0.95 test acc", "s to 0.95",
        "steps to 0.96 test acc", "s to 0.96",
        "steps to 0.97 test acc", "s to 0.97",
    ]  # fmt: skip
    default = [key for key, _, _ in study.columns_for({})]
    assert default[:4] == [
        "steps_to_test_95", "wall_to_test_95", "steps_to_test_97", "wall_to_test_97",
    ]  # fmt: skip
    assert "steps_to_test_96" not in default
    label_noise = STUDIES["label_noise"]
    assert label_noise.columns_for({}) is label_noise.columns


def test_bad_study_configs_name_the_key(tmp_path):
    path = ROOT / "configs/experiments/label_noise.yaml"
    with pytest.raises(ConfigError, match=r"task\.hiden: unknown key"):
        load_study(path, ["task.hiden=[3]"])
    with pytest.raises(ConfigError, match=r"budget\.steps = 0"):
        load_study(path, ["budget.steps=0"])
    with pytest.raises(ConfigError, match=r"oracle_early_stopping names unknown methods"):
        load_study(path, ["oracle_early_stopping=[Nope]"])
    with pytest.raises(ConfigError, match=r"methods\.2\.snr\.gate"):
        load_study(path, ["methods.2.snr.gate=loud"])
    r = _cli("experiment", "no_such_study")
    assert r.returncode == 2 and "known: [" in r.stderr and "label_noise" in r.stderr


def test_modular_task_labels_are_right():
    from snr_dist.experiments.tasks import modular_pairs

    pairs, y = modular_pairs(7, "div")
    for (a, b), c in zip(pairs.tolist(), y.tolist()):
        assert (c * b) % 7 == a
    pairs, y = modular_pairs(7, "add")
    assert len(y) == 49 and all((a + b) % 7 == c for (a, b), c in zip(pairs.tolist(), y.tolist()))


def test_double_descent_bump_is_the_rise_above_both_sides():
    from snr_dist.experiments.study import Row
    from snr_dist.experiments.study_report import headline

    raw = {
        "name": "dd",
        "study": "double_descent",
        "seeds": [0],
        "task": {"widths": [4, 8, 16, 32]},
        "budget": {"steps": 1, "batch_size": 1, "eval_every": 1},
        "methods": [
            {"name": "A", "type": "adamw", "lr": [1e-3]},
            {"name": "B", "type": "adamw", "lr": [1e-3]},
        ],
    }
    cfg = StudyConfig.model_validate(raw)
    errs = {"A": [0.30, 0.20, 0.35, 0.10], "B": [0.30, 0.25, 0.20, 0.10]}
    selected = {
        w: [
            Row(m, {"lr": 1e-3, "weight_decay": 0.0}, [{"final_test_err": errs[m][i]}], [])
            for m in ("A", "B")
        ]
        for i, w in enumerate([4, 8, 16, 32])
    }
    head = headline(cfg, selected)
    assert head["A"]["bump_width"] == 16 and head["A"]["bump_height"] == pytest.approx(0.15)
    assert head["B"]["bump_height"] == 0.0  # only falls: no double descent


def test_convergence_headline_medians_count_seeds_that_never_arrive_as_slowest():
    from snr_dist.experiments.study import Row
    from snr_dist.experiments.study_report import headline

    raw = {
        "name": "conv",
        "study": "convergence",
        "seeds": [0, 1, 2, 3, 4],
        "task": {"hidden": [8], "test_targets": [0.97]},
        "budget": {"steps": 1, "batch_size": 1, "eval_every": 1},
        "methods": [
            {"name": "AdamW", "type": "adamw", "lr": [1e-3]},
            {"name": "SNR", "type": "snr_adamw", "lr": [1e-3]},
            {"name": "Slow", "type": "snr_adamw", "lr": [1e-3]},
        ],
    }
    cfg = StudyConfig.model_validate(raw)
    steps = {
        "AdamW": [100, 110, 120, 130, 140],
        "SNR": [50, 60, None, None, 70],  # mean of arrivals 60; median seed 70 (None = slowest)
        "Slow": [50, None, None, None, 60],  # the median seed never arrives
    }
    rows = [
        Row(m, {"lr": 1e-3}, [{"steps_to_test_97": v} for v in vs], []) for m, vs in steps.items()
    ]
    head = headline(cfg, {"x": rows})["x"]
    assert head["SNR"]["steps_to_test_97_x_AdamW"] == pytest.approx(0.5)  # 60 / 120
    assert head["SNR"]["median_steps_to_test_97_x_AdamW"] == pytest.approx(70 / 120, abs=1e-3)
    assert head["Slow"]["median_steps_to_test_97_x_AdamW"] is None


def test_publish_replaces_only_the_marked_sections(tmp_path):
    """Markers in the verdict page or in a study page: each study's block goes where its
    markers are, with its pictures linked relative to that page."""
    from snr_dist.experiments.publish import publish

    for name in ("label_noise", "convergence"):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "report.md").write_text(
            f"# t\n\n## {name}: 0.4\n\n| a |\n|---|\n| 1 |\n\n![curves](curves.png)\n\nMethods..."
        )
        (run / "curves.png").write_bytes(name.encode())
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results.md").write_text(
        "intro\n<!-- convergence:begin -->\nold\n<!-- convergence:end -->\nend\n"
    )
    study = docs / "results" / "label-noise.md"
    study.write_text("# noise\n<!-- label_noise:begin -->\nold\n<!-- label_noise:end -->\nend\n")
    (docs / "results" / "other.md").write_text("no markers\n")
    assert publish(tmp_path / "runs", docs) == ["convergence", "label_noise"]
    text = study.read_text()
    assert "old" not in text and "#### label_noise: 0.4" in text and "| 1 |" in text
    assert text.startswith("# noise\n") and text.endswith("end\n") and "Methods" not in text
    assert "![label_noise](label_noise.png)\n<!-- label_noise:end -->" in text  # same folder
    assert (docs / "results" / "label_noise.png").read_bytes() == b"label_noise"
    top = (docs / "results.md").read_text()
    assert top.startswith("intro\n") and "#### convergence: 0.4" in top and "label_noise" not in top
    assert "![convergence](results/convergence.png)" in top  # from docs/ into docs/results/
    assert (docs / "results" / "convergence.png").read_bytes() == b"convergence"
    assert (docs / "results" / "other.md").read_text() == "no markers\n"
    # a gates.png the report does not show (left by an earlier run) is not published
    (tmp_path / "runs" / "label_noise" / "gates.png").write_bytes(b"old")
    publish(tmp_path / "runs", docs)
    assert "gate traces" not in study.read_text()
    assert not (docs / "results" / "label_noise-gates.png").exists()
    # a marker pair in two pages is an error, not a guess
    (docs / "results" / "other.md").write_text(
        "<!-- label_noise:begin -->\n<!-- label_noise:end -->"
    )
    with pytest.raises(ValueError, match="2 pages"):
        publish(tmp_path / "runs", docs)


def test_publish_copies_and_links_every_picture_a_report_shows(tmp_path):
    """Several pictures per report, each under its own name; the horizon study's report has no
    curves.png, so its body ends at its first picture; pictures it does not show, or shows but
    did not write, are left out."""
    from snr_dist.experiments.publish import publish

    runs = tmp_path / "runs"
    horizon = runs / "label_noise_horizon"
    horizon.mkdir(parents=True)
    (horizon / "report.md").write_text(
        "# label_noise_horizon\n\nEach cell: ...\n\n## label noise: 0.4\n\n| h | 100 |\n|---|---|\n"
        "| AdamW | 0.9 |\n\n## The validation-free stop\n\n| t |\n|---|\n| 2 |\n\n"
        "![horizons](horizon.png)\n\n![frontier](frontier.png)\n\n![monitor](monitor.png)\n\n"
        "Methods:\n- **AdamW**: adamw\n\nCommand: `snr-dist experiment label_noise_horizon`\n"
    )
    for file in ("horizon.png", "monitor.png", "curves.png"):  # no frontier.png; curves unshown
        (horizon / file).write_bytes(file.encode())
    grok = runs / "grokking"
    grok.mkdir()
    (grok / "report.md").write_text(
        "# grokking\n\n## operation: div\n\n| a |\n|---|\n| 1 |\n\n![curves](curves.png)\n\n"
        "Methods...\n\n![gate traces](gates.png)\n"
    )
    for file in ("curves.png", "gates.png"):
        (grok / file).write_bytes(file.encode())
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results.md").write_text("verdict\n")
    noise = docs / "results" / "label-noise.md"
    noise.write_text(
        "# n\n\n<!-- label_noise_horizon:begin -->\n<!-- label_noise_horizon:end -->\n"
    )
    (docs / "results" / "grokking.md").write_text(
        "<!-- grokking:begin -->\n<!-- grokking:end -->\n"
    )
    assert publish(runs, docs) == ["grokking", "label_noise_horizon"]

    text = noise.read_text()
    assert "#### label noise: 0.4" in text and "#### The validation-free stop" in text
    assert "| 2 |" in text and "Methods" not in text and "Command" not in text
    assert text.index("| 2 |") < text.index(
        "![label_noise_horizon horizons](label_noise_horizon-horizon.png)\n\n"
        "![label_noise_horizon monitor](label_noise_horizon-monitor.png)\n"
        "<!-- label_noise_horizon:end -->"
    )
    assert "frontier" not in text
    out = docs / "results"
    assert (out / "label_noise_horizon-horizon.png").read_bytes() == b"horizon.png"
    assert (out / "label_noise_horizon-monitor.png").read_bytes() == b"monitor.png"
    assert not (out / "label_noise_horizon-frontier.png").exists()
    assert not (out / "label_noise_horizon.png").exists()  # curves.png: not shown, not copied

    grok_page = (out / "grokking.md").read_text()  # the names the pages already use
    assert "![grokking](grokking.png)\n\n![grokking gate traces](grokking-gates.png)\n" in grok_page
    assert (out / "grokking.png").read_bytes() == b"curves.png"
    assert (out / "grokking-gates.png").read_bytes() == b"gates.png"
    assert (docs / "results.md").read_text() == "verdict\n"


def _diverging_grid(study: str, task: dict, budget: dict, setting: str):
    raw = {
        "name": "d",
        "study": study,
        "seeds": [0],
        "task": task,
        "budget": budget,
        "methods": [{"name": "A", "type": "adamw", "lr": [1e-2, 1e30], "weight_decay": [0.0]}],
    }
    cfg = StudyConfig.model_validate(raw)
    m = cfg.methods[0]
    from snr_dist.experiments.study import train_job

    records = {}
    for i in range(2):
        job = Job(setting, "A", i, 0, method_hash(m))
        records[job.key] = train_job(cfg, job)
    return select(cfg, records)[setting][0]


def test_a_grid_point_that_diverges_is_never_selected_nor_counted_as_reached():
    """lr 1e30 turns the loss into NaN within the first evaluations: that run stops there. It
    must not count as having reached the grokking target at that step, nor beat a run that
    reaches the validation target later because its (short) length is its penalty."""
    torch.set_num_threads(1)
    grok = _diverging_grid(
        "grokking",
        {"p": 11, "ops": ["add"], "embed": 8, "hidden": 16, "target_acc": 0.95},
        {"steps": 100, "batch_size": 16, "eval_every": 10},
        "add",
    )
    assert grok.point["lr"] == 1e-2
    diverged = grok.grid[1].summaries[0]
    assert diverged["reached"] == 0.0 and diverged["steps_to_target"] is None
    conv = _diverging_grid(
        "convergence",
        {"hidden": [32], "val_target": 0.9, "test_targets": [0.9], "target_loss": 0.3},
        {"steps": 300, "batch_size": 64, "eval_every": 20},
        "clean digits",
    )
    assert conv.point["lr"] == 1e-2


def test_entk_records_must_end_at_the_final_step():
    path = ROOT / "configs/experiments/entk_partition.yaml"
    bad = ["budget.steps=50", "budget.eval_every=10", "task.record_every=20"]
    with pytest.raises(ConfigError, match=r"budget.steps \(50\) must be a multiple"):
        load_study(path, bad)


def test_summary_json_is_strict_json(tmp_path):
    """A column without values (the reservoir share at 0% noise) is null, not NaN."""
    from snr_dist.experiments.json_safe import json_safe

    summary = {"a": [float("nan"), 1.0], "b": {"c": float("inf")}, "d": (1, float("-inf"))}
    text = json.dumps(json_safe(summary), allow_nan=False)
    assert json.loads(text) == {"a": [None, 1.0], "b": {"c": None}, "d": [1, None]}
