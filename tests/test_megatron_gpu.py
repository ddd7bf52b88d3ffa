"""Megatron-core on a GPU: a tiny GPT trained for 20 steps with SNRAdamW and with Megatron's
Adam (losses finite and decreasing), and a real dist_checkpointing save/load of SNR state.

Skipped without CUDA: megatron-core 0.16's GPT forward, DDP grad buffers, optimizer step and
checkpoint writer all need it (tests/test_megatron.py covers what runs on CPU). One process
(TP=1, DP=1); TP=2 x DP=2 needs 4 GPUs and `launch/megatron_gpt.sh`.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA: megatron-core's GPT forward, DDP and optimizer step are CUDA-only",
)


def _run(optimizer: str, snr: dict | None, save_dir=None) -> dict:
    from snr_dist.experiments.megatron_gpt import load_config, train

    cfg = load_config(None)  # the script's small defaults: 2 layers, hidden 64, 20 steps
    cfg["optimizer"] = optimizer
    cfg["snr"] = snr or {}
    return train(cfg, tp=1, save_dir=save_dir)


def _decreasing(losses: list[float]) -> bool:
    return sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize(
    "optimizer,snr",
    [
        ("adam", None),
        ("snr", {}),
        ("snr", {"mode": "subspace", "rank": 8, "refresh_every": 5}),
    ],
    ids=["adam", "snr-diagonal", "snr-subspace"],
)
def test_tiny_gpt_20_steps_finite_and_decreasing(optimizer, snr, tmp_path):
    out = _run(optimizer, snr, save_dir=str(tmp_path / "ckpt") if optimizer == "snr" else None)
    losses = out["losses"]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses), losses
    assert _decreasing(losses), losses
    if optimizer == "snr":
        assert out["checkpoint_round_trip"]
