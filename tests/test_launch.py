"""`snr-dist train` under torchrun, through the launch scripts: one node x 2 processes equals
one process, two nodes x 1 process equal one node x 2, and a killed rank resumes from its
checkpoint under --max-restarts to the same parameters as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed_utils import free_port

from snr_dist.cli import main
from snr_dist.experiments.models import mlp

ROOT = Path(__file__).resolve().parent.parent
ARGS = [
    "--config",
    str(ROOT / "configs" / "quickstart.yaml"),
    "--no-progress",
    "--set",
    "train.epochs=4",
    "--set",
    "train.seeds=[0]",
    "--set",
    "model.hidden=[32]",
    "--set",
    "train.eval_every=1",
    "--set",
    "train.checkpoint_every=1",
]


def _env(**extra) -> dict:
    # PYTHONFAULTHANDLER: a rank that aborts (SIGABRT from a C++ std::terminate, seen at the end
    # of finished jobs in fresh-clone CI runs) prints where its Python threads were
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _fault_dumps(out: str) -> str:
    """The faulthandler dumps in a job's output, without their long "Extension modules" lines
    (which pushed the stacks out of a tail of the output)."""
    dumps = []
    for part in out.split("Fatal Python error")[1:]:
        stack = part.split("\nExtension modules:")[0]
        dumps.append("Fatal Python error" + stack[:3000])
    return "\n".join(dumps)


def _failure(returncode: int, out: str, tail: int = 4000) -> str:
    """A failed job's exit code, the tail of its output and its faulthandler dumps."""
    faults = _fault_dumps(out)
    return f"exit code {returncode}\n{out[-tail:]}" + (f"\n\n{faults}" if faults else "")


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str) -> None:
    if proc.returncode != 0:
        pytest.fail(_failure(proc.returncode, out), pytrace=False)


def _torchrun(out_dir: Path, timeout=240, **env) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), *ARGS, "--output-dir", str(out_dir)],
        env=_env(NPROC_PER_NODE=2, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    _check(proc, proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def _final_params(run_dir: Path, optimizer: str) -> dict[str, torch.Tensor]:
    model = mlp(64, [32], 10)
    sd = {"model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()}}
    dcp.load(sd, checkpoint_id=str(run_dir / "checkpoints" / f"{optimizer}-seed0"))
    return sd["model"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_node_two_procs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    log = _torchrun(out)
    assert "on 2 ranks (ddp)" in log
    return out / "quickstart"


def test_one_node_two_processes_equal_one_process(one_node_two_procs, tmp_path):
    assert main(["train", *ARGS, "--output-dir", str(tmp_path)]) == 0
    single = tmp_path / "quickstart"
    for opt in ("AdamW", "SNRAdamW"):
        a, b = _final_params(single, opt), _final_params(one_node_two_procs, opt)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    assert len(_records(one_node_two_procs)) == 2 * 4
    assert "| SNRAdamW |" in (one_node_two_procs / "report.md").read_text()


def test_two_nodes_equal_one_node_with_two_processes(one_node_two_procs, tmp_path):
    env = _env(
        NNODES=2,
        NPROC_PER_NODE=1,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=free_port(),
        RDZV_ID="snr-dist-test",
    )
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), *ARGS, "--output-dir", str(tmp_path)]
    agents = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [agent.communicate(timeout=240)[0] for agent in agents]
    if any(agent.returncode != 0 for agent in agents):  # both logs: one agent's failure
        # (a worker's, or its store going away) often shows up as the other's error
        pytest.fail(
            "\n".join(
                f"agent {i}: {_failure(a.returncode, out, 3000)}"
                for i, (a, out) in enumerate(zip(agents, outs))
            ),
            pytrace=False,
        )
    two_nodes = tmp_path / "quickstart"
    for opt in ("AdamW", "SNRAdamW"):
        a, b = _final_params(two_nodes, opt), _final_params(one_node_two_procs, opt)
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert [r["test_acc"] for r in _records(two_nodes)] == [
        r["test_acc"] for r in _records(one_node_two_procs)
    ]


def test_killed_rank_resumes_from_checkpoint_to_the_same_parameters(one_node_two_procs, tmp_path):
    log = _torchrun(tmp_path, MAX_RESTARTS=1, SNR_DIST_FAIL_AT_EPOCH=3, SNR_DIST_FAIL_RANK=1)
    assert "exitcode  : 17" in log or "exitcode: 17" in log.replace("  ", " ")  # it did fail
    resumed = tmp_path / "quickstart"
    for opt in ("AdamW", "SNRAdamW"):
        a, b = _final_params(resumed, opt), _final_params(one_node_two_procs, opt)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    epochs = [(r["optimizer"], r["epoch"]) for r in _records(resumed)]
    assert epochs == [(o, e) for o in ("AdamW", "SNRAdamW") for e in (1, 2, 3, 4)]


def _deepspeed(out_dir: Path, stage: int, *extra: str, config: str | None = None, **env) -> str:
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "launch" / "torchrun.sh"),
            *ARGS,
            *extra,
            "--deepspeed",
            str(ROOT / "configs" / "deepspeed" / (config or f"zero{stage}.json")),
            "--output-dir",
            str(out_dir),
        ],
        env=_env(NPROC_PER_NODE=2, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    _check(proc, proc.stdout + proc.stderr)
    assert f"through DeepSpeed ZeRO-{stage}" in proc.stdout
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def deepspeed_zero2(tmp_path_factory) -> Path:
    """An uninterrupted ZeRO-2 job that checkpoints every epoch (DeepSpeed's own format)."""
    out = tmp_path_factory.mktemp("zero2")
    _deepspeed(out, 2)
    return out / "quickstart"


def _same_records(a: list[dict], b: list[dict], rel: float) -> None:
    assert [(r["optimizer"], r["epoch"]) for r in a] == [(r["optimizer"], r["epoch"]) for r in b]
    for x, y in zip(a, b):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=rel), (x, y)
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=rel), (x, y)


def test_deepspeed_main_job_matches_the_ddp_job(one_node_two_procs, deepspeed_zero2):
    """The ZeRO-2 checkpointing job (the same maths, files on the side) ends where the DDP job
    does. ZeRO-3 through the CLI is run by the zero3_subspace test below; its maths against
    DDP per stage by tests/test_deepspeed.py, in-process."""
    _same_records(_records(deepspeed_zero2), _records(one_node_two_procs), rel=1e-4)


def test_deepspeed_killed_rank_resumes_from_its_checkpoint(deepspeed_zero2, tmp_path):
    """`--deepspeed` with `train.checkpoint_every` (refused before 0.2): a rank killed at the
    start of epoch 3 restarts, every run resumes from DeepSpeed's checkpoint (model, ZeRO
    optimizer shards with the SNR state, batch order) and ends where the uninterrupted job
    did."""
    log = _deepspeed(tmp_path, 2, MAX_RESTARTS=1, SNR_DIST_FAIL_AT_EPOCH=3, SNR_DIST_FAIL_RANK=1)
    assert "exitcode  : 17" in log or "exitcode: 17" in log.replace("  ", " ")  # it did fail
    resumed = tmp_path / "quickstart"
    epochs = [(r["optimizer"], r["epoch"]) for r in _records(resumed)]
    assert epochs == [(o, e) for o in ("AdamW", "SNRAdamW") for e in (1, 2, 3, 4)]
    _same_records(_records(resumed), _records(deepspeed_zero2), rel=1e-6)
    for run in ("AdamW-seed0", "SNRAdamW-seed0"):  # one checkpoint kept: the last
        folder = resumed / "checkpoints" / run
        assert (folder / "latest").read_text().strip() == "epoch4"
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["epoch4"]


def test_zero3_subspace_json_trains_and_resumes_from_a_killed_rank(tmp_path):
    """`snr-dist train --deepspeed configs/deepspeed/zero3_subspace.json` under torchrun: its
    `snr_preconditioner` block turns the experiment's SNRAdamW into subspace trackers on ZeRO-3
    row shards; a rank killed at the start of epoch 3 resumes from DeepSpeed's checkpoint
    (row-shard state in each rank's optimizer file) and ends where an uninterrupted job does."""
    cfg = "zero3_subspace.json"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    log = _deepspeed(whole, 3, config=cfg)
    assert "mode=subspace" in log  # the JSON's block reached the experiment's SNRAdamW
    log = _deepspeed(
        killed, 3, config=cfg, MAX_RESTARTS=1, SNR_DIST_FAIL_AT_EPOCH=3, SNR_DIST_FAIL_RANK=1
    )
    assert "exitcode  : 17" in log or "exitcode: 17" in log.replace("  ", " ")
    a, b = _records(killed / "quickstart"), _records(whole / "quickstart")
    _same_records(a, b, rel=1e-6)
    snr = [r for r in b if r["optimizer"] == "SNRAdamW"]
    assert snr[-1]["train_loss"] < snr[0]["train_loss"]
