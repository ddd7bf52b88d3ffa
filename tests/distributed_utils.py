"""Run a function on N real processes joined by a gloo process group on 127.0.0.1.

The function must live at module level in an importable module (it is pickled by name for
the ``spawn`` start method). Each rank's return value comes back to the test; an exception on
any rank fails the test with that rank's traceback.
"""

from __future__ import annotations

import gc
import io
import os
import queue
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_next_port: dict[str, int] = {}


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A port for one test's process group (or rendezvous) that no concurrent test picks.

    Not ``bind(0)``: the kernel draws those from its ephemeral range, the same pool that
    client sockets and torchrun's own free-port lookups (the workers' store under
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) draw from, so a port this test chose could be
    handed to another test's process before this test binds it, and two tests would then share
    one rendezvous store. Ports come from a block below the ephemeral range, one block per
    pytest-xdist worker, tried in turn until one binds."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    low = min(_ephemeral_low(), 32768)
    block = 500
    start = max(1024, low - block * (index + 1) * 2)  # well clear of the ephemeral range
    if start + block > low:  # an unusual range: fall back to the kernel's choice
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    # a random start within the block: a pytest run right after another does not meet the
    # previous run's ports in TIME_WAIT first
    nxt = _next_port.setdefault(worker, start + (os.getpid() * 7919) % block)
    for i in range(block):
        port = start + (nxt - start + i) % block
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _next_port[worker] = start + (port - start + 1) % block
        return port
    raise RuntimeError(f"no free port in {start}-{start + block - 1}")


def _worker(rank, world, port, fn, args, results, init) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if init:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    else:  # the function (or the framework it runs) starts torch.distributed from the env
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world)
        )
    try:
        buf = io.BytesIO()  # plain bytes: tensors shared by file descriptor die with the child
        torch.save(fn(rank, world, *args), buf)
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            # the function's objects (wrappers, optimizers, gloo work handles) can sit in
            # reference cycles: free them while the interpreter is whole, then the group
            # (left to interpreter exit, gloo's threads may abort the rank)
            gc.collect()
            dist.destroy_process_group()


def run_distributed(fn, world: int = 2, *args, timeout: float = 180.0, init: bool = True) -> list:
    """``[fn(rank, world, *args) for each rank]``, computed by ``world`` processes. With
    ``init=False`` no process group is started: ``fn`` finds ``MASTER_ADDR``, ``MASTER_PORT``,
    ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the environment, as under torchrun."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, results, init), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout)
            if status == "ok":
                out[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors.append(f"rank {rank}:\n{value}")
    except queue.Empty:
        errors.append(f"timed out after {timeout}s; ranks that finished: {sorted(out)}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)
    return [out[r] for r in range(world)]
