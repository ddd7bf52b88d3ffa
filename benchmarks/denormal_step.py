"""A digits training run with subnormal floats in the optimizer state, flushed and not.

Late in a digits run Adam's first moment of every coordinate whose gradient has stopped (dead
ReLU units, pixels blank in every image) sits at the smallest fp32 subnormal for good, and CPU
arithmetic on subnormal operands takes a slow path. This benchmark trains the label_noise
study's 64-256-256-10 MLP (clean labels, its first seed, batch 128, one lr for all) with AdamW
(``torch.optim.AdamW(foreach=True)``), SNRAdamW diagonal and SNRAdamW subspace r=32, each
twice: with gradual underflow (IEEE, ``flush_denormals=False``; AdamW as torch runs it) and with
subnormals flushed to zero during the step (``flush_denormals=True``, the default; AdamW's step
inside `snr_dist.denormals.flush_denormals`). The six runs go in lockstep (each training step
runs all six, in rotated order), so the machine's drift hits all alike. It prints, per run: the
share of state entries that are subnormal at the end, the training time (forward, backward,
step), the median optimizer step over the last quarter of the run, whether the flushed run's
parameters equal the unflushed one's bit for bit, and the training time as a multiple of
AdamW's (as torch runs it).

    python benchmarks/denormal_step.py                  # 1,500 steps (the studies' budget)
    python benchmarks/denormal_step.py --steps 300 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from snr_dist import SNRAdamW
from snr_dist.denormals import flush_denormals
from snr_dist.experiments.tasks import DigitsTask

TINY = torch.finfo(torch.float32).tiny


def subnormal_share(opt: torch.optim.Optimizer) -> float:
    """Share of the floating-point state entries that are subnormal (nonzero, below TINY)."""
    n = total = 0
    for st in opt.state.values():
        for t in st.values():
            if torch.is_tensor(t) and t.is_floating_point() and t.numel() > 1:
                n += int(((t != 0) & (t.abs() < TINY)).sum())
                total += t.numel()
    return n / max(total, 1)


class Run:
    """One optimizer's training run, stepped from outside one step at a time."""

    def __init__(self, name: str, task: DigitsTask, lr: float, flush: bool, seed: int) -> None:
        self.name, self.task, self.flush = name, task, flush
        self.model = task.model(seed)
        params = self.model.parameters()
        if name == "AdamW":
            self.opt = torch.optim.AdamW(params, lr=lr, foreach=True)
        else:
            mode = dict(mode="subspace", rank=32) if "subspace" in name else {}
            self.opt = SNRAdamW(params, lr=lr, flush_denormals=flush, **mode)
        self.order = torch.Generator().manual_seed(10_000 + seed)
        self.perm, self.cursor = torch.randperm(task.n_train, generator=self.order), 0
        self.train_s, self.step_s = 0.0, []

    def train_step(self, batch: int) -> None:
        t0 = time.perf_counter()
        if self.cursor + batch > self.task.n_train:
            self.perm, self.cursor = torch.randperm(self.task.n_train, generator=self.order), 0
        idx = self.perm[self.cursor : self.cursor + batch]
        self.cursor += batch
        loss = self.task.loss(self.model, idx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        if self.name == "AdamW":
            with flush_denormals(self.flush):
                self.opt.step()
        else:
            self.opt.step()
        t2 = time.perf_counter()
        self.train_s += t2 - t0
        self.step_s.append(t2 - t1)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="training steps (default 1500)")
    ap.add_argument("--lr", type=float, default=0.03, help="one lr for every optimizer")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = DigitsTask(0.0, [256, 256], args.seed)
    names = ("AdamW", "SNRAdamW diagonal", "SNRAdamW subspace r=32")
    runs = [Run(n, task, args.lr, flush, args.seed) for n in names for flush in (False, True)]
    for i in range(args.steps):
        k = i % len(runs)
        for run in runs[k:] + runs[:k]:
            run.train_step(args.batch)
    base = runs[0].train_s
    print(
        f"digits MLP 64-256-256-10, {args.steps} steps, batch {args.batch}, lr {args.lr}, "
        f"{args.threads} thread(s)\n"
    )
    print(
        "| optimizer | subnormals | subnormal state entries | training s | optimizer step, "
        "last quarter (ms) | parameters as unflushed | training time / AdamW's |"
    )
    print("|---|---|---:|---:|---:|---|---:|")
    quarter = max(args.steps // 4, 1)
    rows = []
    for j, run in enumerate(runs):
        same = None
        if run.flush:  # against its unflushed twin, the run before it
            pairs = zip(run.model.parameters(), runs[j - 1].model.parameters())
            same = all(torch.equal(a, b) for a, b in pairs)
        rows.append(
            dict(
                optimizer=run.name,
                flushed=run.flush,
                subnormal_share=subnormal_share(run.opt),
                train_s=run.train_s,
                step_ms=1e3 * statistics.median(run.step_s[-quarter:]),
                same_parameters=same,
                vs_adamw=run.train_s / base,
            )
        )
        same_text = "-" if same is None else ("bit-identical" if same else "differ")
        print(
            f"| {run.name} | {'flushed' if run.flush else 'gradual (IEEE)'} | "
            f"{100 * rows[-1]['subnormal_share']:.1f}% | {run.train_s:.2f} | "
            f"{rows[-1]['step_ms']:.2f} | {same_text} | {run.train_s / base:.2f}x |"
        )
    return rows


if __name__ == "__main__":
    main()
