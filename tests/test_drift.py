"""The temporal estimator under drift: synthetic gradients with a known SNR (issue 13).

Each test feeds SNRAdamW (the real optimizer, lr 0 so nothing but the statistics moves) a
per-coordinate gradient ``g_t = mu_t + sigma_t z_t`` for thousands of coordinates at once and
reads its gates. With the default rule (``noise="innovation"``) a noiseless gradient that shrinks
or grows keeps its gate near 1, and a drifting gradient with known per-step noise gets the
Wiener gate of its true SNR. On b673a1b (the second-moment rule, then the only one) a gradient
decaying as exp(-t/100) had a gate of 0.047 at step 400.
"""

from __future__ import annotations

import math

import pytest
import torch

from snr_dist import SNRAdamW

N = 4000  # coordinates: the mean gate over them is the expected gate to about +-0.01


def _gates(f, snr=None, steps=1000, at=(200, 400, 800), mode="diagonal", **kw) -> dict:
    """Mean gate at the steps ``at`` (and its mean over 300..steps) for ``mu_t = f(t)`` and
    ``sigma_t = mu_t / sqrt(snr)`` (noiseless with ``snr=None``)."""
    gen = torch.Generator().manual_seed(0)
    shape = (N,) if mode == "diagonal" else (40, N // 40)
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = SNRAdamW([p], lr=0.0, weight_decay=0.0, mode=mode, rank=4, **kw)
    out, tail = {}, []
    for t in range(1, steps + 1):
        mu = f(t)
        if mode == "subspace":  # a rank-1 pattern: the tracker's top direction
            p.grad = mu * _PATTERN
        else:
            z = torch.zeros(shape) if snr is None else torch.randn(shape, generator=gen)
            p.grad = mu + (0.0 if snr is None else mu / math.sqrt(snr)) * z
        opt.step()
        if t in at or t >= 300:
            gates = opt.estimator_of(p).gates(p, opt.state[p], opt.param_groups[0], t)
            g = float(gates.mean() if mode == "diagonal" else gates[0])  # top direction
            if t in at:
                out[t] = g
            if t >= 300:
                tail.append(g)
    out["tail"] = sum(tail) / len(tail)
    return out


_PATTERN = torch.outer(torch.linspace(-1, 1, 40), torch.linspace(1, 2, N // 40))

NOISELESS = {
    "decay exp(-t/100)": lambda t: math.exp(-t / 100),
    "decay exp(-t/300)": lambda t: math.exp(-t / 300),
    "growth exp(t/300)": lambda t: math.exp(t / 300),
    "growth 1 + t/100": lambda t: 1.0 + t / 100,
}


@pytest.mark.parametrize("name", list(NOISELESS))
@pytest.mark.parametrize("mode", ["diagonal", "subspace"])
def test_noiseless_drifting_gradient_keeps_its_gate_open(name, mode):
    got = _gates(NOISELESS[name], mode=mode)
    assert min(got[t] for t in (200, 400, 800)) >= 0.9, got


DRIFTS = {
    "decay exp(-t/300)": lambda t: math.exp(-t / 300),
    "ramp 1 + t/200": lambda t: 1.0 + t / 200,
    "slow wave": lambda t: 2.0 + math.sin(2 * math.pi * t / 1000),
}


@pytest.mark.parametrize("snr", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("name", list(DRIFTS))
def test_drifting_gradient_with_known_noise_gets_the_wiener_gate_of_its_snr(name, snr):
    got = _gates(DRIFTS[name], snr=snr)
    assert abs(got["tail"] - snr / (snr + 1.0)) <= 0.1, (got, snr / (snr + 1.0))


@pytest.mark.parametrize("snr", [0.1, 0.3, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("noise", ["innovation", "second_moment"])
def test_stationary_gradient_gets_the_wiener_gate_of_its_snr(noise, snr):
    """The closed-form case both rules get right."""
    got = _gates(lambda t: 1.0, snr=snr, noise=noise)
    assert abs(got["tail"] - snr / (snr + 1.0)) <= 0.1, got


def test_tau_scales_the_threshold_under_drift():
    got = _gates(DRIFTS["decay exp(-t/300)"], snr=1.0, tau=3.0)
    assert abs(got["tail"] - 1.0 / (1.0 + 3.0)) <= 0.1, got


def test_the_second_moment_rule_reads_drift_as_noise():
    """The 0.1 rule, kept by name: its gate closes on a noiseless shrinking gradient (the
    defect, documented), which is why it is no longer the default."""
    got = _gates(NOISELESS["decay exp(-t/100)"], noise="second_moment")
    assert got[400] < 0.1 and got[800] < 0.01, got


def test_at_most_one_state_tensor_beyond_adamw_in_diagonal_mode():
    p = torch.nn.Parameter(torch.zeros(8))
    opt = SNRAdamW([p])
    p.grad = torch.ones(8)
    opt.step()
    big = [k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.numel() == 8]
    assert sorted(big) == ["exp_avg", "exp_avg_sq", "noise_avg"]
