"""Turn run results into ``report.md`` (a table per optimizer) and ``curves.png``."""

from __future__ import annotations

import math
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from snr_dist.experiments.config import ExperimentConfig
from snr_dist.experiments.trainer import RunResult

COLUMNS = [
    ("best_test_acc", "best test acc", "{:.3f}"),
    ("final_test_acc", "final test acc", "{:.3f}"),
    ("final_memorised", "noisy labels memorised (final)", "{:.1%}"),
    # the validation-free stop (train.stop_monitor): where it fired, and the test accuracy at
    # the first evaluation after it (runs where it never fired are left out, and counted)
    ("stop_step", "stop monitor: step", "{:.0f}"),
    ("test_acc_at_stop", "test acc at the stop", "{:.3f}"),
    ("wall_s", "train wall time (s)", "{:.1f}"),
]


def aggregate(results: list[RunResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """``{optimizer: {column: (mean, std)}}`` over seeds, in config order."""
    by_opt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_opt[r.optimizer].append(r.summary())
    out = {}
    for name, rows in by_opt.items():
        out[name] = {}
        for key, _, _ in COLUMNS:
            vals = [row[key] for row in rows if row.get(key) is not None]
            if not vals:
                out[name][key] = (math.nan, math.nan, 0, len(rows))
                continue
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            out[name][key] = (statistics.fmean(vals), sd, len(vals), len(rows))
    return out


def markdown_table(agg: dict[str, dict[str, tuple[float, float]]], n_seeds: int) -> str:
    head = "| optimizer | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for name, vals in agg.items():
        cells = []
        for key, _, fmt in COLUMNS:
            mean, sd, have, runs = vals[key]
            if not have:
                cells.append("never" if key in ("stop_step", "test_acc_at_stop") else "n/a")
                continue
            cell = fmt.format(mean)
            if n_seeds > 1:
                cell += " ± " + fmt.format(sd)
            if have < runs:
                cell += f" ({have}/{runs} runs)"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cpu() -> str:
    """The CPU model and the instruction set ATen dispatches its kernels for. Both belong in a
    result's provenance: ATen's AVX2 and AVX-512 kernels (and MKL's per-CPU paths) round in
    the last bits differently, and the runs that sit on an edge (a seed that barely reaches a
    target) land elsewhere on another CPU; on one CPU and thread count runs repeat exactly."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            model = next(names, "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return f"{model}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"


def machine() -> str:
    return (
        f"{platform.system()} {platform.machine()} ({cpu()}), {torch.get_num_threads()} torch "
        f"threads, Python {platform.python_version()}, torch {torch.__version__}"
    )


def plot_curves(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    by_opt: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        by_opt[r.optimizer].append(r)
    for name, runs in by_opt.items():
        epochs = [h["epoch"] for h in runs[0].history]
        for ax, key in zip(axes, ("test_acc", "memorised")):
            series = [[h[key] for h in r.history] for r in runs]
            mean = [statistics.fmean(v) for v in zip(*series)]
            (line,) = ax.plot(epochs, mean, label=name)
            if len(runs) > 1:
                lo = [min(v) for v in zip(*series)]
                hi = [max(v) for v in zip(*series)]
                ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2)
            for r in runs:  # the epoch at which the stop monitor fired, marked on its curve
                fired = next((h for h in r.history if h.get("stop_step") is not None), None)
                if fired is not None:
                    ax.plot(fired["epoch"], fired[key], "v", color=line.get_color(), ms=7)
    axes[0].set(title="test accuracy", xlabel="epoch", ylabel="accuracy")
    axes[1].set(title="flipped training labels memorised", xlabel="epoch", ylabel="fraction")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layer_gates(results: list[RunResult], path: Path) -> str:
    """Mean gate per layer group over training, one panel per SNR optimizer (seed mean), and
    a markdown table of the last evaluation's values; "" (and no file) without SNR runs."""
    by_opt: dict[str, list[RunResult]] = defaultdict(list)
    for r in results:
        if r.history and r.history[-1].get("layer_gate_mean"):
            by_opt[r.optimizer].append(r)
    if not by_opt:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_opt), figsize=(5.5 * len(by_opt), 4), squeeze=False)
    rows = []
    for ax, (name, runs) in zip(axes[0], by_opt.items()):
        epochs = [h["epoch"] for h in runs[0].history]
        layers = list(runs[0].history[-1]["layer_gate_mean"])
        for layer in layers:
            series = [[h["layer_gate_mean"].get(layer, math.nan) for h in r.history] for r in runs]
            ax.plot(epochs, [statistics.fmean(v) for v in zip(*series)], label=layer)
        ax.set(title=f"{name}: mean gate per layer", xlabel="epoch", ylabel="gate", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        last = [statistics.fmean(r.history[-1]["layer_gate_mean"][k] for r in runs) for k in layers]
        cells = ", ".join(f"{layer}: {v:.3f}" for layer, v in zip(layers, last))
        rows.append(f"| {name} | {cells} |")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    head = "| optimizer | mean gate per layer group at the last evaluation |\n|---|---|\n"
    return head + "\n".join(rows)


def write_report(
    cfg: ExperimentConfig, results: list[RunResult], out_dir: Path, command: str, world=None
) -> str:
    """Write report.md and curves.png; return the markdown table."""
    agg = aggregate(results)
    table = markdown_table(agg, len(cfg.train.seeds))
    plot_curves(results, out_dir / "curves.png")
    gates = plot_layer_gates(results, out_dir / "gates.png")
    if gates:
        gates = (
            "\nPer layer (a layer group is a module: `0` is the first Linear of the MLP, `2` the "
            "next, ...):\n\n" + gates + "\n\n![gates per layer](gates.png)\n"
        )
    total = sum(r.wall_s for r in results)
    seeds = ", ".join(map(str, cfg.train.seeds))
    optimizers = "\n".join(
        f"- **{o.name}**: {o.type}, lr={o.lr}, weight_decay={o.weight_decay}"
        + (f", {o.snr.model_dump()}" if o.snr else "")
        for o in cfg.optimizers
    )
    parallel = ""
    if world is not None and world.size > 1:
        parallel = f"; {world.size} processes ({world.strategy}, times are rank 0's)"
    text = f"""# {cfg.name}

{cfg.data.dataset} with {cfg.data.label_noise:.0%} symmetric label noise on the training set,
MLP {cfg.model.hidden} ({cfg.model.activation}), {cfg.train.epochs} epochs, batch
{cfg.train.batch_size} ({cfg.train.microbatches} micro-batch(es) per step), seeds [{seeds}]
(mean ± std over seeds where more than one), evaluated every {cfg.train.eval_every} epoch(s)
("best" is the best evaluation). "Memorised" is the share of flipped training examples
predicted with their flipped label. "Stop monitor" is the validation-free stop
(`snr_dist.stopping`, marked ▼ on the curves): the step it fired at and the test accuracy at
the next evaluation; it reads only training gradients.

{table}

![curves](curves.png)
{gates}
Optimizers:
{optimizers}

Command: `{command}`
Machine: {machine()}{parallel}. Total training time {total:.1f} s.
"""
    (out_dir / "report.md").write_text(text)
    return table
