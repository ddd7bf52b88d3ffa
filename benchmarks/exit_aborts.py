"""How often a real finished job aborts at exit, run beside a busy core.

`gloo_exit.py` counts the SIGABRT at interpreter exit (a gloo process group left to shutdown)
on a synthetic script. This one runs a real job, by default the torchrun job the launch tests
run (``snr-dist train`` on 2 gloo ranks, quickstart config, shortened), ``--runs`` times while
a ``python -c 'while True: pass'`` process keeps one core busy (as in a loaded ``make test``),
and counts the runs in which the job failed and the runs in which a rank aborted (SIGABRT,
exit code -6, or ``terminate called`` in the output). The job runs this checkout's
``snr_dist``; ``--pythonpath`` runs another one's (e.g. one with the ``destroy_process_group``
call removed, to count the aborts without it)::

    python benchmarks/exit_aborts.py --runs 20
    python benchmarks/exit_aborts.py --runs 20 --pythonpath /tmp/old_checkout --pythonpath .

With several ``--pythonpath`` the runs alternate between them (the same background load for
each), and each gets its own count. ``--nproc`` sets the ranks (default 2).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
JOB = [
    "-m",
    "torch.distributed.run",
    "--standalone",
    "-m",
    "snr_dist.cli",
    "train",
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--no-progress",
    "--set",
    "train.epochs=1",
    "--set",
    "train.seeds=[0]",
    "--set",
    "model.hidden=[32]",
]
ABORT = re.compile(r"terminate called|SIGABRT|Signal 6|exitcode\s*:\s*-6")


def one_run(env: dict[str, str], out: Path, nproc: int) -> tuple[int, bool, str]:
    """The job's exit code, whether a rank aborted, and the output's tail."""
    cmd = [sys.executable, *JOB[:3], f"--nproc_per_node={nproc}", *JOB[3:]]
    cmd += ["--output-dir", str(out)]
    out.mkdir(parents=True)
    # run outside any checkout: ``python -m`` puts the working directory first on sys.path
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    return proc.returncode, bool(ABORT.search(text)), text[-2000:]


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[int, int]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per checkout")
    ap.add_argument(
        "--pythonpath", action="append", help="a checkout whose snr_dist runs (default: this one)"
    )
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--no-busy", action="store_true", help="leave the cores idle")
    args = ap.parse_args(argv)
    envs = {}
    for path in [str(Path(p).resolve()) for p in args.pythonpath or [ROOT]]:
        env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
        probe = [sys.executable, "-c", "import snr_dist; print(snr_dist.__file__)"]
        where = subprocess.run(
            probe, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True, check=True
        )
        print(f"{path}: snr_dist from {where.stdout.strip()}", flush=True)
        envs[path] = env
    busy = None
    if not args.no_busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    counts = {path: [0, 0] for path in envs}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.runs):
                for path, env in envs.items():
                    code, abort, tail = one_run(
                        env, Path(tmp) / str(len(list(Path(tmp).iterdir()))), args.nproc
                    )
                    counts[path][0] += code != 0
                    counts[path][1] += abort
                    if code != 0 and not abort:  # another failure: show it
                        print(tail, flush=True)
                    print(
                        f"{path} run {i + 1}: exit {code}{' (abort)' if abort else ''}", flush=True
                    )
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    for path, (failed, aborted) in counts.items():
        print(f"{path}: {failed} of {args.runs} jobs failed, {aborted} with a rank aborted at exit")
    return {path: (f, a) for path, (f, a) in counts.items()}


if __name__ == "__main__":
    main()
