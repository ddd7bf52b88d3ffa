"""`snr-dist train` under torchrun, through the launch scripts: one node x 2 processes equals
one process, two nodes x 1 process equal one node x 2, and a killed rank resumes from its
checkpoint under --max-restarts to the same parameters as an uninterrupted run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def zero3_subspace(tmp_path_factory) -> Path:
    """An uninterrupted 2-rank job through configs/deepspeed/zero3_subspace.json."""
    out = tmp_path_factory.mktemp("zero3_subspace")
    log = _deepspeed(out, 3, config="zero3_subspace.json")
    assert "mode=subspace" in log  # the JSON's block reached the experiment's SNRAdamW
    return out / "quickstart"


def test_zero3_subspace_json_trains_and_resumes_from_a_killed_rank(zero3_subspace, tmp_path):
    """`snr-dist train --deepspeed configs/deepspeed/zero3_subspace.json` under torchrun: its
    `snr_preconditioner` block turns the experiment's SNRAdamW into subspace trackers on ZeRO-3
    row shards; a rank killed at the start of epoch 3 resumes from DeepSpeed's checkpoint
    (row-shard state in each rank's optimizer file) and ends where an uninterrupted job does."""
    killed = tmp_path / "killed"
    log = _deepspeed(
        killed,
        3,
        config="zero3_subspace.json",
        MAX_RESTARTS=1,
        SNR_DIST_FAIL_AT_EPOCH=3,
        SNR_DIST_FAIL_RANK=1,
    )
    assert "exitcode  : 17" in log or "exitcode: 17" in log.replace("  ", " ")
    a, b = _records(killed / "quickstart"), _records(zero3_subspace)
    _same_records(a, b, rel=1e-6)
    snr = [r for r in b if r["optimizer"] == "SNRAdamW"]
    assert snr[-1]["train_loss"] < snr[0]["train_loss"]


def _wait_for(what, done, timeout: float, agents) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline or any(a.poll() not in (None, -9) for a in agents):
            pytest.fail(f"waited for {what}: {_agent_logs(agents)}", pytrace=False)
        time.sleep(0.5)


def _agent_logs(agents) -> str:
    return "\n".join(
        f"agent {i} (exit {a.poll()}): {_failure(a.poll() or 0, a.log.read_text(), 3000)}"
        for i, a in enumerate(agents)
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.long  # ~5 minutes: `make test-long`, not `make test`
def test_a_lost_node_shrinks_the_job_and_a_new_node_grows_it(zero3_subspace, tmp_path):
    """Elastic torchrun (launch/multinode.sh, NNODES=1:2, one process per agent) through the
    ZeRO-3 subspace config, SNRAdamW's run first: at the start of its epoch 2 one node is lost
    (its worker kills its torchrun agent and itself); the other agent restarts alone, resumes
    the epoch-1 checkpoint resharded from 2 ranks to 1 (the row-shard state of the trackers,
    the fp32 weights), trains epoch 2 and holds at epoch 3 until a new agent joins; the two
    resume epoch 2's checkpoint resharded from 1 rank to 2 and finish. Every record equals the
    uninterrupted 2-rank job's within 1e-6 (the global batch stays 128)."""
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    import yaml

    raw = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    raw["optimizers"] = raw["optimizers"][::-1]  # SNRAdamW first: the hooks act on the first
    config = tmp_path / "quickstart.yaml"
    config.write_text(yaml.safe_dump(raw))
    port = free_port()
    env = _env(
        NNODES="1:2",
        NPROC_PER_NODE=1,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        RDZV_ID="snr-dist-elastic",
        MAX_RESTARTS=1,
        SNR_DIST_HOLD_AT_EPOCH=3,
        SNR_DIST_HOLD_BELOW_WORLD=2,
    )
    deepspeed = str(ROOT / "configs" / "deepspeed" / "zero3_subspace.json")
    cmd = ["bash", str(ROOT / "launch" / "multinode.sh"), "--config", str(config), *ARGS[2:]]
    cmd += ["--deepspeed", deepspeed, "--output-dir", str(tmp_path / "out")]
    agents = []

    def start(name: str, **extra) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as f:
            agent = subprocess.Popen(
                cmd,
                env={**env, **{k: str(v) for k, v in extra.items()}},
                stdout=f,
                stderr=subprocess.STDOUT,
                text=True,
            )
        agent.log = log
        agents.append(agent)
        return agent

    try:
        first = start("first")  # hosts the rendezvous: it must outlive the lost node
        _wait_for("the rendezvous", lambda: _listening(port), 120, agents)
        lost = start("lost", SNR_DIST_FAIL_AT_EPOCH=2, SNR_DIST_FAIL_NODE=1)
        _wait_for(
            "the job to shrink to one rank and hold",
            lambda: "holding at epoch 3 on 1 rank" in first.log.read_text(),
            420,
            agents,
        )
        joined = start("joined")
        for agent in (first, joined):
            agent.wait(timeout=420)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    if first.returncode != 0 or joined.returncode != 0:
        pytest.fail(_agent_logs(agents), pytrace=False)
    assert lost.returncode == -9  # the node's agent was killed (by its worker)
    log = first.log.read_text()
    assert "resumed after epoch 1" in log and "resumed after epoch 2" in log
    out = tmp_path / "out" / "quickstart"
    key = lambda r: (r["optimizer"], r["epoch"])  # noqa: E731
    _same_records(sorted(_records(out), key=key), sorted(_records(zero3_subspace), key=key), 1e-6)
