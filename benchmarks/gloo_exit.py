"""How often a gloo rank aborts at exit when its process group is not destroyed.

A finished process that never calls ``torch.distributed.destroy_process_group()`` leaves its
gloo process group to interpreter shutdown, where a rank can die with ``terminate called
without an active exception`` (SIGABRT, exit code -6) after all its work is done (seen in this
project's Lightning DDP and torchrun tests; pytorch/pytorch#190489, and #179291 for why). This
script starts ``--world`` gloo ranks that run two collectives and exit, ``--runs`` times with
the group destroyed at the end and as many times without, and counts the runs in which any
rank aborted.

    python benchmarks/gloo_exit.py                    # 30 runs each way, 4 ranks
    python benchmarks/gloo_exit.py --runs 10 --world 2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from snr_dist.distributors.ports import free_port


def _rank(rank: int, world: int, port: int, destroy: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = [torch.empty(1) for _ in range(world)]
    dist.all_gather(out, torch.tensor([float(rank)]))
    dist.all_reduce(torch.ones(1000), async_op=True).wait()
    if destroy:
        dist.destroy_process_group()


def one_run(world: int, destroy: bool) -> list[int | None]:
    """The ranks' exit codes."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, destroy)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    return [p.exitcode for p in procs]


def main(argv: Sequence[str] | None = None) -> dict[bool, int]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--world", type=int, default=4)
    args = ap.parse_args(argv)
    aborted = {}
    for destroy in (False, True):
        codes = [one_run(args.world, destroy) for _ in range(args.runs)]
        aborted[destroy] = sum(any(c != 0 for c in run) for run in codes)
        how = "destroyed at the end" if destroy else "left to interpreter exit"
        print(f"process group {how}: {aborted[destroy]} of {args.runs} runs had a rank abort")
    return aborted


if __name__ == "__main__":
    main()
