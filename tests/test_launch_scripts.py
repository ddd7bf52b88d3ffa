"""The launch scripts as their schedulers run them, with stand-ins for what this machine lacks
(SLURM's srun and scontrol, a GPU interpreter): they must find their files and report
failure."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_script_runs_from_slurmds_spool_copy(tmp_path):
    """sbatch runs a copy of the script from slurmd's spool directory: it must still find
    multinode.sh (it looked next to $0), and take the GPU count out of a typed
    --gpus-per-node ("a100:8")."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(
        bin_dir / "srun", '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    _executable(bin_dir / "scontrol", "#!/bin/bash\necho node-a\n")
    spool = tmp_path / "spool" / "job42"
    spool.mkdir(parents=True)
    shutil.copy(ROOT / "launch" / "slurm.sbatch", spool / "slurm_script")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": "echo",  # multinode.sh then prints the torchrun command instead of running it
        "SLURM_NNODES": "2",
        "SLURM_GPUS_PER_NODE": "a100:8",
        "SLURM_JOB_NODELIST": "node-[a,b]",
        "SLURM_JOB_ID": "42",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
    run = subprocess.run(
        ["bash", str(spool / "slurm_script"), "--config", "configs/quickstart.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "-m torch.distributed.run" in run.stdout
    assert "--nproc_per_node=8" in run.stdout or "--nproc_per_node 8" in run.stdout, run.stdout
    assert "node-a" in run.stdout and "--config configs/quickstart.yaml" in run.stdout


def test_gpu_checks_fail_when_the_checks_fail(tmp_path):
    """Each check is piped through tee: without pipefail the script exited 0 whatever failed."""
    fake = tmp_path / "python"
    _executable(
        fake,
        '#!/bin/bash\ncase "$*" in *"import snr_dist.triton_kernels"*) exit 0;; esac\n'
        'echo "step failed: $*" >&2; exit 1\n',
    )
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out")}
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "gpu_checks.sh")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0, run.stdout + run.stderr
    assert "step failed" in run.stdout + run.stderr


def test_megatron_launcher_names_bad_parallel_sizes():
    """TP=0 used to launch with --tp 0 after a bash division-by-zero message, TP=abc and
    NPROC_PER_NODE=gpu (a torchrun value) died as "unbound variable"."""
    cases = {
        ("0", "2"): "TP=0: allowed: an int >= 1",
        ("-1", "2"): "TP=-1: allowed: an int >= 1",
        ("abc", "2"): "TP=abc: allowed: an int >= 1",
        ("2", "3"): "NPROC_PER_NODE=3 is not a multiple of TP=2",
        ("1", "x"): "NPROC_PER_NODE=x: allowed: an int >= 1, gpu or auto",
    }
    for (tp, nproc), message in cases.items():
        env = {**os.environ, "TP": tp, "NPROC_PER_NODE": nproc, "PYTHON": "echo"}
        run = subprocess.run(
            ["bash", str(ROOT / "launch" / "megatron_gpt.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert run.returncode == 2 and message in run.stderr, (tp, nproc, run.stderr)
    env = {**os.environ, "TP": "1", "NPROC_PER_NODE": "gpu", "PYTHON": "echo"}
    run = subprocess.run(
        ["bash", str(ROOT / "launch" / "megatron_gpt.sh"), "--steps", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert run.returncode == 0 and "--nproc_per_node=gpu" in run.stdout
