"""The MLP optimizer step of this tree against another git revision's, paired, and whether the
two train bit-identically.

Step-overhead trims are a few percent, below the run-to-run noise of separate benchmark runs,
and most are meant to leave every result unchanged (published studies rerun bit for bit). So
this benchmark builds SNRAdamW from both packages (`revision.package_at`), checks that both
train the 64-256-256-10 MLP of the digits studies to the same parameters (60 steps, subspace
refreshes included), then times ``optimizer.step()`` of the two interleaved (order alternating
every round) and prints the median of the per-round ratios, new / old.

    python benchmarks/step_vs_revision.py --rev HEAD~1 --mode subspace
    python benchmarks/step_vs_revision.py --rev b673a1b --mode diagonal --rounds 5000
"""

from __future__ import annotations

import argparse
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rev", default="HEAD", help="the git revision to compare against")
    ap.add_argument("--mode", choices=["diagonal", "subspace"], default="subspace")
    ap.add_argument("--rounds", type=int, default=3000, help="interleaved step pairs timed")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--check-steps", type=int, default=60, help="training steps compared")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        old = package_at(args.rev)
        same = trains_identically(old, snr_dist, args.mode, args.check_steps)
        res = {"rev": args.rev, "mode": args.mode, "bit_identical": same}
        res.update(timed_steps(old, snr_dist, args.mode, args.rounds, args.warmup))
    finally:
        torch.set_num_threads(threads)
    print(
        f"SNRAdamW {args.mode}, MLP 64-256-256-10, {args.threads} thread(s): this tree vs "
        f"{args.rev}: trains bit-identically over {args.check_steps} steps: {same}; "
        f"step {res['new_us']:.0f} us vs {res['old_us']:.0f} us, median per-round ratio "
        f"{res['new_vs_old']:.3f} ({args.rounds} rounds)"
    )
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
