"""Would one ``bmm`` per group of same-shape matrices make the subspace step faster?

Issue 16 asked to batch the subspace step's products over matrices of the same shape (one
``bmm`` per shape group instead of one ``mm`` per matrix). This measures it before building it.
A subspace step makes, per tracked matrix ``G`` (its gradient's matrix view, ``d x o``) with
basis ``Q`` (``d x r``) and Adam direction ``D``:

    P = Q^T G;  sketch <- b sketch + (1 - b) G P^T;  coef = Q^T D;  out <- out + Q coef

``per matrix`` runs these as today, four products per matrix. ``bmm`` stacks each shape
group's gradients and directions (the optimizer receives them as separate tensors, so each
stack is a copy: one read and one write of every element, into buffers kept from step to
step) and runs the three projections as one ``bmm`` / ``baddbmm`` per group; the
reconstruction stays per matrix, straight into each ``out`` (stacking ``out`` too would add a
copy back). Bases and sketches are kept stacked, as a batched implementation would keep them.
Both variants run on the trackers of the subspace optimizer of the model (its own bases and
matrix views), are checked to compute the same sketches and reconstructions, and are timed in
interleaved rounds; the ratio is the median of per-round ratios. The digits MLP has no two
matrices of one shape: its "groups" of one only show what stacking costs.

    python benchmarks/subspace_batching.py            # the 3.3M GPT and the digits MLP
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from snr_dist import SNRAdamW, subspace
from snr_dist.experiments.models import GPT


def tracked(opt: torch.optim.Optimizer) -> list[tuple[Tensor, Tensor]]:
    """``(basis, matrix view of the gradient)`` of each matrix a subspace optimizer tracks
    (a transposed view where the basis is on the columns)."""
    return [
        (st["basis"].clone(), subspace.matrix_view(p.grad, bool(st["basis_rows"])))
        for p, st in opt.state.items()
        if "basis" in st
    ]


def product_flops(work: list[tuple[Tensor, Tensor]]) -> int:
    """The four rank-r products' flops: ``8 d o r`` per ``d x o`` matrix view."""
    return sum(8 * g.shape[0] * g.shape[1] * q.shape[1] for q, g in work)


def trackers(model: nn.Module, rank: int) -> list[tuple[Tensor, Tensor]]:
    """`tracked` for a subspace optimizer of ``model`` after one step on random gradients."""
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = SNRAdamW(model.parameters(), lr=1e-4, mode="subspace", rank=rank)
    opt.step()
    return tracked(opt)


Results = Callable[[], list[tuple[Tensor, Tensor]]]


def per_matrix(work: list[tuple[Tensor, Tensor]]) -> tuple[Callable[[], None], Results]:
    """Today's step: four products per matrix. Returns ``(run, results)``; ``results()``
    gives each matrix's ``(sketch, out)`` in ``work``'s order."""
    state = [(q, g, torch.zeros_like(q), g.clone(), torch.zeros_like(g)) for q, g in work]

    def run() -> None:
        for q, g, sketch, d, out in state:
            p = q.T @ g
            sketch.mul_(0.9).addmm_(g, p.T, alpha=0.1)
            coef = q.T @ d
            out.addmm_(q, coef)

    return run, lambda: [(sketch, out) for _, _, sketch, _, out in state]


def batched(
    work: list[tuple[Tensor, Tensor]],
) -> tuple[Callable[[], None], Results, dict[tuple, int]]:
    """The same work with one ``bmm`` / ``baddbmm`` per shape group; also returns the group
    sizes."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (q, g) in enumerate(work):
        groups[(tuple(q.shape), tuple(g.shape), g.is_contiguous())].append(i)
    state = []
    for (_, _, rows), idx in groups.items():
        qs = torch.stack([work[i][0] for i in idx])  # kept stacked, as a batched tracker would
        # stack the tensors as they are laid out (a transposed view is stacked untransposed and
        # transposed back as a batch: the copy stays sequential)
        gs = [work[i][1] if rows else work[i][1].mT for i in idx]
        ds = [g.clone() for g in gs]
        outs = [torch.zeros_like(g) for g in gs]
        # persistent stacking buffers: a fresh allocation per step costs page faults that
        # would be charged to batching unfairly
        bufs = (torch.empty((len(gs), *gs[0].shape)), torch.empty((len(gs), *gs[0].shape)))
        state.append((idx, qs, gs, torch.zeros_like(qs), ds, outs, rows, bufs))

    def view(stacked: Tensor, rows: bool) -> Tensor:
        return stacked if rows else stacked.mT

    def run() -> None:
        for _, qs, gs, sketches, ds, outs, rows, (gbuf, dbuf) in state:
            # the gradients arrive as separate tensors: a copy
            g = view(torch.stack(gs, out=gbuf), rows)
            p = torch.bmm(qs.mT, g)
            sketches.mul_(0.9).baddbmm_(g, p.mT, alpha=0.1)
            coef = torch.bmm(qs.mT, view(torch.stack(ds, out=dbuf), rows))  # and the directions
            for i, out in enumerate(outs):
                view(out, rows).addmm_(qs[i], coef[i])

    def results() -> list[tuple[Tensor, Tensor]]:
        out: list = [None] * len(work)
        for idx, _, _, sketches, _, outs, rows, _ in state:
            for j, i in enumerate(idx):
                out[i] = (sketches[j], view(outs[j], rows))
        return out

    return run, results, {k: len(v) for k, v in groups.items()}


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    gpt = GPT(256, 128, 256, 4, 4)
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    return {"GPT 4L d=256 (3.3M)": gpt, "MLP 64-256-256-10": mlp}


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(name: str, model: nn.Module, args) -> dict[str, Any]:
    work = trackers(model, args.rank)
    one, one_results = per_matrix(work)
    many, many_results, sizes = batched(work)
    one()
    many()
    # the two variants do the same work: same sketches and reconstructions up to rounding
    err = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        for pa, pb in zip(one_results(), many_results())
        for a, b in zip(pa, pb)
    )
    for _ in range(args.warmup):
        one()
        many()
    a, b = [], []
    for r in range(args.rounds):
        first, second = (one, many) if r % 2 == 0 else (many, one)
        t1, t2 = timed(first), timed(second)
        a.append(t1 if r % 2 == 0 else t2)
        b.append(t2 if r % 2 == 0 else t1)
    return {
        "model": name,
        "matrices": len(work),
        "shape_groups": len(sizes),
        "largest_group": max(sizes.values()),
        "max_rel_difference": err,
        "per_matrix_ms": 1e3 * statistics.median(a),
        "bmm_ms": 1e3 * statistics.median(b),
        "bmm_vs_per_matrix": statistics.median(y / x for x, y in zip(a, b)),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    results = [measure(n, m, args) for n, m in models().items()]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, rank {args.rank}, "
        f"{args.rounds} interleaved rounds (medians; the ratio is the median of per-round "
        "ratios)\n"
    )
    print(
        "| model | tracked matrices | shape groups | largest group | per matrix (ms) "
        "| bmm per group (ms) | bmm / per matrix |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['matrices']} | {r['shape_groups']} | {r['largest_group']} "
            f"| {r['per_matrix_ms']:.2f} | {r['bmm_ms']:.2f} | {r['bmm_vs_per_matrix']:.3f}x |"
        )
    worst = max(r["max_rel_difference"] for r in results)
    print(f"\nLargest relative difference between the two variants' results: {worst:.1e}.")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
