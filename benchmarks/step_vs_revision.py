"""The MLP optimizer step of this tree against another git revision's, paired, and whether the
two train bit-identically.

Step-overhead trims are a few percent, below the run-to-run noise of separate benchmark runs,
and most are meant to leave every result unchanged (published studies rerun bit for bit). So
this benchmark builds SNRAdamW from both packages (`revision.package_at`), checks that both
train the 64-256-256-10 MLP of the digits studies to the same parameters (60 steps, subspace
refreshes included), then times ``optimizer.step()`` of the two interleaved (order alternating
every round) and prints the median of the per-round ratios, new / old.

A fixed input's gradient never reaches the state a real run ends in (exact zeros in Adam's
second moment where a gradient has always been zero, moments that underflow), and some costs
only show there. ``--train STEPS`` therefore trains both optimizers in lockstep on the digits
study's data instead (clean labels, batch 128, lr 3e-2, the same batches for both), compares
their parameters at the end, and times the steps of the last half.

    python benchmarks/step_vs_revision.py --rev HEAD~1 --mode subspace
    python benchmarks/step_vs_revision.py --rev b673a1b --mode diagonal --rounds 5000
    python benchmarks/step_vs_revision.py --rev HEAD~1 --mode subspace --train 1500
    python benchmarks/step_vs_revision.py --rev adfaa89 --mode diagonal --gpt 33

``--gpt STEPS`` trains a 14.7M-parameter GPT whose tensors are larger than the CPU step's
chunks instead, with torch's AdamW beside the two, and times each optimizer step inside its
training step (where the heap's state is a training run's, not a benchmark loop's).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import snr_dist

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the sibling helper
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from revision import package_at  # noqa: E402


def build(pkg, mode: str) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    kw = dict(mode="subspace", rank=32) if mode == "subspace" else {}
    return model, pkg.SNRAdamW(model.parameters(), lr=1e-3, **kw)


def trains_identically(old, new, mode: str, steps: int) -> bool:
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    finals = []
    for pkg in (old, new):
        model, opt = build(pkg, mode)
        for i in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x + 0.1 * i), y).backward()
            opt.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    return all(torch.equal(a, b) for a, b in zip(*finals))


def timed_steps(old, new, mode: str, rounds: int, warmup: int) -> dict[str, float]:
    """Median step times and the median per-round ratio new / old (no refreshes timed)."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(128, 64, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    opts = {}
    for name, pkg in (("old", old), ("new", new)):
        model, opt = build(pkg, mode)
        F.cross_entropy(model(x), y).backward()
        if mode == "subspace":
            opt.param_groups[0]["refresh_every"] = 10**9  # after step 1's: time the plain step
        for _ in range(warmup):
            opt.step()
        opts[name] = opt
    times: dict[str, list[float]] = {"old": [], "new": []}
    for r in range(rounds):
        for name in ("old", "new") if r % 2 else ("new", "old"):
            t = time.perf_counter()
            opts[name].step()
            times[name].append(time.perf_counter() - t)
    return {
        "old_us": 1e6 * statistics.median(times["old"]),
        "new_us": 1e6 * statistics.median(times["new"]),
        "new_vs_old": statistics.median(a / b for a, b in zip(times["new"], times["old"])),
    }


def lockstep_training(old, new, mode: str, steps: int) -> dict[str, Any]:
    """Both optimizers train the digits MLP on the same batches; steps of the last half timed,
    in alternating order; whether the final parameters agree bit for bit."""
    from snr_dist.experiments.tasks import DigitsTask

    task = DigitsTask(0.0, [256, 256], 0)
    kw = dict(mode="subspace", rank=32) if mode == "subspace" else {}
    runs = {}
    for name, pkg in (("old", old), ("new", new)):
        model = task.model(0)
        runs[name] = (model, pkg.SNRAdamW(model.parameters(), lr=3e-2, **kw))
    order = torch.Generator().manual_seed(10_000)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(steps):
        idx = torch.randint(0, task.n_train, (128,), generator=order)
        for name in ("old", "new") if i % 2 else ("new", "old"):
            model, opt = runs[name]
            opt.zero_grad(set_to_none=True)
            task.loss(model, idx).backward()
            t = time.perf_counter()
            opt.step()
            if i >= steps // 2:
                times[name].append(time.perf_counter() - t)
    pairs = zip(runs["old"][0].parameters(), runs["new"][0].parameters())
    return {
        "bit_identical": all(torch.equal(a, b) for a, b in pairs),
        "old_us": 1e6 * statistics.median(times["old"]),
        "new_us": 1e6 * statistics.median(times["new"]),
        "new_vs_old": statistics.median(a / b for a, b in zip(times["new"], times["old"])),
    }


def lockstep_gpt(old, new, mode: str, steps: int) -> dict[str, Any]:
    """Both optimizers and torch's AdamW (``foreach=True``) train the 14.7M-parameter GPT of
    ``benchmarks/step_floor.py`` (vocab 8192, d=512, 2 layers: tensors larger than the CPU
    step's chunks) on the same batches, in rotating order; after the first 3 steps each
    optimizer step is timed apart inside its training step, and the training step whole."""
    from snr_dist.experiments.models import GPT

    torch.manual_seed(0)
    base = GPT(8192, 64, 512, 2, 8)
    # the uncompiled step (kernels="auto" compiles a diagonal group of 8.4M+ elements)
    kw = dict(mode="subspace", rank=32) if mode == "subspace" else dict(kernels="torch")
    makers = {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        "old": lambda ps: old.SNRAdamW(ps, lr=1e-4, **kw),
        "new": lambda ps: new.SNRAdamW(ps, lr=1e-4, **kw),
    }
    runs = {}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        runs[name] = (model, make(list(model.parameters())))
    gen = torch.Generator().manual_seed(0)
    names = list(runs)
    step_t: dict[str, list[float]] = {n: [] for n in names}
    full_t: dict[str, list[float]] = {n: [] for n in names}
    for i in range(steps):
        idx = torch.randint(0, 8192, (4, 65), generator=gen)
        for name in names[i % 3 :] + names[: i % 3]:
            model, opt = runs[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(idx[:, :-1]).reshape(-1, 8192), idx[:, 1:].reshape(-1)).backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i >= 3:
                step_t[name].append(t2 - t1)
                full_t[name].append(t2 - t0)

    def ratio(times, a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    pairs = zip(runs["old"][0].parameters(), runs["new"][0].parameters())
    return {
        "bit_identical": all(torch.equal(a, b) for a, b in pairs),
        "old_us": 1e6 * statistics.median(step_t["old"]),
        "new_us": 1e6 * statistics.median(step_t["new"]),
        "adamw_us": 1e6 * statistics.median(step_t["AdamW"]),
        "new_vs_old": ratio(step_t, "new", "old"),
        "old_vs_adamw": ratio(step_t, "old", "AdamW"),
        "new_vs_adamw": ratio(step_t, "new", "AdamW"),
        "old_full_vs_adamw": ratio(full_t, "old", "AdamW"),
        "new_full_vs_adamw": ratio(full_t, "new", "AdamW"),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the git revision to compare against")
    ap.add_argument("--mode", choices=["diagonal", "subspace"], default="subspace")
    ap.add_argument("--rounds", type=int, default=3000, help="interleaved step pairs timed")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--check-steps", type=int, default=60, help="training steps compared")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument(
        "--train",
        type=int,
        default=0,
        metavar="STEPS",
        help="train both on digits for STEPS steps and time the last half (default: off)",
    )
    ap.add_argument(
        "--gpt",
        type=int,
        default=0,
        metavar="STEPS",
        help="train both, and torch's AdamW, on the 14.7M GPT for STEPS steps, each step "
        "timed inside its training step (default: off)",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        old = package_at(args.rev)
        res: dict[str, Any] = {"rev": args.rev, "mode": args.mode}
        if args.gpt:
            res.update(lockstep_gpt(old, snr_dist, args.mode, args.gpt))
            print(
                f"SNRAdamW {args.mode}, GPT 14.7M (vocab 8192, d=512, 2 layers), "
                f"{args.threads} thread(s), {args.gpt} training steps: this tree vs {args.rev}: "
                f"trains bit-identically: {res['bit_identical']}; optimizer step inside the "
                f"training step {res['new_us'] / 1e3:.1f} ms vs {res['old_us'] / 1e3:.1f} ms "
                f"(AdamW {res['adamw_us'] / 1e3:.1f} ms): {res['new_vs_adamw']:.2f}x vs "
                f"{res['old_vs_adamw']:.2f}x AdamW's; training step "
                f"{res['new_full_vs_adamw']:.3f}x vs {res['old_full_vs_adamw']:.3f}x AdamW's; "
                "new / old step "
                f"{res['new_vs_old']:.3f}"
            )
            return res
        if args.train:
            res.update(lockstep_training(old, snr_dist, args.mode, args.train))
            same, how = res["bit_identical"], f"{args.train} digits steps, last half timed"
        else:
            same = trains_identically(old, snr_dist, args.mode, args.check_steps)
            res["bit_identical"] = same
            res.update(timed_steps(old, snr_dist, args.mode, args.rounds, args.warmup))
            how = f"{args.check_steps} steps; {args.rounds} rounds of a fixed gradient timed"
    finally:
        torch.set_num_threads(threads)
    print(
        f"SNRAdamW {args.mode}, MLP 64-256-256-10, {args.threads} thread(s): this tree vs "
        f"{args.rev}: trains bit-identically: {same}; step {res['new_us']:.0f} us vs "
        f"{res['old_us']:.0f} us, median per-round ratio {res['new_vs_old']:.3f} ({how})"
    )
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
