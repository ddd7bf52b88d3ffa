"""A study's ``report.md``, ``summary.json`` and ``curves.png`` from its selected rows."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from snr_dist.experiments.json_safe import json_safe
from snr_dist.experiments.studies import STUDIES, conv_test_keys
from snr_dist.experiments.study import Row, StudyConfig, machine, markdown_table, mean_sd


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)


def _median_steps(row: Row, key: str) -> float:
    """The median seed's steps to a target, a seed that never reached it counting as
    infinitely slow: unlike the mean over the seeds that arrived, it neither drops the slowest
    seeds nor lets one of them set the number."""
    return statistics.median(
        math.inf if s.get(key) is None else float(s[key]) for s in row.summaries
    )


def _median_ratio(row: Row, base: Row, key: str) -> float | None:
    """``row``'s median steps over ``base``'s; None when either median seed never arrived."""
    a, b = _median_steps(row, key), _median_steps(base, key)
    return None if math.isinf(a) or math.isinf(b) else _ratio(a, b)


def headline(cfg: StudyConfig, selected: dict[Any, list[Row]]) -> dict[str, Any]:
    """Study-specific derived numbers (speed-ups vs AdamW, double-descent peaks)."""
    out: dict[str, Any] = {}
    if cfg.study == "convergence":  # each method's steps as a multiple of AdamW's (the first)
        for setting, rows in selected.items():
            base = next((r for r in rows if r.method == cfg.methods[0].name), None)
            if base is None:
                continue
            task = STUDIES["convergence"].task_model.model_validate(cfg.task)
            keys = (*conv_test_keys(task), "steps_to_target", "steps_to_val")
            out[str(setting)] = {
                r.method: {
                    **{
                        f"{k}_x_{base.method}": _ratio(r.stat(k)[0], base.stat(k)[0])
                        for k in keys
                        if any(s.get(k) is not None for s in r.summaries)
                    },
                    **{f"median_{k}_x_{base.method}": _median_ratio(r, base, k) for k in keys},
                }
                for r in rows
            }
        return out
    if cfg.study == "grokking":
        for setting, rows in selected.items():
            base = next((r for r in rows if r.method == cfg.methods[0].name), None)
            if base is None:
                continue
            b_steps, _ = base.stat("steps_to_target")
            b_reached = sum(s["reached"] for s in base.summaries)
            out[str(setting)] = {
                r.method: {
                    "reached": f"{int(sum(s['reached'] for s in r.summaries))}/{len(r.summaries)}",
                    "speedup_steps_vs_" + base.method: _ratio(b_steps, r.stat("steps_to_target")[0])
                    if b_reached
                    else None,
                    "speedup_wall_vs_" + base.method: _ratio(
                        base.stat("wall_to_target")[0], r.stat("wall_to_target")[0]
                    )
                    if b_reached
                    else None,
                }
                for r in rows
            }
    if cfg.study == "double_descent":
        widths = list(selected)
        methods = [r.method for r in selected[widths[0]]]
        for m in methods:
            errs = [
                next(r for r in selected[w] if r.method == m).stat("final_test_err")[0]
                for w in widths
            ]
            # A double-descent bump: how far a width's error rises above the best error on
            # *both* sides of it (0 for a curve that only falls, or only rises).
            bumps = [
                min(errs[j] - min(errs[: j + 1]), errs[j] - min(errs[j:]))
                for j in range(len(widths))
            ]
            peak = max(range(len(widths)), key=lambda j: bumps[j])
            out[m] = {
                "test_error_by_width": {str(w): round(e, 4) for w, e in zip(widths, errs)},
                "bump_width": widths[peak],
                "bump_height": round(bumps[peak], 4),
                "worst_width": widths[max(range(len(widths)), key=lambda j: errs[j])],
                "error_at_widest": round(errs[-1], 4),
                "best_width": widths[min(range(len(widths)), key=lambda j: errs[j])],
                "rise_best_to_widest": round(errs[-1] - min(errs), 4),
            }
    return out


def plot(cfg: StudyConfig, selected: dict[Any, list[Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(selected)
    if cfg.study == "double_descent":
        fig, ax = plt.subplots(figsize=(6, 4))
        for row in selected[settings[0]]:
            ys = [next(r for r in selected[w] if r.method == row.method) for w in settings]
            means = [r.stat("final_test_err")[0] for r in ys]
            sds = [r.stat("final_test_err")[1] for r in ys]
            ax.errorbar(settings, means, yerr=sds, marker="o", capsize=3, label=row.method)
        ax.set(
            xscale="log",
            xlabel="hidden width",
            ylabel="final test error",
            title=f"double descent, {cfg.task.get('label_noise', 0.2):.0%} label noise",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    keys = {
        "label_noise": [("test_acc", "test accuracy"), ("memorised", "noisy labels memorised")],
        "grokking": [("val_acc", "held-out accuracy"), ("train_acc", "train accuracy")],
        "convergence": [("train_loss", "train loss"), ("test_acc", "test accuracy")],
        "entk_partition": [
            ("reservoir_share", "noise outside top-k90"),
            ("random_share", "random direction outside"),
            ("k90", "k90"),
            ("test_acc", "test accuracy"),
        ],
    }.get(cfg.study, [("train_loss", "train loss")])
    fig, axes = plt.subplots(
        len(keys), len(settings), figsize=(4.5 * len(settings), 3.3 * len(keys)), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    label = STUDIES[cfg.study].setting_label
    for j, setting in enumerate(settings):
        for k, (key, title) in enumerate(keys):
            ax = axes[k][j]
            for i, row in enumerate(selected[setting]):
                for n, hist in enumerate(row.histories):
                    hist = [h for h in hist if h.get(key) is not None]
                    ax.plot(
                        [h["step"] for h in hist],
                        [h[key] for h in hist],
                        color=colors[i % len(colors)],
                        alpha=0.7,
                        lw=1,
                        label=row.method if n == 0 else None,
                    )
            ax.set_title(f"{title} ({label} {setting})", fontsize=9)
            ax.set_xlabel("step")
            if key == "train_loss":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gates(cfg: StudyConfig, selected: dict[Any, list[Row]], path: Path) -> bool:
    """Per-parameter gate mean against step, for each SNR method's first seed (runs recorded
    with ``budget.trace_gates``); False when nothing was traced."""
    traced = [
        (setting, row)
        for setting, rows in selected.items()
        for row in rows
        if row.histories and any("gates" in h for h in row.histories[0])
    ]
    if not traced:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(traced), figsize=(4.5 * len(traced), 6.4), squeeze=False, sharex="col"
    )
    for j, (setting, row) in enumerate(traced):
        hist = [h for h in row.histories[0] if "gates" in h]
        names = [n for n in hist[-1]["gates"] if not n.endswith("bias") and ".ln" not in n]
        for name in names:
            steps = [h["step"] for h in hist if name in h["gates"]]
            for k, key in enumerate(("gate_mean", "snr_q50")):
                ys = [h["gates"][name].get(key) for h in hist if name in h["gates"]]
                axes[k][j].plot(steps, ys, lw=1, label=name)
        axes[0][j].set_title(f"{row.method} ({setting}), gate mean", fontsize=9)
        axes[1][j].set_title("median SNR", fontsize=9)
        axes[1][j].set_yscale("symlog", linthresh=1e-3)
        axes[1][j].set_xlabel("step")
        for k in (0, 1):
            axes[k][j].grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: From this many seeds on, a report also lists every seed's value: a mean and a standard
#: deviation hide a heavy tail (a few seeds that take 10x longer, or never arrive).
PER_SEED_FROM = 5


def per_seed(rows: list[Row], columns: list[tuple[str, str, str]], seeds: list[int]) -> str:
    """A table of each row's value per seed ("-" where a run never got there)."""
    lines = [
        "| method | per seed | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---:|" * len(seeds),
    ]
    for row in rows:
        for key, label, fmt in columns:
            vals = [s.get(key) for s in row.summaries]
            shown = " | ".join("-" if v is None else fmt.format(v) for v in vals)
            lines.append(f"| {row.method} | {label} | {shown} |")
    return "\n".join(lines)


def write(
    cfg: StudyConfig, selected: dict[Any, list[Row]], out_dir: Path, command: str, total_wall: float
) -> str:
    study = STUDIES[cfg.study]
    columns = study.columns_for(cfg.task)
    n = len(cfg.seeds)
    parts = [f"# {cfg.name}\n"]
    for setting, rows in selected.items():
        parts.append(f"## {study.setting_label}: {setting}\n")
        parts.append(markdown_table(rows, columns, n) + "\n")
        if n >= PER_SEED_FROM:
            parts.append(per_seed(rows, columns, cfg.seeds) + "\n")
        if cfg.report_grid:
            every = [point for row in rows for point in row.grid]
            parts.append(
                "Every grid point (the rows above are the ones selected):\n\n"
                + markdown_table(every, columns, n)
                + "\n"
            )
    head = headline(cfg, selected)
    if head:
        parts.append("## Derived\n\n```json\n" + json.dumps(head, indent=2) + "\n```\n")
    grids = "\n".join(
        f"- **{m.name}**: {m.type}, lr {m.lr}, weight_decay {m.weight_decay}, betas "
        f"{list(m.betas)}"
        + (f", lr warm-up {m.lr_warmup} steps" if m.lr_warmup else "")
        + (f", snr {m.snr.model_dump()}" if m.snr else "")
        for m in cfg.methods
    )
    parts.append(
        f"![curves](curves.png)\n\nMethods (each row above is the grid point with the best "
        f"validation score, mean over seeds {cfg.seeds}; table cells are mean ± std over "
        f"seeds):\n{grids}\n\nTask: `{json.dumps(cfg.task)}`. Budget: {cfg.budget.steps} steps, "
        f"batch {cfg.budget.batch_size}, evaluated every {cfg.budget.eval_every} steps.\n\n"
        f"Command: `{command}`\n\nMachine: {machine()}; {cfg.workers} worker process(es), one "
        f"torch thread each. Total training time of all runs: {total_wall:.0f} s.\n"
    )
    text = "\n".join(parts)
    (out_dir / "report.md").write_text(text)
    summary = {
        "config": cfg.model_dump(mode="json"),
        "settings": {
            str(s): [
                {
                    "method": r.method,
                    "point": r.point,
                    **{
                        k: mean_sd([x[k] for x in r.summaries if x.get(k) is not None])
                        for k, _, _ in columns
                    },
                }
                for r in rows
            ]
            for s, rows in selected.items()
        },
        "derived": head,
    }
    # strict JSON: a column with no values (mean_sd of nothing) is null, not NaN
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1))
    plot(cfg, selected, out_dir / "curves.png")  # the tables are on disk if plotting fails
    if plot_gates(cfg, selected, out_dir / "gates.png"):
        text += "\n![gate traces](gates.png)\n"
        (out_dir / "report.md").write_text(text)
    else:  # a previous run's traces do not belong to this report
        (out_dir / "gates.png").unlink(missing_ok=True)
    return text
