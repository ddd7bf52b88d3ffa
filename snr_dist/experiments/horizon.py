"""The horizon study's report: every claim read at every training length, with its controls.

`label_noise_horizon` trains one run per configuration and reads it at several training
lengths (its ``task.horizons``). At each horizon every method's lr is selected again, on the
noisy validation set at that step, as a user who trains that long would select it; the test
set is only reported. Lengths past the grid's (``budget.extend_to``) come from the longer runs
of the points selected at the grid's length. The report also holds

- the speed-robustness frontier: for every method and lr, steps to the clean test targets
  against the share of flipped labels memorised at each horizon;
- the validation-free stop (`snr_dist.stopping.StopMonitor`, recorded in every run): the step
  it stops at and the test accuracy there, against the oracle's best-test stop, for several
  stop rules (the one the report recommends is chosen on validation accuracy).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from snr_dist.experiments.json_safe import json_safe
from snr_dist.experiments.studies import STUDIES, is_clean
from snr_dist.experiments.study import (
    GATE_MATCHED,
    Job,
    Row,
    StudyConfig,
    job_method,
    machine,
    mean_sd,
    method_hash,
    select,
)
from snr_dist.stopping import StopRule

# the stop rules read off line (`snr_dist.stopping.StopRule`): (rule, value, patience steps)
RULES = tuple(
    (rule, value, patience)
    for rule, values in (("below", (0.5, 0.75, 1.0, 1.5)), ("rise", (0.25, 0.5, 1.0)))
    for value in values
    for patience in (100, 250)
)
MIN_STEP = 300  # the monitor's own default: three windows of beta = 0.99


def _cut(history: list[dict], h: int) -> list[dict]:
    return [x for x in history if x["step"] <= h]


def _reaches(history: list[dict], h: int) -> bool:
    return bool(history) and history[-1]["step"] >= h and not history[-1].get("diverged")


def _truncated(records: dict[str, dict], h: int) -> dict[str, dict]:
    return {k: {**r, "history": _cut(r["history"], h)} for k, r in records.items()}


def _grid_steps(cfg: StudyConfig, setting: Any) -> int:
    study = STUDIES[cfg.study]
    task = study.task_model.model_validate(cfg.task)
    return (study.steps_for and study.steps_for(task, setting)) or cfg.budget.steps


def horizon_rows(cfg: StudyConfig, records: dict[str, dict]) -> dict[Any, dict[int, list[Row]]]:
    """``{setting: {horizon: rows}}``: each method at the lr its validation accuracy at that
    horizon selects (plus AdamW's oracle-early-stop row and the gate-matched AdamW controls)."""
    study = STUDIES[cfg.study]
    task = study.task_model.model_validate(cfg.task)
    out: dict[Any, dict[int, list[Row]]] = {}
    extra = _extra_runs(cfg, records)
    for setting in study.settings(task):
        grid_len = _grid_steps(cfg, setting)
        per_h: dict[int, list[Row]] = {}
        for h in task.horizons:
            if h <= grid_len:
                rows = select(cfg, _truncated(records, h))[setting]
            else:
                rows = _extended_rows(cfg, setting, extra, h)
            for name, hists in extra.get((setting, "matched"), {}).items():
                cut = [_cut(x, h) for x in hists if _reaches(x, h)]
                if len(cut) == len(hists) and cut:
                    summ = [study.summarise(task, x, None) for x in cut]
                    rows.append(Row(name, _matched_point(cfg, records, setting, name), summ, cut))
            if rows:
                per_h[h] = rows
        out[setting] = per_h
    return out


def _matched_point(cfg, records, setting, name) -> dict[str, float]:
    for rec in records.values():
        key = json.loads(rec["key"])
        if key[0] == setting and key[1] == name and len(key) == 7:
            method = job_method(cfg, Job(*key))
            return method.grid()[0]
    return {"lr": math.nan, "weight_decay": math.nan}


def _extra_runs(cfg: StudyConfig, records: dict[str, dict]) -> dict:
    """Extension and gate-matched runs, by (setting, method) and by (setting, "matched")."""
    out: dict = {}
    for rec in records.values():
        key = json.loads(rec["key"])
        if len(key) == 6:  # [setting, method, point, seed, hash, steps]
            out.setdefault((key[0], key[1]), {}).setdefault(key[2], {})[key[3]] = rec["history"]
        elif len(key) == 7:  # a gate-matched AdamW run
            out.setdefault((key[0], "matched"), {}).setdefault(key[1], []).append(rec["history"])
    return out


def _extended_rows(cfg: StudyConfig, setting: Any, extra: dict, h: int) -> list[Row]:
    study = STUDIES[cfg.study]
    task = study.task_model.model_validate(cfg.task)
    rows = []
    for m in cfg.methods:
        for point, by_seed in extra.get((setting, m.name), {}).items():
            # the seeds that ran this long (budget.extend_seeds may run fewer than the grid)
            hists = [by_seed[s] for s in cfg.seeds_for(m.name) if s in by_seed]
            if not hists or any(not _reaches(x, h) for x in hists):
                continue
            cut = [_cut(x, h) for x in hists]
            summ = [study.summarise(task, x, None) for x in cut]
            rows.append(Row(m.name, m.grid()[point], summ, cut))
            if m.name in cfg.oracle_early_stopping:
                best = [x[: max(range(len(x)), key=lambda k: x[k]["test_acc"]) + 1] for x in cut]
                summ = [study.summarise(task, x, None) for x in best]
                rows.append(Row(f"{m.name} + oracle early stop", m.grid()[point], summ, best))
    return rows


# ---------------------------------------------------------------------- the stop
def stop_index(history: list[dict], rule: str, value: float, patience: int) -> int:
    """Index of the evaluation where the stop fires (the last one if it never does), from the
    monitor's readings recorded at each evaluation (``stop_ratio``)."""
    stop = StopRule(rule, value, patience, MIN_STEP)
    for i, rec in enumerate(history):
        if stop.update(rec["step"], rec.get("stop_ratio")):
            return i
    return len(history) - 1


def _rule_name(spec: tuple) -> str:
    rule, value, patience = spec
    return f"{rule} {value:g}, {patience} steps"


def monitor_rows(cfg: StudyConfig, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Every setting, method, grid point and stop rule: the stop's step, test and validation
    accuracy there, and the run's own best test accuracy (means over seeds), each point read
    on its longest run. The runs keep training past the stop, so every rule is read off the
    same runs."""
    extra = _extra_runs(cfg, records)
    chosen = select(cfg, records)
    # the oracle: AdamW's best test accuracy of any lr (mean over seeds), within the grid's runs
    oracle = {
        s: r.stat("final_test_acc")[0]
        for s, rows in chosen.items()
        for r in rows
        if r.method.endswith("+ oracle early stop")
    }
    out = []
    for setting in chosen:
        for m in cfg.methods:
            if not cfg.runs_in(m.name, setting):
                continue
            mh = method_hash(m)
            for i, point in enumerate(m.grid()):
                seeds = cfg.seeds_for(m.name)
                keys = [Job(setting, m.name, i, s, mh).key for s in seeds]
                if any(k not in records for k in keys):
                    continue
                longer = extra.get((setting, m.name), {}).get(i, {})
                hists = [longer.get(s) or records[k]["history"] for s, k in zip(seeds, keys)]
                for spec in RULES:
                    at = [h[stop_index(h, *spec)] for h in hists]
                    out.append(
                        {
                            "setting": setting,
                            "method": m.name,
                            "lr": point["lr"],
                            "rule": _rule_name(spec),
                            "stop_step": statistics.median(a["step"] for a in at),
                            "fired": sum(stop_index(h, *spec) < len(h) - 1 for h in hists),
                            "test_at_stop": mean_sd([a["test_acc"] for a in at]),
                            "val_at_stop": mean_sd([a["val_acc"] for a in at]),
                            "memorised_at_stop": mean_sd([a["memorised"] for a in at]),
                            "best_test": mean_sd([max(x["test_acc"] for x in h) for h in hists]),
                            "last_step": statistics.median(h[-1]["step"] for h in hists),
                            "oracle": oracle.get(setting),
                        }
                    )
    return out


def selected_by_stop(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per setting, method and rule, the lr whose validation accuracy at the stop is best (the
    choice a user of the stop makes with a validation set; without one the lr is fixed)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (str(r["setting"]), r["method"], r["rule"])
        if key not in best or r["val_at_stop"][0] > best[key]["val_at_stop"][0]:
            best[key] = r
    return list(best.values())


def recommended_rule(rows: list[dict[str, Any]]) -> str:
    """The rule with the best mean validation accuracy at the stop over every setting and
    method at its selected lr (validation labels carry the noise: no test number takes
    part)."""
    by_rule: dict[str, list[float]] = {}
    for r in selected_by_stop(rows):
        by_rule.setdefault(r["rule"], []).append(r["val_at_stop"][0])
    return max(by_rule, key=lambda k: statistics.fmean(by_rule[k]))


# ---------------------------------------------------------------------- speed
def speed_rows(cfg: StudyConfig, records: dict[str, dict]) -> list[dict[str, Any]]:
    """Every method and lr on clean labels: median steps to each test target (a seed that
    never reaches it counts as never), and the run's final test accuracy."""
    study = STUDIES[cfg.study]
    task = study.task_model.model_validate(cfg.task)
    out = []
    for setting in study.settings(task):
        if not is_clean(setting):
            continue
        for m in cfg.methods:
            if not cfg.runs_in(m.name, setting):
                continue
            mh = method_hash(m)
            for i, point in enumerate(m.grid()):
                hists = [
                    records[Job(setting, m.name, i, s, mh).key]["history"]
                    for s in cfg.seeds_for(m.name)
                ]
                row = {"method": m.name, "lr": point["lr"], "setting": setting}
                for a in task.test_targets:
                    steps = [
                        next((x["step"] for x in h if x["test_acc"] >= a), math.inf) for h in hists
                    ]
                    row[f"steps_to_{a:g}"] = statistics.median(steps)
                row["final_test"] = mean_sd([h[-1]["test_acc"] for h in hists])
                out.append(row)
    return out


def memorised_by_point(
    cfg: StudyConfig, records: dict[str, dict], setting: Any, h: int
) -> dict[tuple[str, float], float]:
    """Mean memorised share at horizon ``h`` of every grid point in ``setting``."""
    out = {}
    for m in cfg.methods:
        if not cfg.runs_in(m.name, setting):
            continue
        mh = method_hash(m)
        for i, point in enumerate(m.grid()):
            hists = [
                records[Job(setting, m.name, i, s, mh).key]["history"]
                for s in cfg.seeds_for(m.name)
            ]
            if all(_reaches(x, h) for x in hists):
                vals = [_cut(x, h)[-1]["memorised"] for x in hists]
                out[(m.name, point["lr"])] = statistics.fmean(vals)
    return out


# ---------------------------------------------------------------------- report
def _cell(row: Row, key: str, fmt: str) -> str:
    mean, sd = row.stat(key)
    return "n/a" if math.isnan(mean) else f"{fmt.format(mean)} ± {fmt.format(sd)}"


def _horizon_table(cfg: StudyConfig, per_h: dict[int, list[Row]]) -> str:
    horizons = sorted(per_h)
    names = []
    for h in horizons:
        for r in per_h[h]:
            if r.method not in names:
                names.append(r.method)
    head = "| method | " + " | ".join(f"{h} steps: test acc / memorised (lr)" for h in horizons)
    lines = [head + " |", "|---|" + "---|" * len(horizons)]
    for name in names:
        cells = []
        for h in horizons:
            row = next((r for r in per_h[h] if r.method == name), None)
            if row is None:
                cells.append("-")
                continue
            n = len(row.summaries)
            seeds = f", {n} seed{'s' * (n > 1)}" if n < len(cfg.seeds) else ""
            cells.append(
                f"{_cell(row, 'final_test_acc', '{:.3f}')} / "
                f"{_cell(row, 'final_memorised', '{:.1%}')} ({row.point['lr']:g}{seeds})"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _monitor_table(rows: list[dict[str, Any]], rule: str) -> str:
    lines = [
        "| label noise | method | lr | stop step (median) | fired | test acc at stop | "
        "memorised at stop | run's best test acc | oracle AdamW best test acc | at stop - oracle |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["rule"] != rule:
            continue
        o = r["oracle"]
        diff = "n/a" if o is None else f"{r['test_at_stop'][0] - o:+.3f}"
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['lr']:g} | {r['stop_step']:.0f} | "
            f"{r['fired']} | {r['test_at_stop'][0]:.3f} ± {r['test_at_stop'][1]:.3f} | "
            f"{r['memorised_at_stop'][0]:.1%} | {r['best_test'][0]:.3f} | "
            + ("n/a" if o is None else f"{o:.3f}")
            + f" | {diff} |"
        )
    return "\n".join(lines)


def _rule_table(rows: list[dict[str, Any]]) -> str:
    by_rule: dict[str, list[dict]] = {}
    for r in selected_by_stop(rows):
        by_rule.setdefault(r["rule"], []).append(r)
    lines = [
        "| rule | mean val acc at stop (selects) | mean test acc at stop | "
        "mean (test at stop - oracle) | mean (test at stop - run's best) | runs stopped |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, rs in by_rule.items():
        val = statistics.fmean(r["val_at_stop"][0] for r in rs)
        test = statistics.fmean(r["test_at_stop"][0] for r in rs)
        gaps = [r["test_at_stop"][0] - r["oracle"] for r in rs if r["oracle"] is not None]
        gap = f"{statistics.fmean(gaps):+.4f}" if gaps else "n/a"
        own = statistics.fmean(r["test_at_stop"][0] - r["best_test"][0] for r in rs)
        fired = sum(r["fired"] for r in rs)
        lines.append(f"| {name} | {val:.4f} | {test:.4f} | {gap} | {own:+.4f} | {fired} |")
    return "\n".join(lines)


def _speed_table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    head = "| method | lr | " + " | ".join(f"steps to {a:g} (median)" for a in targets)
    lines = [head + " | final test acc |", "|---|---:|" + "---:|" * (len(targets) + 1)]
    for r in rows:
        steps = " | ".join(
            "never" if math.isinf(r[f"steps_to_{a:g}"]) else f"{r[f'steps_to_{a:g}']:.0f}"
            for a in targets
        )
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {steps} | {r['final_test'][0]:.3f} ± "
            f"{r['final_test'][1]:.3f} |"
        )
    return "\n".join(lines)


def write(
    cfg: StudyConfig, records: dict[str, dict], out_dir: Path, command: str, total_wall: float
) -> str:
    study = STUDIES[cfg.study]
    task = study.task_model.model_validate(cfg.task)
    per_setting = horizon_rows(cfg, records)
    mon = monitor_rows(cfg, records)
    best_rule = recommended_rule([r for r in mon if not is_clean(r["setting"])] or mon)
    speed = speed_rows(cfg, records)
    parts = [f"# {cfg.name}\n"]
    parts.append(
        "Each cell: test accuracy / share of flipped training labels memorised (mean ± sd over "
        f"seeds {cfg.seeds}), at the lr selected by validation accuracy at that length.\n"
    )
    fewer = [
        f"{m.name}: seeds {cfg.seeds_for(m.name)}"
        + (f", label noise {m.settings} only" if m.settings else "")
        for m in cfg.methods
        if cfg.seeds_for(m.name) != list(cfg.seeds) or m.settings
    ]
    if fewer:
        parts.append("Methods run on fewer seeds (their cells say so): " + "; ".join(fewer) + ".\n")
    if cfg.budget.extend_to and (cfg.budget.extend_methods or cfg.budget.extend_seeds):
        parts.append(
            f"Runs to {cfg.budget.extend_to} steps: methods "
            f"{cfg.budget.extend_methods or 'all'}, seeds {cfg.budget.extend_seeds or 'all'}; "
            "other methods' rows stop at the grid's length.\n"
        )
    for setting, per_h in per_setting.items():
        parts.append(f"## label noise: {setting}\n")
        parts.append(_horizon_table(cfg, per_h) + "\n")
    if speed:
        parts.append("## Speed on clean labels (every lr)\n")
        parts.append(_speed_table(speed, task.test_targets) + "\n")
    parts.append(f"## The validation-free stop ({best_rule}: the rule validation chose)\n")
    parts.append(
        "Each method at the lr whose validation accuracy at the stop is best, read on its "
        f"longest run; the stop rules read the monitor's ratio recorded at every evaluation "
        f"(`snr_dist.stopping.StopRule`, from step {MIN_STEP}); a run where the stop never "
        "fires is read at its end.\n"
    )
    parts.append(_monitor_table(selected_by_stop(mon), best_rule) + "\n")
    parts.append("Every rule (each method at its lr selected as above):\n\n" + _rule_table(mon))
    parts.append("")
    grids = "\n".join(
        f"- **{m.name}**: {m.type}, lr {m.lr}, weight_decay {m.weight_decay}"
        + (f", lr warm-up {m.lr_warmup} steps" if m.lr_warmup else "")
        + (f", {m.microbatches} micro-batches" if m.microbatches > 1 else "")
        + (f", snr {m.snr.model_dump()}" if m.snr else "")
        for m in cfg.methods
    )
    matched = (
        f"\n- **{GATE_MATCHED.format('X')}**: AdamW at X's selected lr times X's mean gate "
        "(the smaller-step control), for X in " + ", ".join(cfg.gate_matched)
        if cfg.gate_matched
        else ""
    )
    parts.append(
        "![horizons](horizon.png)\n\n![frontier](frontier.png)\n\n![monitor](monitor.png)\n\n"
        f"Methods:\n{grids}{matched}\n\nTask: `{json.dumps(cfg.task)}`. Budget: "
        f"{cfg.budget.steps} steps (longer runs of the selected points to "
        f"{cfg.budget.extend_to}), batch {cfg.budget.batch_size}, evaluated every "
        f"{cfg.budget.eval_every} steps (every {cfg.budget.eval_dense_every} up to "
        f"{cfg.budget.eval_dense_until}).\n\nCommand: `{command}`\n\nMachine: {machine()}; "
        f"{cfg.workers} worker process(es), one torch thread each. Total training time of all "
        f"runs: {total_wall:.0f} s.\n"
    )
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text)
    summary = {
        "config": cfg.model_dump(mode="json"),
        "horizons": {
            str(s): {
                str(h): [
                    {
                        "method": r.method,
                        "point": r.point,
                        "test_acc": r.stat("final_test_acc"),
                        "val_acc": r.stat("final_val_acc"),
                        "memorised": r.stat("final_memorised"),
                    }
                    for r in rows
                ]
                for h, rows in per_h.items()
            }
            for s, per_h in per_setting.items()
        },
        "speed": speed,
        "monitor": mon,
        "recommended_rule": best_rule,
    }
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    plot(cfg, records, per_setting, out_dir)
    return text


def plot(cfg, records, per_setting, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy = [s for s in per_setting if not is_clean(s)]
    fig, axes = plt.subplots(2, max(1, len(noisy)), figsize=(4.5 * max(1, len(noisy)), 7.6))
    axes = axes.reshape(2, -1)
    # one colour per method across the panels, one legend for the figure (the controls that
    # run in some settings only are in it too)
    every: list[str] = []
    for per_h in per_setting.values():
        for rows in per_h.values():
            every += [r.method for r in rows if r.method not in every]
    colours = {name: f"C{i % 10}" for i, name in enumerate(every)}
    for j, setting in enumerate(noisy):
        per_h = per_setting[setting]
        names = [n for n in every if any(r.method == n for rows in per_h.values() for r in rows)]
        for name in names:
            hs, acc, mem = [], [], []
            for h, rows in sorted(per_h.items()):
                row = next((r for r in rows if r.method == name), None)
                if row is not None:
                    hs.append(h)
                    acc.append(row.stat("final_test_acc")[0])
                    mem.append(row.stat("final_memorised")[0])
            style = "--" if "oracle" in name or name.startswith("AdamW at") else "-"
            kw = dict(color=colours[name], marker="o", label=name)
            axes[0, j].plot(hs, acc, style, **kw)
            axes[1, j].plot(hs, mem, style, **kw)
        axes[0, j].set_title(f"label noise {setting}")
        horizons = sorted(per_h)
        for i, label in enumerate(("test accuracy", "flipped labels memorised")):
            axes[i, j].set_xscale("log")
            axes[i, j].set_xticks(horizons, [f"{h:,}" for h in horizons], fontsize=7)
            axes[i, j].minorticks_off()
            axes[i, j].set_xlabel("training steps")
            axes[i, j].set_ylabel(label)
    handles = {}
    for ax in axes.flat:
        for line in ax.get_lines():
            handles.setdefault(line.get_label(), line)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out_dir / "horizon.png", dpi=110)
    plt.close(fig)

    speed = {(r["method"], r["lr"]): r for r in speed_rows(cfg, records)}
    task = STUDIES[cfg.study].task_model.model_validate(cfg.task)
    target = task.test_targets[0]
    setting = next((s for s in noisy if s == 0.4), noisy[0] if noisy else None)
    if speed and setting is not None:
        hs = [h for h in task.horizons if h <= cfg.budget.steps]
        fig, axes = plt.subplots(1, len(hs), figsize=(4.5 * len(hs), 4), squeeze=False)
        for ax, h in zip(axes[0], hs):
            mem = memorised_by_point(cfg, records, setting, h)
            for m in cfg.methods:
                pts = [
                    (speed[(m.name, lr)][f"steps_to_{target:g}"], mem[(m.name, lr)], lr)
                    for (name, lr) in mem
                    if name == m.name and (m.name, lr) in speed
                ]
                if not pts:
                    continue
                xs = [x if math.isfinite(x) else 5000 for x, _, _ in pts]
                ax.plot(xs, [y for _, y, _ in pts], "o-", label=m.name)
            ax.set_xscale("log")
            ax.set_xlabel(f"steps to {target:g} clean test acc (5000: never)")
            ax.set_ylabel(f"memorised at {h} steps, noise {setting}")
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out_dir / "frontier.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    chosen = select(cfg, records)
    extra = _extra_runs(cfg, records)
    for row in chosen.get(setting, []) if setting is not None else []:
        m = next((x for x in cfg.methods if x.name == row.method), None)
        if m is None:
            continue
        point = m.grid().index(row.point)
        hist = extra.get((setting, m.name), {}).get(point, {}).get(cfg.seeds[0])
        hist = hist or row.histories[0]
        xs = [x["step"] for x in hist if x.get("stop_ratio") is not None]
        ys = [x["stop_ratio"] for x in hist if x.get("stop_ratio") is not None]
        ax.plot(xs, ys, label=m.name)
    ax.axhline(1.0, color="k", ls=":", label="1: no shared signal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training steps")
    ax.set_ylabel("monitor ratio (1: only single-example signal)")
    ax.set_title(f"label noise {setting}, seed {cfg.seeds[0]}")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "monitor.png", dpi=110)
    plt.close(fig)
