"""Benchmark of the Triton kernels against their torch references, as a markdown table.

On a CUDA GPU (the numbers that count)::

    python kernels/bench.py                     # 4096x4096 and 4096x11008, r 32/128, bf16/fp32
    python kernels/bench.py --out docs/kernels-bench.md

Each row times one kernel and its torch reference (cuBLAS matmul plus elementwise ops, the
way snr-dist's torch path computes it) in the same run, reports the achieved bandwidth (bytes
that must move / time) against the device's peak, and the kernel's error against the
reference. ``--smoke`` runs tiny shapes in Triton's CPU interpreter: it checks that the script
works, and its times mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

GOAL_STEP_PEAK = 0.80  # fused step: >= 80% of peak HBM bandwidth
GOAL_SUBSPACE_SPEEDUP = 1.3  # projection + reconstruct: >= 1.3x the torch reference
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x11008")
    ap.add_argument("--ranks", default="32,128")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the peak bandwidth")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the CPU interpreter")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--json", default=None, help="also write the rows as JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shapes, args.ranks = "48x80", "8"
    return args


def peak_gbs(torch) -> float | None:
    """Theoretical DRAM bandwidth: 2 transfers per memory clock x bus width."""
    import triton

    props = triton.runtime.driver.active.utils.get_device_properties(torch.cuda.current_device())
    clock_khz, bus_bits = props.get("mem_clock_rate"), props.get("mem_bus_width")
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def timer(torch, cuda: bool):
    if cuda:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu(fn):  # the interpreter: one timed call after one warm-up
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return cpu


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def main(argv=None) -> list[dict]:
    args = parse(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda:
        if not args.smoke:
            sys.exit("kernels/bench.py needs a CUDA GPU (or --smoke for an interpreter check)")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    from snr_dist import kernels as ref
    from snr_dist import triton_kernels as kernels

    device = "cuda" if cuda else "cpu"
    bench = timer(torch, cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter, smoke run)"
    peak = args.peak_gbs or (peak_gbs(torch) if cuda else None)
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in args.shapes.split(","):
        m, n = (int(v) for v in shape.split("x"))
        for dname in args.dtypes.split(","):
            dt = getattr(torch, DTYPES[dname])
            x = torch.randn(m, n, device=device, generator=gen).to(dt)
            for r in (int(v) for v in args.ranks.split(",")):
                q = torch.linalg.qr(torch.randn(n, r, device=device, generator=gen)).Q.to(dt)
                c = torch.rand(r, device=device, generator=gen)
                a = torch.tensor(0.3, device=device)
                coef = (x.float() @ q.float()).contiguous()
                esz = x.element_size()

                def torch_project(x=x, q=q):
                    rr = x @ q
                    return rr, rr.float().square().sum(dim=0)

                def torch_reconstruct(x=x, coef=coef, q=q, c=c):
                    # one cuBLAS call with a X folded in: the strongest torch formulation
                    return torch.addmm(x, (coef * c).to(x.dtype), q.T, beta=0.3)

                got = kernels.project_with_stats(x, q)
                want = ref.project_with_stats_torch(x, q)
                err_p = max(rel_err(got[0], want[0]), rel_err(got[1], want[1]))
                t_p = bench(lambda x=x, q=q: kernels.project_with_stats(x, q))
                t_pr = bench(torch_project)
                bytes_p = m * n * esz + n * r * esz + m * r * 4
                got = kernels.gate_reconstruct(x, coef, q, c, a, check_orthonormal=False)
                want = ref.gate_reconstruct_torch(x, coef, q, c, a, check_orthonormal=False)
                err_r = rel_err(got, want)
                t_r = bench(
                    lambda x=x, coef=coef, q=q, c=c, a=a: kernels.gate_reconstruct(
                        x, coef, q, c, a, check_orthonormal=False
                    )
                )
                t_rr = bench(torch_reconstruct)
                bytes_r = 2 * m * n * esz + m * r * 4 + n * r * esz
                common = dict(shape=f"{m}x{n}", r=r, dtype=dname)
                rows.append(
                    dict(
                        common,
                        kernel="project_with_stats",
                        ms=t_p,
                        torch_ms=t_pr,
                        gbs=bytes_p / t_p / 1e6,
                        max_rel_err=err_p,
                    )
                )
                rows.append(
                    dict(
                        common,
                        kernel="gate_reconstruct",
                        ms=t_r,
                        torch_ms=t_rr,
                        gbs=bytes_r / t_r / 1e6,
                        max_rel_err=err_r,
                    )
                )
                rows.append(
                    dict(
                        common,
                        kernel="project + reconstruct",
                        ms=t_p + t_r,
                        torch_ms=t_pr + t_rr,
                        gbs=(bytes_p + bytes_r) / (t_p + t_r) / 1e6,
                        max_rel_err=max(err_p, err_r),
                    )
                )
            rows.append(step_row(torch, kernels, ref, bench, m, n, dt, dname, device, gen))
    for row in rows:
        row["speedup"] = row["torch_ms"] / row["ms"]
        row["peak_frac"] = row["gbs"] / peak if peak else None
    text = table(rows, name, peak, cuda)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "peak_gbs": peak, "rows": rows}))
    return rows


def step_row(torch, kernels, ref, bench, m, n, dt, dname, device, gen) -> dict:
    """The fused step on one m x n parameter with fp32 state (the gate active: step 10)."""
    p = torch.randn(m, n, device=device, generator=gen).to(dt)
    g = torch.randn(m, n, device=device, generator=gen).to(dt)
    state = [torch.rand(m, n, device=device, generator=gen) * 0.01 for _ in range(3)]
    kw = dict(
        step=10,
        lr=1e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        snr_beta=0.99,
        gate_rule="wiener",
        tau=1.0,
    )
    mine = [p.clone(), *[s.clone() for s in state]]
    theirs = [p.clone(), *[s.clone() for s in state]]
    kernels.fused_snr_adamw_step([mine[0]], [g], [mine[1]], [mine[2]], [mine[3]], **kw)
    ref.fused_snr_adamw_step_torch([theirs[0]], [g], [theirs[1]], [theirs[2]], [theirs[3]], **kw)
    err = rel_err(mine[0], theirs[0])
    # Timed repeats keep stepping the same tensors: values drift, the traffic does not.
    t_k = bench(lambda: kernels.fused_snr_adamw_step([p], [g], *[[s] for s in state], **kw))
    t_t = bench(lambda: ref.fused_snr_adamw_step_torch([p], [g], *[[s] for s in state], **kw))
    esz = p.element_size()
    moved = m * n * (2 * esz + g.element_size() + 3 * 2 * 4)  # p r/w, g r, m v s r/w
    return dict(
        shape=f"{m}x{n}",
        r=None,
        dtype=dname,
        kernel="fused step",
        ms=t_k,
        torch_ms=t_t,
        gbs=moved / t_k / 1e6,
        max_rel_err=err,
    )


def table(rows, name, peak, cuda) -> str:
    lines = [
        f"Device: {name}" + (f", peak bandwidth {peak:.0f} GB/s" if peak else ""),
        "",
        "| kernel | shape | r | dtype | kernel ms | torch ms | speedup | GB/s | % of peak "
        "| max rel err |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        frac = f"{100 * r['peak_frac']:.0f}%" if r["peak_frac"] is not None else "-"
        lines.append(
            f"| {r['kernel']} | {r['shape']} | {r['r'] if r['r'] is not None else '-'} "
            f"| {r['dtype']} | {r['ms']:.3f} | {r['torch_ms']:.3f} | {r['speedup']:.2f}x "
            f"| {r['gbs']:.0f} | {frac} | {r['max_rel_err']:.1e} |"
        )
    if not cuda:
        lines += ["", "Smoke run in Triton's CPU interpreter: times and bandwidths mean nothing."]
        return "\n".join(lines)
    steps = [r["peak_frac"] for r in rows if r["kernel"] == "fused step" and r["peak_frac"]]
    pairs = [r["speedup"] for r in rows if r["kernel"] == "project + reconstruct"]
    lines += ["", "Goals:"]
    if steps:
        worst = min(steps)
        lines.append(
            f"- fused step >= {GOAL_STEP_PEAK:.0%} of peak bandwidth: worst {worst:.0%} "
            f"({'met' if worst >= GOAL_STEP_PEAK else 'missed'})"
        )
    if pairs:
        lines.append(
            f"- projection + reconstruct >= {GOAL_SUBSPACE_SPEEDUP}x torch: worst "
            f"{min(pairs):.2f}x, median {statistics.median(pairs):.2f}x "
            f"({'met' if min(pairs) >= GOAL_SUBSPACE_SPEEDUP else 'missed'})"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
    main()
