"""Training-step overhead of the SNR optimizers versus ``torch.optim.AdamW`` on small models.

What is timed is the *whole* training step a user pays for (``zero_grad``, forward,
cross-entropy, backward, ``optimizer.step()``) of a GPT-style decoder-only transformer on the
CPU, because an optimizer's cost only matters relative to the forward and backward passes it
rides on. ``optimizer.step()`` alone is timed as well, since that is where the overhead lives.

How, and why:

* Every optimizer trains its own copy of the same model (identical initial weights) on the same
  random token batches (a fixed ``torch.Generator``; nothing is downloaded).
* All models and optimizers are built up front and each gets a few warm-up steps (allocator,
  lazily created optimizer state, one-off dispatch costs).
* Shared machines are noisy: another process can slow a stretch of the run by 20% or more.
  Absolute timings from different runs are therefore not comparable, and even within a run
  timing one optimizer after another would fold drift into the comparison. So the measurement
  is *interleaved*: in each round every optimizer runs one step, in an order rotated from round
  to round, and each step is timed with ``time.perf_counter()``.
* Reported per optimizer: the median step time, the ratio of medians versus AdamW, and a
  robust ratio, the median over rounds of ``step / adamw_step`` in the same round (a paired
  comparison that cancels slow drift). The targets are judged on the robust ratio; both are
  printed. The bytes held in optimizer state are reported too.
* The 1-minute load average before and after the run is printed: well above the thread count
  means another process competed for the CPUs. With as many OpenMP threads as cores, such
  contention slows the many small kernels of an optimizer step far more than the large matmuls
  of forward and backward, inflating the ratios; rerun, or compare with ``--threads 1``.

The subspace tracker refreshes its basis at steps 1, 2, 4, 8, ... and then every
``refresh_every`` (50) steps; the median ignores those occasional slow steps, the mean (in the
JSON output) does not.

Models (``--model``): ``gpt``, the GPT-style decoder of ``snr_dist.experiments.models`` (the
default); ``stock``, a causal LM of stock ``nn.TransformerEncoderLayer`` blocks (pre-norm,
LayerNorms and biases included: 54 tensors, many of them small, where an optimizer's per-tensor
costs show; d=256, 4 layers, T=128, batch 8 by default); ``mlp``, the digits studies'
64-256-256-10 MLP (batch 128, random inputs); ``all``, the three in turn, each in its own
interleaved rounds. Issue 35's yardstick for the per-tensor costs:

    python benchmarks/step_overhead.py --model stock --threads 2
    python benchmarks/step_overhead.py --model mlp --threads 2

Run ``python benchmarks/step_overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import snr_dist
from snr_dist.experiments.models import GPT

#: Issue targets: robust step-time ratio versus AdamW.
TARGETS = {"SNRAdamW diagonal": 1.05, "SNRAdamW subspace r=32": 1.10}
BASELINE = "AdamW (foreach)"
#: Extra rows: reported when the optimizer can be built, otherwise listed under "skipped".
OPTIONAL = ("SNRPreconditioner(AdamW)",)
#: The diagonal rule with its first moment and statistics in bfloat16: AdamW's state bytes.
BF16_STATE = "SNRAdamW diagonal, state_dtype=bfloat16"


# ---------------------------------------------------------------------------------- models
class StockLM(nn.Module):
    """A causal LM of stock ``nn.TransformerEncoderLayer`` blocks (pre-norm, GELU, no dropout):
    token and position embeddings, ``layers`` blocks, a final LayerNorm and a linear head."""

    def __init__(self, vocab: int, seq: int, d_model: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq))

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.embed(idx) + self.pos.weight[:t]
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


MODELS = ("gpt", "stock", "mlp")
DEFAULT_BATCH = {"gpt": 16, "stock": 8, "mlp": 128}


def build_model(args: argparse.Namespace, kind: str) -> tuple[nn.Module, str, Callable]:
    """``(model, description, batches)``; ``batches(n)`` returns ``n`` ``(inputs, targets)``
    pairs (fixed generator: every optimizer trains on the same ones)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = args.batch or DEFAULT_BATCH[kind]
    if kind == "mlp":
        model = nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )

        def batches(n: int) -> list[tuple[Tensor, Tensor]]:
            x = torch.randn(n, batch, 64, generator=gen)
            return list(zip(x, torch.randint(0, 10, (n, batch), generator=gen)))

        return model, f"MLP 64-256-256-10 batch={batch}", batches
    make = GPT if kind == "gpt" else StockLM
    model = make(args.vocab, args.seq, args.d_model, args.layers, args.heads)
    name = "GPT" if kind == "gpt" else "stock TransformerEncoderLayer LM"

    def lm_batches(n: int) -> list[tuple[Tensor, Tensor]]:
        data = torch.randint(0, args.vocab, (n, batch, args.seq + 1), generator=gen)
        return [(d[:, :-1], d[:, 1:]) for d in data]

    desc = (
        f"{name} {args.layers}L d={args.d_model} h={args.heads} vocab={args.vocab} "
        f"seq={args.seq} batch={batch}"
    )
    return model, desc, lm_batches


# ---------------------------------------------------------------------------------- helpers
def optimizer_factories() -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    """The optimizers compared, baseline first."""
    return {
        BASELINE: lambda ps: torch.optim.AdamW(ps, lr=3e-4, foreach=True),
        "SNRAdamW diagonal": lambda ps: snr_dist.SNRAdamW(ps, lr=3e-4),
        "SNRAdamW subspace r=32": lambda ps: snr_dist.SNRAdamW(
            ps, lr=3e-4, mode="subspace", rank=32
        ),
        "SNRPreconditioner(AdamW)": lambda ps: snr_dist.SNRPreconditioner(
            torch.optim.AdamW(ps, lr=3e-4, foreach=True)
        ),
        BF16_STATE: lambda ps: snr_dist.SNRAdamW(ps, lr=3e-4, state_dtype="bfloat16"),
    }


def revision_factories(rev: str) -> dict[str, Callable[[list[Tensor]], torch.optim.Optimizer]]:
    """The SNRAdamW rows again, built by the ``snr_dist`` of git revision ``rev``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from revision import package_at

    old = package_at(rev)
    return {
        f"SNRAdamW diagonal @{rev}": lambda ps: old.SNRAdamW(ps, lr=3e-4),
        f"SNRAdamW subspace r=32 @{rev}": lambda ps: old.SNRAdamW(
            ps, lr=3e-4, mode="subspace", rank=32
        ),
    }


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if torch.is_tensor(obj):
        key = obj.untyped_storage().data_ptr() if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all tensors in the optimizer state, including a wrapped base optimizer's."""
    seen: set[int] = set()
    total = 0
    stack = [opt]
    while stack:
        o = stack.pop()
        total += _tensor_bytes(dict(o.state), seen)
        base = getattr(o, "base", None)
        if isinstance(base, torch.optim.Optimizer):
            stack.append(base)
    return total


def cpu_name() -> str:
    name = platform.processor()
    if name and name not in ("x86_64", "aarch64", "arm", "i386"):
        return name
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine() or "unknown CPU"


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        choices=[*MODELS, "all"],
        default="gpt",
        help="gpt (default), stock (nn.TransformerEncoderLayer blocks), mlp (digits), all",
    )
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--batch", type=int, default=None, help="default: 16 (gpt), 8 (stock), 128 (mlp)"
    )
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="measured interleaved rounds")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-preconditioner", action="store_true", help="skip that extra row")
    ap.add_argument(
        "--compare-rev",
        metavar="REV",
        default=None,
        help="also time the SNRAdamW rows of this git revision's snr_dist, in the same rounds",
    )
    ap.add_argument("--json", metavar="PATH", default=None, help="also write results as JSON")
    args = ap.parse_args(argv)
    for name in ("layers", "d_model", "heads", "seq", "batch", "vocab", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


# ---------------------------------------------------------------------------------- benchmark
def run_benchmark(args: argparse.Namespace, kind: str = "gpt") -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = _loadavg()
    proto, description, make_batches = build_model(args, kind)
    n_params = sum(p.numel() for p in proto.parameters())

    factories = optimizer_factories()
    if args.no_preconditioner:
        factories.pop("SNRPreconditioner(AdamW)")
    if args.compare_rev:
        factories.update(revision_factories(args.compare_rev))
    models: dict[str, nn.Module] = {}
    opts: dict[str, torch.optim.Optimizer] = {}
    skipped: dict[str, str] = {}
    for name, make in factories.items():
        model = copy.deepcopy(proto)
        try:
            opts[name] = make(list(model.parameters()))
        except Exception as exc:
            if name not in OPTIONAL:
                raise
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        models[name] = model
    names = list(opts)

    data = make_batches(args.warmup + args.steps)

    def train_step(name: str, i: int) -> tuple[float, float]:
        model, opt = models[name], opts[name]
        x, y = data[i]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    for i in range(args.warmup):
        for name in names:
            train_step(name, i)

    step_s: dict[str, list[float]] = {n: [] for n in names}
    opt_s: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(args.steps):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                total, only_opt = train_step(name, args.warmup + r)
                step_s[name].append(total)
                opt_s[name].append(only_opt)
    finally:
        if gc_was_enabled:
            gc.enable()

    base_step = step_s[BASELINE]
    base_med = statistics.median(base_step)
    base_bytes = state_bytes(opts[BASELINE])
    rows = []
    for name in names:
        med = statistics.median(step_s[name])
        nbytes = state_bytes(opts[name])
        rows.append(
            {
                "name": name,
                "median_step_ms": 1e3 * med,
                "mean_step_ms": 1e3 * statistics.fmean(step_s[name]),
                "ratio_vs_adamw": med / base_med,
                "robust_ratio": statistics.median(a / b for a, b in zip(step_s[name], base_step)),
                "median_opt_step_ms": 1e3 * statistics.median(opt_s[name]),
                "state_bytes": nbytes,
                "state_ratio": nbytes / base_bytes if base_bytes else math.nan,
                "step_ms": [1e3 * s for s in step_s[name]],
                "opt_step_ms": [1e3 * s for s in opt_s[name]],
            }
        )
    by_name = {row["name"]: row for row in rows}
    targets = {
        name: {
            "target": limit,
            "robust_ratio": by_name[name]["robust_ratio"],
            "ratio_of_medians": by_name[name]["ratio_vs_adamw"],
            "met": by_name[name]["robust_ratio"] <= limit,
        }
        for name, limit in TARGETS.items()
        if name in by_name
    }
    config = {
        "model": kind,
        "description": description,
        **{
            k: getattr(args, k)
            for k in (
                "layers",
                "d_model",
                "heads",
                "seq",
                "batch",
                "vocab",
                "steps",
                "warmup",
                "seed",
                "compare_rev",
            )
        },
    }
    config["batch"] = args.batch or DEFAULT_BATCH[kind]
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "params": n_params,
        # 1-minute load average before and after (this process included): a value well above
        # the thread count means another process competed for the CPUs during the run.
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }
    pairs = {}
    if args.compare_rev:  # each row of this checkout against the same row of the revision
        for name in names:
            old = f"{name} @{args.compare_rev}"
            if old in step_s:
                pairs[name] = {
                    "step": statistics.median(a / b for a, b in zip(step_s[name], step_s[old])),
                    "optimizer_step": statistics.median(
                        a / b for a, b in zip(opt_s[name], opt_s[old])
                    ),
                }
    return {
        "config": config,
        "env": env,
        "rows": rows,
        "targets": targets,
        "skipped": skipped,
        "versus_revision": pairs,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_report(res: dict[str, Any]) -> str:
    env, cfg = res["env"], res["config"]
    lines = [
        f"{cfg['description']}: {env['params'] / 1e6:.2f}M params | "
        f"torch {env['torch']} | {env['threads']} threads | {env['cpu']} "
        f"({env['cpu_count']} CPUs) | {cfg['steps']} interleaved rounds, "
        f"{cfg['warmup']} warm-up steps | load avg before/after {_fmt(env['loadavg_before'])}"
        f"/{_fmt(env['loadavg_after'])}",
        "",
        "| optimizer | median step ms | ratio vs AdamW | robust ratio | optimizer.step ms "
        "| state MB | state ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['name']} | {r['median_step_ms']:.2f} | {r['ratio_vs_adamw']:.3f}x "
            f"| {r['robust_ratio']:.3f}x | {r['median_opt_step_ms']:.2f} "
            f"| {r['state_bytes'] / 2**20:.2f} | {r['state_ratio']:.2f}x |"
        )
    for name, why in res["skipped"].items():
        lines.append(f"\nSkipped {name}: it could not be constructed ({why})")
    lines.append("")
    verdicts = []
    for name, t in res["targets"].items():
        verdict = "MET" if t["met"] else "MISSED"
        verdicts.append(
            f"{name} <= {t['target']:.2f}x: {verdict} (robust {t['robust_ratio']:.3f}x, "
            f"ratio of medians {t['ratio_of_medians']:.3f}x)"
        )
    lines.append("Targets (robust ratio, this run): " + "; ".join(verdicts))
    for name, r in res.get("versus_revision", {}).items():
        lines.append(
            f"{name}: this checkout / {res['config']['compare_rev']} (paired medians): training "
            f"step {r['step']:.3f}x, optimizer.step {r['optimizer_step']:.3f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """One model's results (``--model all``: ``{"models": {kind: results}}``)."""
    args = parse_args(argv)
    kinds = MODELS if args.model == "all" else (args.model,)
    results = {}
    for kind in kinds:
        results[kind] = run_benchmark(args, kind)
        print(format_report(results[kind]) + "\n")
    res = results[kinds[0]] if len(kinds) == 1 else {"models": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
