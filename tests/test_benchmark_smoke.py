"""Smoke test of benchmarks/step_overhead.py: it runs and reports well-formed results.

Only the structure is checked; speed claims belong to the benchmark itself, not to unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_overhead.py"


def _load(name: str):
    """A script of benchmarks/ as a module."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("step_overhead")


def test_benchmark_tiny_config(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--layers", "1", "--d-model", "32", "--heads", "2", "--seq", "16", "--batch", "2"]
    argv += ["--vocab", "64", "--steps", "3", "--warmup", "1", "--json", str(out)]
    # One thread: tiny ops on several OpenMP threads crawl when another process shares the CPUs.
    argv += ["--threads", "1"]
    threads = torch.get_num_threads()
    try:
        res = bench.main(argv)
    finally:
        torch.set_num_threads(threads)

    names = [r["name"] for r in res["rows"]]
    # Every optimizer has a row, except optional ones that could not be built (with a reason).
    assert set(res["skipped"]) <= set(bench.OPTIONAL)
    assert all(res["skipped"].values())
    expected = [n for n in bench.optimizer_factories() if n not in res["skipped"]]
    assert names == expected
    assert names[:3] == [bench.BASELINE, *bench.TARGETS]
    rows = {r["name"]: r for r in res["rows"]}
    for r in rows.values():
        for key in ("median_step_ms", "median_opt_step_ms", "mean_step_ms"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        for key in ("ratio_vs_adamw", "robust_ratio", "state_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert len(r["step_ms"]) == len(r["opt_step_ms"]) == 3
        assert r["median_opt_step_ms"] <= r["median_step_ms"]

    base = rows[bench.BASELINE]
    assert base["ratio_vs_adamw"] == base["robust_ratio"] == base["state_ratio"] == 1.0
    assert base["state_bytes"] > 0
    assert rows["SNRAdamW diagonal"]["state_bytes"] > base["state_bytes"]
    if "SNRPreconditioner(AdamW)" in rows:
        assert rows["SNRPreconditioner(AdamW)"]["state_bytes"] > base["state_bytes"]

    assert set(res["targets"]) == set(bench.TARGETS)
    assert all(isinstance(t["met"], bool) for t in res["targets"].values())
    assert res["env"]["params"] > 0

    printed = capsys.readouterr().out
    assert "| optimizer |" in printed and "Targets" in printed
    for name in names:
        assert f"| {name} |" in printed
    for name in res["skipped"]:
        assert f"Skipped {name}" in printed
    assert json.loads(out.read_text())["rows"][0]["name"] == bench.BASELINE


def test_benchmark_runs_the_stock_block_lm_and_the_mlp(bench):
    """``--model all``: the GPT, the stock nn.TransformerEncoderLayer LM (LayerNorms and
    biases: many small tensors) and the digits MLP, each against AdamW in its own rounds."""
    argv = ["--model", "all", "--layers", "1", "--d-model", "32", "--heads", "2", "--seq", "16"]
    argv += ["--vocab", "64", "--steps", "2", "--warmup", "1", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        res = bench.main([*argv, "--no-preconditioner"])
    finally:
        torch.set_num_threads(threads)
    assert list(res["models"]) == ["gpt", "stock", "mlp"]
    stock = res["models"]["stock"]
    assert (
        stock["config"]["batch"] == 8
        and "TransformerEncoderLayer" in stock["config"]["description"]
    )
    model, _, _ = bench.build_model(bench.parse_args(argv), "stock")
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"TransformerEncoderLayer", "LayerNorm"} <= kinds
    assert sum(p.dim() == 1 for p in model.parameters()) > 10  # biases and norm scales
    mlp = res["models"]["mlp"]
    assert mlp["env"]["params"] == 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    for r in (stock, mlp):
        ratios = {row["name"]: row["robust_ratio"] for row in r["rows"]}
        assert ratios[bench.BASELINE] == 1.0 and all(math.isfinite(v) for v in ratios.values())
        state = {row["name"]: row["state_ratio"] for row in r["rows"]}
        assert state[bench.BF16_STATE] == 1.0 < state["SNRAdamW diagonal"]  # AdamW's bytes


def test_comm_benchmark_measures_what_the_design_says():
    """Two real ranks: diagonal and subspace temporal add no per-step bytes (every rank keeps
    complete statistics of the same reduced gradient; refreshes broadcast bases); cross-sample
    stays O(r) per matrix, in one all-reduce per step."""
    sys.path.insert(0, str(SCRIPT.parent))  # importable by name: spawned ranks pickle _worker
    try:
        import comm_bytes as comm

        res = comm.main(
            [
                "--layers",
                "1",
                "--d-model",
                "32",
                "--heads",
                "2",
                "--seq",
                "8",
                "--vocab",
                "40",
                "--batch",
                "2",
                "--rank",
                "4",
                "--steps",
                "3",
                "--zero-stages",  # one stage keeps the smoke test short (each is 2 engines)
                "2",
            ]
        )
    finally:
        sys.path.remove(str(SCRIPT.parent))
    rows = res["rows"]
    diag, temporal, cross = (rows[k] for k in list(rows)[:3])
    assert diag["allreduce_bytes_per_step"] == 0
    n = temporal["trackers"]
    assert n == 7  # 2 embeddings, 4 block matrices, the head
    assert temporal["allreduce_bytes_per_step"] == 0
    assert temporal["broadcast_bytes_per_refresh"] > 0
    # count, weight, total energy and r = 4 direction energies per matrix, plus the 1-D
    # parameters' diagonal sums (2 + numel each)
    assert cross["allreduce_bytes_per_step"] >= n * (3 + 4) * 4
    assert cross["allreduce_calls_per_step"] == 1
    assert temporal["ddp_bytes_per_step"] > 0
    assert set(res["balance"]) == {2, 4, 8}
    # DeepSpeed ZeRO-2 (when installed): row shards all-reduce the 2r + 2 statistics of
    # every tracked matrix each step, and reduce partial sketches to owners at refreshes
    zero = {k: v for k, v in rows.items() if k.startswith("ZeRO")}
    if zero:
        assert len(zero) == 2
        for r in zero.values():
            assert r["trackers"] == n
            assert r["allreduce_bytes_per_step"] >= n * (2 * 4 + 2) * 4
            assert r["broadcast_bytes_per_refresh"] > 0


def test_step_floor_benchmark_reports_every_ratio(tmp_path):
    """benchmarks/step_floor.py (issue 16's yardstick) runs on the MLP and reports, per
    optimizer, step / AdamW step, step / bytes-moved floor and the full-step ratio."""
    module = _load("step_floor")
    out = tmp_path / "floor.json"
    (res,) = module.main(
        [
            "--only",
            "mlp",
            "--rounds",
            "3",
            "--full-rounds",
            "2",
            "--warmup",
            "1",
            "--refresh-every",
            "4",
            "--json",
            str(out),
        ]
    )
    assert set(res["rows"]) == set(module.PASSES)
    refresh = res["refresh"]
    assert refresh["refresh_steps"] == 3  # steps 2, 4 and 8 of 2..8
    assert refresh["refresh_extra_ms"] >= 0 and math.isfinite(refresh["amortised_vs_plain_step"])
    assert res["rows"]["AdamW (foreach)"]["step_vs_adamw"] == 1.0
    for r in res["rows"].values():
        for key in (
            "step_ms",
            "step_vs_floor",
            "full_vs_adamw",
            "floor_ms",
            "in_training_step_ms",
            "in_training_vs_adamw",
        ):
            assert math.isfinite(r[key]) and r[key] > 0
        assert r["step_faults"] >= 0
    assert res["bandwidth_gb_s"] > 0
    assert math.isfinite(res["rows"][module.COMPILED]["compile_s"])
    # the subspace flops floor: 8 r flops per element of each tracked matrix view (64 x 256
    # and 256 x 256 at r=32, 10 x 256 at r=10) against the MLP's forward + backward matmuls
    # (batch 128; the first layer's input needs no gradient)
    sub = res["rows"][module.SUBSPACE]
    products = 8 * 32 * (64 * 256 + 256 * 256) + 8 * 10 * 10 * 256
    train = 2 * 128 * (64 * 256 + 256 * 256 + 256 * 10) * 3 - 2 * 128 * 64 * 256
    assert sub["products_flops_share"] == pytest.approx(products / train)
    assert sub["products_ms"] > 0 and sub["full_vs_adamw_floor"] > 1.0
    assert json.loads(out.read_text())["results"][0]["model"] == res["model"]


def test_subspace_batching_benchmark_compares_the_same_work():
    """benchmarks/subspace_batching.py: per-matrix products against one bmm per shape group,
    on the optimizer's own trackers; both variants compute the same sketches and updates."""
    module = _load("subspace_batching")
    gpt, mlp = module.main(["--rounds", "2", "--warmup", "0"])
    # GPT 4L: token and position embeddings, and per layer qkv, proj, fc1, fc2 (fc1 and fc2
    # share a view shape with their basis on different sides: two groups), plus the head
    assert (gpt["matrices"], gpt["shape_groups"]) == (19, 5)
    assert (mlp["matrices"], mlp["shape_groups"], mlp["largest_group"]) == (3, 3, 1)
    for r in (gpt, mlp):
        assert r["max_rel_difference"] < 1e-5
        assert r["per_matrix_ms"] > 0 and r["bmm_ms"] > 0 and r["bmm_vs_per_matrix"] > 0


def test_step_vs_revision_pairs_two_packages_and_checks_bit_identity():
    """benchmarks/step_vs_revision.py: this tree against HEAD's package (the same code when the
    tree is clean; either way the check and the ratio are well-formed)."""
    module = _load("step_vs_revision")
    res = module.main(["--rev", "HEAD", "--rounds", "6", "--warmup", "1", "--check-steps", "3"])
    assert isinstance(res["bit_identical"], bool)
    assert res["old_us"] > 0 and res["new_us"] > 0 and res["new_vs_old"] > 0


def test_step_vs_revision_gpt_mode_trains_three_optimizers_in_lockstep():
    """``--gpt``: the 14.7M GPT (tensors larger than a chunk) with torch's AdamW beside the two
    packages (the bit-identity check and the ratios well-formed)."""
    module = _load("step_vs_revision")
    res = module.main(["--rev", "HEAD", "--mode", "diagonal", "--gpt", "5"])
    assert isinstance(res["bit_identical"], bool)
    for key in ("old_us", "new_us", "adamw_us", "new_vs_adamw", "new_full_vs_adamw"):
        assert res[key] > 0


def test_denormal_benchmark_runs_all_six_in_lockstep():
    """benchmarks/denormal_step.py: AdamW, SNR diagonal and subspace, each with and without
    flushing, the flushed run checked against its twin."""
    module = _load("denormal_step")
    rows = module.main(["--steps", "6", "--batch", "32"])
    assert [(r["optimizer"], r["flushed"]) for r in rows] == [
        (name, flush)
        for name in ("AdamW", "SNRAdamW diagonal", "SNRAdamW subspace r=32")
        for flush in (False, True)
    ]
    assert rows[0]["vs_adamw"] == 1.0
    for r in rows:
        assert 0.0 <= r["subnormal_share"] <= 1.0 and r["train_s"] > 0 and r["step_ms"] > 0
        assert r["same_parameters"] is (True if r["flushed"] else None)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="the floor needs MKL's sqrt")
def test_moment_sqrt_benchmark_times_every_pattern_and_reports_the_choice():
    """benchmarks/moment_sqrt.py: plain and raised sqrt per zero pattern, and whether
    MomentSqrt takes the floor (no for no zeros and 1%, yes from 12%)."""
    rows = _load("moment_sqrt").main(["--rounds", "3", "--sizes", "4096"])
    assert [r["zeros"] for r in rows] == [
        "no zeros",
        "1% scattered",
        "12% scattered",
        "12% whole rows",
        "all zero",
    ]
    assert [r["floor_taken"] for r in rows] == [False, False, True, True, True]
    assert all(r["plain_us"] > 0 and r["raised_us"] > 0 and r["ratio"] > 0 for r in rows)


def test_step_vs_revision_times_a_real_training_run():
    """benchmarks/step_vs_revision.py --train: both packages train digits in lockstep, the
    steps of the last half timed (against HEAD's package: the same code when the tree is
    clean)."""
    res = _load("step_vs_revision").main(["--rev", "HEAD", "--mode", "diagonal", "--train", "4"])
    assert isinstance(res["bit_identical"], bool)
    assert res["old_us"] > 0 and res["new_us"] > 0


def test_gloo_exit_benchmark_counts_aborts_both_ways():
    """benchmarks/gloo_exit.py (run as a script: its ranks are spawned and import it): ranks
    that destroy their process group never abort at exit (the fix the docs give for the
    SIGABRT at the end of finished jobs)."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "gloo_exit.py"), "--runs", "2", "--world", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = re.findall(r"process group (.+?): (\d) of 2 runs had a rank abort", proc.stdout)
    assert [how for how, _ in counts] == ["left to interpreter exit", "destroyed at the end"]
    assert counts[1][1] == "0", proc.stdout
