"""Bytes snr-dist adds per step under DDP and DeepSpeed ZeRO 2/3, against the gradient bytes.

Two real processes (gloo on 127.0.0.1) train the step-overhead benchmark's GPT under
DistributedDataParallel. DDP's own traffic is counted by a communication hook that wraps its
bucket all-reduce; snr-dist's by the byte counters of its process-group wrapper. Both are
measured, not computed from shapes. Reported per optimizer: the per-step all-reduce (steady
state) and the basis broadcasts of refreshes, amortised over ``refresh_every`` steps. The
optimizer is given the data-parallel group (``process_group=dist.group.WORLD``), so tracker
refreshes are shared out between the ranks and cross-sample statistics pooled.

    python benchmarks/comm_bytes.py            # the GPT of benchmarks/step_overhead.py
    python benchmarks/comm_bytes.py --rank 64  # another rank

The ZeRO-2 and ZeRO-3 rows run the same GPT under real DeepSpeed (CPU accelerator) with
subspace trackers on row shards (`snr_dist.optim.zero_view`); snr-dist's bytes are its counters
again (the step's statistics, refreshes and the exchanges of rows cut by partition
boundaries), and the gradient bytes are the model's fp32 gradient (``numel x 4``, what a DDP
all-reduce moves; ZeRO's reduce-scatter moves about half of it per rank).

Also prints the tracker balance (max/mean owned cost) of that model for 2, 4 and 8 ranks.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import queue
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snr_dist import SNRAdamW
from snr_dist.distributors import assign_owners, balance_ratio
from snr_dist.distributors.ports import free_port
from snr_dist.experiments.models import GPT


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="sequences per rank")
    ap.add_argument("--rank", type=int, default=32, help="subspace rank")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--refresh-every", type=int, default=50)
    ap.add_argument(
        "--zero-stages",
        default="2,3",
        help="DeepSpeed ZeRO stages of the ZeRO rows (comma-separated; default 2,3)",
    )
    ap.add_argument(
        "--no-zero",
        action="store_true",
        help="skip the DeepSpeed ZeRO rows (skipped anyway without the deepspeed extra)",
    )
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_args(argv)


def configs(rank: int, refresh_every: int) -> dict[str, dict[str, Any]]:
    sub = dict(mode="subspace", rank=rank, refresh_every=refresh_every)
    return {
        "SNRAdamW diagonal temporal": {},
        f"SNRAdamW subspace r={rank} temporal": sub,
        f"SNRAdamW subspace r={rank} cross-sample": dict(sub, estimator="cross_sample"),
    }


def _counting_hook(counter: dict):
    def hook(state, bucket):
        buf = bucket.buffer()
        counter["bytes"] += buf.numel() * buf.element_size()
        fut = dist.all_reduce(buf.div_(dist.get_world_size()), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    return hook


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        results = {}
        for name, kw in configs(args.rank, args.refresh_every).items():
            torch.manual_seed(0)
            model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads)
            ddp = DDP(model)
            counter = {"bytes": 0}
            ddp.register_comm_hook(None, _counting_hook(counter))
            opt = SNRAdamW(model.parameters(), lr=3e-4, process_group=dist.group.WORLD, **kw)
            comm = opt.distributor.comm
            gen = torch.Generator().manual_seed(1 + rank)
            refreshes = 0
            for step in range(1, args.steps + 1):
                idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
                opt.zero_grad()
                logits = ddp(idx[:, :-1])
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, args.vocab), idx[:, 1:].reshape(-1)
                ).backward()
                opt.step()
                refreshes += int(step & (step - 1) == 0 or step % args.refresh_every == 0)
            results[name] = {
                "ddp_bytes_per_step": counter["bytes"] / args.steps,
                "allreduce_bytes_per_step": comm.bytes.get("all_reduce", 0) / args.steps,
                "broadcast_bytes_per_refresh": comm.bytes.get("broadcast", 0) / max(refreshes, 1),
                "allreduce_calls_per_step": comm.calls.get("all_reduce", 0) / args.steps,
                "trackers": len(opt.distributor.costs),
            }
        if not args.no_zero and importlib.util.find_spec("deepspeed") is not None:
            results.update(_zero_rows(rank, world, args))
        if rank == 0:
            buf = io.BytesIO()
            torch.save(results, buf)
            out.put(buf.getvalue())
    finally:
        dist.destroy_process_group()


def _zero_rows(rank: int, world: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The subspace configs under DeepSpeed ZeRO 2 and 3 (fp32), on the running process group."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    from snr_dist import deepspeed as snr_ds

    rows = {}
    sub = dict(mode="subspace", rank=args.rank, refresh_every=args.refresh_every)
    for stage in (int(s) for s in args.zero_stages.split(",")):
        cross = dict(sub, estimator="cross_sample")
        for label, snr in (("temporal", sub), ("cross-sample", cross)):
            torch.manual_seed(0)
            model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads)
            numel = sum(p.numel() for p in model.parameters())
            cfg = {
                "train_micro_batch_size_per_gpu": args.batch,
                "gradient_accumulation_steps": 1,
                "train_batch_size": args.batch * world,
                "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                "snr_preconditioner": snr,
                "zero_optimization": {"stage": stage},
                "steps_per_print": 10**9,
            }
            engine, opt, _, _ = snr_ds.initialize(model=model, config=cfg)
            comm = opt.optimizer.distributor.comm
            view = opt.optimizer.zero_view
            gen = torch.Generator().manual_seed(1 + rank)
            refreshes = 0
            for step in range(1, args.steps + 1):
                idx = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
                logits = engine(idx[:, :-1])
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, args.vocab), idx[:, 1:].reshape(-1)
                )
                engine.backward(loss)
                engine.step()
                refreshes += int(step & (step - 1) == 0 or step % args.refresh_every == 0)
            cut_rows = sum(len(p.cuts) for b in view.buckets for p in b.pieces)
            rows[f"ZeRO-{stage} subspace r={args.rank} {label}"] = {
                "ddp_bytes_per_step": numel * 4,
                "allreduce_bytes_per_step": comm.bytes.get("all_reduce", 0) / args.steps,
                "broadcast_bytes_per_refresh": (
                    comm.bytes.get("broadcast", 0) + comm.bytes.get("reduce", 0)
                )
                / max(refreshes, 1),
                "allreduce_calls_per_step": comm.calls.get("all_reduce", 0) / args.steps,
                "trackers": len(opt.optimizer.distributor.costs),
                "cut_rows": cut_rows,
            }
            engine.destroy()
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    payload = None
    while payload is None:  # wait for rank 0, but notice a rank that died
        try:
            payload = out.get(timeout=2)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a benchmark rank failed (exit codes {dead})") from None
    results = torch.load(io.BytesIO(payload), weights_only=False)
    for p in procs:
        p.join()
    model = GPT(args.vocab, args.seq, args.d_model, args.layers, args.heads)
    costs = list(
        SNRAdamW(model.parameters(), mode="subspace", rank=args.rank).distributor.costs.values()
    )
    balance = {w: balance_ratio(costs, assign_owners(costs, w), w) for w in (2, 4, 8)}
    return {"config": vars(args), "rows": results, "balance": balance}


def format_report(res: dict[str, Any]) -> str:
    a = res["config"]
    lines = [
        f"GPT {a['layers']}L d={a['d_model']} vocab={a['vocab']} seq={a['seq']}, 2 ranks (DDP, "
        f"gloo), {a['steps']} steps, refresh_every={a['refresh_every']}",
        "",
        "| optimizer | gradient bytes/step | snr-dist all-reduce bytes/step | % of gradient "
        "| + refreshes, amortised | % of gradient |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["rows"].items():
        ddp = r["ddp_bytes_per_step"]
        steady = r["allreduce_bytes_per_step"]
        amort = steady + r["broadcast_bytes_per_refresh"] / a["refresh_every"]
        lines.append(
            f"| {name} | {ddp:,.0f} | {steady:,.0f} | {100 * steady / ddp:.3f}% "
            f"| {amort:,.0f} | {100 * amort / ddp:.3f}% |"
        )
    bal = ", ".join(f"{w} ranks {v:.3f}" for w, v in res["balance"].items())
    cuts = {k: r["cut_rows"] for k, r in res["rows"].items() if "cut_rows" in r}
    if cuts:
        lines += [
            "",
            "ZeRO rows: gradient bytes = fp32 gradient (numel x 4); snr-dist bytes include the "
            "exchange of rows cut by partition boundaries ("
            + ", ".join(
                sorted({f"{k.split(' subspace')[0]}: {v} cut row(s)" for k, v in cuts.items()})
            )
            + "); their refresh column adds the partial sketches reduced to owners.",
        ]
    lines += ["", f"Tracker balance (max/mean owned cost): {bal}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    print(format_report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
