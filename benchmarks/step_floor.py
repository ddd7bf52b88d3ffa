"""The optimizer step against AdamW's and against the bytes-moved floor (issue 16's yardstick).

An elementwise optimizer step on the CPU is memory-bound: its time is set by the bytes it reads
and writes. This benchmark measures, on one machine in one run:

* the bandwidth of a plain multi-tensor add over the model's parameter shapes
  (``torch._foreach_add_(a, b)``: 2 reads + 1 write per element), in bytes per second;
* the ``optimizer.step()`` time of AdamW (``foreach=True``), SNRAdamW diagonal and SNRAdamW
  subspace r=32, given a fixed gradient (no forward or backward);
* the full training step (zero_grad, forward, loss, backward, step) of each, on its own copy
  of the model, and the optimizer step inside it timed apart;

on three models: the 3.3M-parameter GPT of ``benchmarks/step_overhead.py``, the digits studies'
64-256-256-10 MLP, and a 14.7M-parameter GPT whose embedding, head and MLP matrices are larger
than the CPU step's chunks (`snr_dist.optim.snr_adamw.CPU_CHUNK_ELEMENTS`);

and reports each step time as a multiple of AdamW's and of its *floor*: the passes over the
parameters' fp32 bytes that its rule cannot avoid, divided by the measured bandwidth. Passes:
AdamW 7 (read p, g, m, v; write p, m, v); SNRAdamW diagonal 9 (its one extra state vector read
and written); SNRAdamW subspace 9 (AdamW's 7, plus the gradient and the update direction each
read once more for their projections on the tracker bases). Timing is interleaved (each round
runs every optimizer once, in rotated order) and ratios are medians of per-round ratios, as in
``benchmarks/step_overhead.py``: shared machines drift.

The isolated step and the step inside training differ on the CPU: the C library's heap hands
large freed blocks back to the kernel, and a step that allocates model-sized temporaries then
pays a page fault per 4 KB to get them back (the isolated rows count them: torch's AdamW pays
thousands per step there); after a backward pass the heap holds freed activations and the same
temporaries cost no fault. Both are printed.

The subspace rule also has a flops floor: four rank-r products per tracked matrix (8 r flops
per matrix element, 256 at r=32) that no fusing removes. They are timed alone in the same
full-step rounds; AdamW's training step plus their time is the shortest a subspace training
step can be, and their share of the training step's forward + backward flops says how that
floor moves with the batch (it falls as the tokens per step grow).

    python benchmarks/step_floor.py                 # GPT 3.3M, the MLP, GPT 14.7M
    python benchmarks/step_floor.py --only wide     # the 14.7M GPT with large tensors alone
    python benchmarks/step_floor.py --rounds 60 --json out.json
    python benchmarks/step_floor.py --device cuda   # on a GPU: the Triton and compiled steps
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from snr_dist import SNRAdamW, subspace
from snr_dist.experiments.models import GPT

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # the sibling benchmark
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import subspace_batching  # noqa: E402  (the subspace products, shared with that benchmark)

PASSES = {
    "AdamW (foreach)": 7,
    "SNRAdamW diagonal": 9,
    "SNRAdamW diagonal, kernels='compile'": 9,
    "SNRAdamW subspace r=32": 9,
}
COMPILED = "SNRAdamW diagonal, kernels='compile'"
SUBSPACE = "SNRAdamW subspace r=32"
PRODUCTS = "subspace rank-32 products alone"


def optimizers() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    return {
        "AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
        # the uncompiled step, also where kernels="auto" would compile (the 14.7M GPT)
        "SNRAdamW diagonal": lambda ps: SNRAdamW(ps, lr=1e-4, kernels="torch"),
        COMPILED: lambda ps: SNRAdamW(ps, lr=1e-4, kernels="compile"),
        SUBSPACE: lambda ps: SNRAdamW(ps, lr=1e-4, mode="subspace", rank=32),
    }


def training_flops(model: nn.Module, batch: Callable) -> int:
    """Forward + backward flops of one training step (torch's flop counter: matmuls and
    convolutions, the part that scales with the batch)."""
    m = copy.deepcopy(model)
    inputs, loss_fn = batch()
    with FlopCounterMode(display=False) as counter:
        loss_fn(m(inputs)).backward()
    return counter.get_total_flops()


def refresh_cost(model: nn.Module, refresh_every: int, periods: int) -> dict[str, float]:
    """A subspace tracker's basis refresh, timed apart from the step: every optimizer step of
    ``periods * refresh_every`` steps is timed, the steps that refresh (``refresh_due``: 2, 4,
    8, ... and every ``refresh_every``-th) against those that do not. The step rows above are
    medians, which the rare refresh steps do not move; this is what they leave out."""
    m = copy.deepcopy(model)
    for p in m.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = SNRAdamW(m.parameters(), lr=1e-4, mode="subspace", rank=32, refresh_every=refresh_every)
    opt.step()  # step 1: state allocation
    plain, refresh = [], []
    for t in range(2, periods * refresh_every + 1):
        (refresh if subspace.refresh_due(t, refresh_every) else plain).append(timed(opt.step))
    extra = max(statistics.median(refresh) - statistics.median(plain), 0.0)
    return {
        "refresh_every": refresh_every,
        "refresh_steps": len(refresh),
        "plain_step_ms": 1e3 * statistics.median(plain),
        "refresh_extra_ms": 1e3 * extra,
        "amortised_ms_per_step": 1e3 * extra / refresh_every,
        "amortised_vs_plain_step": extra / refresh_every / statistics.median(plain),
    }


def models(args: argparse.Namespace) -> dict[str, tuple[str, nn.Module, Callable]]:
    """``key -> (name, model, batch maker)``; a batch maker returns ``(inputs, loss_fn)``."""
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    gpt = GPT(256, 128, 256, 4, 4).to(dev)

    def gpt_batch():
        idx = torch.randint(0, 256, (args.gpt_batch, 129), generator=gen).to(dev)
        target = idx[:, 1:].reshape(-1)
        return idx[:, :-1], lambda out: F.cross_entropy(out.reshape(-1, 256), target)

    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    ).to(dev)

    def mlp_batch():
        x = torch.randn(128, 64, generator=gen).to(dev)
        y = torch.randint(0, 10, (128,), generator=gen).to(dev)
        return x, lambda out: F.cross_entropy(out, y)

    # tensors larger than the CPU step's chunks (a 4.2M-entry embedding and head, 1M-entry
    # MLP matrices), which it steps in pieces
    torch.manual_seed(0)
    wide = GPT(8192, 64, 512, 2, 8).to(dev)

    def wide_batch():
        idx = torch.randint(0, 8192, (4, 65), generator=gen).to(dev)
        target = idx[:, 1:].reshape(-1)
        return idx[:, :-1], lambda out: F.cross_entropy(out.reshape(-1, 8192), target)

    return {
        "gpt": ("GPT 4L d=256 (3.3M)", gpt, gpt_batch),
        "mlp": ("MLP 64-256-256-10", mlp, mlp_batch),
        "wide": ("GPT 2L d=512 vocab 8192 (14.7M)", wide, wide_batch),
    }


def sync() -> None:
    """Wait for the GPU (timings on CUDA measure the work, not its launch)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def bandwidth(params: list[torch.Tensor], rounds: int) -> float:
    """Bytes per second of a multi-tensor add over these shapes (2 reads + 1 write)."""
    a = [torch.randn_like(p) for p in params]
    b = [torch.randn_like(p) for p in params]
    nbytes = sum(t.numel() * t.element_size() for t in a)
    for _ in range(3):
        torch._foreach_add_(a, b)
    times = [timed(lambda: torch._foreach_add_(a, b)) for _ in range(rounds)]
    return 3 * nbytes / statistics.median(times)


def _minor_faults() -> int:
    """Page faults the kernel served this process without I/O so far (fresh pages the
    allocator asked for included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, faults: dict[str, list[int]] | None = None
) -> dict[str, list[float]]:
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            before = _minor_faults()
            times[n].append(timed(fns[n]))
            if faults is not None:
                faults.setdefault(n, []).append(_minor_faults() - before)
    return times


def _ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[base]))


def measure(name: str, model: nn.Module, batch: Callable, args) -> dict[str, Any]:
    factories = optimizers()
    base = next(iter(factories))
    # optimizer.step() alone, on a fixed gradient
    copies = {n: copy.deepcopy(model) for n in factories}
    opts, first = {}, {}
    for n, m in copies.items():
        for p in m.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts[n] = factories[n](list(m.parameters()))
        first[n] = timed(opts[n].step)  # kernels='compile': compiles here
        for _ in range(args.warmup):
            opts[n].step()
    step_faults: dict[str, list[int]] = {}
    step_times = _interleaved({n: opts[n].step for n in factories}, args.rounds, step_faults)
    # the full training step, each optimizer on its own copy
    full_models = {n: copy.deepcopy(model) for n in factories}
    full_opts = {n: factories[n](list(m.parameters())) for n, m in full_models.items()}

    in_training: dict[str, list[float]] = {n: [] for n in factories}

    def train_step(n):
        def run():
            inputs, loss_fn = batch()
            full_opts[n].zero_grad(set_to_none=True)
            loss_fn(full_models[n](inputs)).backward()
            in_training[n].append(timed(full_opts[n].step))

        return run

    runs = {n: train_step(n) for n in factories}
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    for n in factories:
        in_training[n].clear()
    # the four rank-r products per tracked matrix (a floor the subspace step cannot go below:
    # the rule needs these flops), on the subspace optimizer's own bases and matrix views
    work = subspace_batching.tracked(full_opts[SUBSPACE])
    products, _ = subspace_batching.per_matrix(work)
    product_flops = subspace_batching.product_flops(work)
    runs[PRODUCTS] = products  # timed in the same rounds: a floor for the subspace row
    full_times = _interleaved(runs, args.full_rounds)
    params = list(model.parameters())
    nbytes = sum(p.numel() * 4 for p in params)
    bw = bandwidth(params, args.rounds)
    rows = {}
    eager = "SNRAdamW diagonal"
    for n in factories:
        step = statistics.median(step_times[n])
        floor = PASSES[n] * nbytes / bw
        rows[n] = {
            "step_ms": 1e3 * step,
            "step_vs_adamw": _ratio(step_times, n, base),
            "floor_ms": 1e3 * floor,
            "step_vs_floor": step / floor,
            "step_faults": statistics.median(step_faults[n]),
            "in_training_step_ms": 1e3 * statistics.median(in_training[n]),
            "in_training_vs_adamw": _ratio(in_training, n, base),
            "full_step_ms": 1e3 * statistics.median(full_times[n]),
            "full_vs_adamw": _ratio(full_times, n, base),
            "first_step_s": first[n],
        }
    # what compiling costs once, and after how many training steps it has paid for itself
    # (the saving from the paired ratios, which shared-machine drift does not bias)
    adamw_full = statistics.median(full_times[base])
    saved = (rows[eager]["full_vs_adamw"] - rows[COMPILED]["full_vs_adamw"]) * adamw_full
    compile_s = first[COMPILED] - statistics.median(step_times[COMPILED])
    rows[COMPILED]["compile_s"] = compile_s
    rows[COMPILED]["saved_ms_per_step"] = 1e3 * saved
    rows[COMPILED]["pays_back_after_steps"] = compile_s / saved if saved > 0 else None
    train_flops = training_flops(model, batch)
    rows[SUBSPACE]["products_ms"] = 1e3 * statistics.median(full_times[PRODUCTS])
    rows[SUBSPACE]["products_flops_share"] = product_flops / train_flops
    rows[SUBSPACE]["full_vs_adamw_floor"] = 1.0 + _ratio(full_times, PRODUCTS, base)
    return {
        "model": name,
        "params": sum(p.numel() for p in params),
        "bandwidth_gb_s": bw / 1e9,
        "rows": rows,
        "refresh": refresh_cost(model, args.refresh_every, args.refresh_periods),
    }


def format_report(results: list[dict[str, Any]], args) -> str:
    lines = [
        f"torch {torch.__version__}, {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f", {torch.get_num_threads()} threads; {args.rounds} "
        f"interleaved step rounds, {args.full_rounds} full-step rounds (medians; ratios are "
        "medians of per-round ratios)",
        "",
        "| model | optimizer | step (ms) | step / AdamW step | page faults per step "
        "| floor passes | step / floor | step inside training (ms) | its / AdamW's "
        "| full training step / AdamW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for n, r in res["rows"].items():
            lines.append(
                f"| {res['model']} | {n} | {r['step_ms']:.2f} | {r['step_vs_adamw']:.2f}x "
                f"| {r['step_faults']:.0f} | {PASSES[n]} | {r['step_vs_floor']:.2f}x "
                f"| {r['in_training_step_ms']:.2f} | {r['in_training_vs_adamw']:.2f}x "
                f"| {r['full_vs_adamw']:.3f}x |"
            )
    bws = ", ".join(f"{r['model']}: {r['bandwidth_gb_s']:.1f} GB/s" for r in results)
    lines += ["", f"Measured multi-tensor add bandwidth: {bws}.", ""]
    for res in results:
        s = res["rows"][SUBSPACE]
        lines.append(
            f"{res['model']}: the subspace step's four rank-32 products per matrix alone take "
            f"{s['products_ms']:.2f} ms ({100 * s['products_flops_share']:.1f}% of the training "
            f"step's forward + backward flops): AdamW's training step plus them is "
            f"{s['full_vs_adamw_floor']:.3f}x AdamW's, the floor of the subspace row at this "
            f"batch size (measured {s['full_vs_adamw']:.3f}x)."
        )
    lines.append("")
    lines += [
        "| model | subspace step without refresh (ms) | a refresh adds (ms) | refresh_every "
        "| amortised per step (ms) | amortised / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        f = res["refresh"]
        lines.append(
            f"| {res['model']} | {f['plain_step_ms']:.2f} | {f['refresh_extra_ms']:.2f} "
            f"| {f['refresh_every']} | {f['amortised_ms_per_step']:.3f} "
            f"| {100 * f['amortised_vs_plain_step']:.1f}% |"
        )
    lines.append("")
    for k, res in enumerate(results):
        c = res["rows"][COMPILED]
        saved = c["saved_ms_per_step"]
        gain = (
            f"its training step is {saved:.2f} ms shorter than the uncompiled one"
            if saved > 0
            else "its training step was not shorter than the uncompiled one here"
        )
        if k == 0:
            cache = "a fresh" if args.cold_compile else "the default"
            back = c["pays_back_after_steps"]
            when = f"; it pays back after {back:.0f} steps" if back is not None else ""
            lines.append(
                f"{res['model']}: kernels='compile' costs {c['compile_s']:.1f} s once (first "
                f"step, {cache} Inductor cache); {gain}{when}."
            )
        else:
            lines.append(
                f"{res['model']}: kernels='compile' (already compiled above: one function "
                f"serves every shape): {gain}."
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=40, help="interleaved optimizer-step rounds")
    ap.add_argument("--full-rounds", type=int, default=40, help="interleaved full-step rounds")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--gpt-batch", type=int, default=8)
    ap.add_argument("--only", choices=["gpt", "mlp", "wide"], help="one model only")
    ap.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: on CUDA SNRAdamW's defaults run the Triton step, and "
        "every timing waits for the device",
    )
    ap.add_argument(
        "--refresh-every", type=int, default=50, help="subspace refresh period (the default)"
    )
    ap.add_argument(
        "--refresh-periods", type=int, default=2, help="refresh periods timed for the refresh row"
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--cold-compile",
        action="store_true",
        help="compile into a fresh Inductor cache (the first run on a machine) instead of "
        "the default one, so the compile cost includes the C++ compiler",
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.cold_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="snr-inductor-")
    results = []
    for key, (name, model, batch) in models(args).items():
        if args.only and key != args.only:
            continue
        results.append(measure(name, model, batch, args))
    print(format_report(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
