"""The estimators and gates of snr_dist.snr against closed forms and synthetic draws."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from snr_dist import SNRAdamW
from snr_dist import snr as rule
from snr_dist.cross_sample import MicrobatchStats, diagonal_moments


def test_ema_noise_factor_matches_sum_of_squared_weights():
    for beta in (0.0, 0.5, 0.9, 0.99):
        for t in (1, 2, 7, 100, 1000):
            w = torch.tensor(
                [(1 - beta) * beta ** (t - i) for i in range(1, t + 1)], dtype=torch.float64
            )
            w = w / w.sum()
            assert rule.ema_noise_factor(beta, t) == pytest.approx(float((w * w).sum()), rel=1e-9)
    assert rule.ema_noise_factor(0.9, 10**6) == pytest.approx(0.1 / 1.9)


def test_temporal_moments_unbiased_on_stationary_draws():
    """E[var] = sigma^2 and E[raw - k var] = mu^2 for i.i.d. gradients (many coordinates)."""
    torch.manual_seed(0)
    n, t, beta_s, beta_v = 20000, 30, 0.9, 0.95
    mu, sigma = 0.7, 1.3
    s = torch.zeros(n, dtype=torch.float64)
    v = torch.zeros(n, dtype=torch.float64)
    for _ in range(t):
        g = mu + sigma * torch.randn(n, dtype=torch.float64)
        s.lerp_(g, 1 - beta_s)
        v.mul_(beta_v).addcmul_(g, g, value=1 - beta_v)
    raw, var, k = rule.temporal_moments(s, v, t, beta_s, beta_v)
    sig = raw - k * var
    for est, truth in ((var, sigma**2), (sig, mu**2)):
        se = est.std().item() / math.sqrt(n)
        assert abs(est.mean().item() - truth) < 3 * se + 1e-12, (est.mean().item(), truth, se)


@pytest.mark.parametrize("sizes", [(8, 8, 8, 8), (3, 10, 5)])
def test_cross_sample_estimators_unbiased(sizes):
    """|G|^2 and tr(Sigma) from micro-batches: mean over trials within 3 standard errors."""
    torch.manual_seed(1)
    dim, trials = 6, 4000
    mu = torch.tensor([0.5, -0.2, 0.0, 1.0, 0.3, -0.8], dtype=torch.float64)
    sd = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0, 0.7], dtype=torch.float64)
    true_g2, true_tr = float(mu.square().sum()), float(sd.square().sum())
    g2_est, tr_est = [], []
    big = sum(sizes)
    for _ in range(trials):
        total = torch.zeros(dim, dtype=torch.float64)
        sum_sq = torch.zeros(dim, dtype=torch.float64)
        for b in sizes:
            samples = mu + sd * torch.randn(b, dim, dtype=torch.float64)
            d = samples.sum(0)  # sum-reduced micro-batch loss: d_i = w_i * G_i
            total += d
            sum_sq += d.square() / b
        raw, var = rule.cross_sample_moments(total, sum_sq, float(big), len(sizes))
        g2_est.append(float((raw - var).sum()))
        tr_est.append(float(var.sum()) * big)
    for est, truth in ((g2_est, true_g2), (tr_est, true_tr)):
        x = torch.tensor(est, dtype=torch.float64)
        se = x.std().item() / math.sqrt(trials)
        assert abs(x.mean().item() - truth) < 3 * se, (x.mean().item(), truth, se)


def test_microbatch_stats_equal_direct_formula_and_scale_invariant():
    torch.manual_seed(2)
    ds = [torch.randn(7, 3) for _ in range(4)]
    st = MicrobatchStats()
    running = None  # what p.grad holds before each contribution is accumulated
    for d in ds:
        st.observe(d, 1.0, running, None)
        running = d.clone() if running is None else running + d
    total = sum(ds)
    raw, var = diagonal_moments(st, total, st.unit_scale_sq(total))
    g = torch.stack(ds)  # equal weights: the applied gradient is their sum
    torch.testing.assert_close(raw, total.square())
    torch.testing.assert_close(var, 4 * g.var(0, unbiased=True))
    # p.grad rescaled (clipping / loss-scale unscaling): statistics follow p.grad's units
    raw2, var2 = diagonal_moments(st, total * 0.25, st.unit_scale_sq(total * 0.25))
    torch.testing.assert_close(raw2, raw * 0.0625)
    torch.testing.assert_close(var2, var * 0.0625)


@pytest.mark.parametrize("rule_name", ["wiener", "clamp", "hard", "paper"])
def test_gate_rules_closed_form(rule_name):
    raw = torch.tensor([0.0, 1.0, 4.0, 100.0])
    var = torch.tensor([1.0, 1.0, 1.0, 1.0])
    k, tau, a = 0.5, 2.0, 1.0
    g = rule.gate(raw, var, k, rule_name, tau, a, floor=0.0)
    sig = (raw - k * var).clamp(min=0)
    expected = {
        "wiener": sig / (sig + tau * var),
        "clamp": (sig / (tau * var)).clamp(max=1),
        "hard": (sig > tau * var).float(),
        "paper": (raw - a * var).clamp(min=0) / ((raw - a * var).clamp(min=0) + tau * var),
    }[rule_name]
    torch.testing.assert_close(g, expected)
    assert ((g >= 0) & (g <= 1)).all()


def test_gate_rejects_unknown_rule():
    with pytest.raises(ValueError, match="gate must be one of"):
        rule.gate(torch.ones(1), torch.ones(1), 0.0, "sigmoid", 1.0)


def _drive(opt, p, grad_fn, steps):
    for t in range(steps):
        p.grad = grad_fn(t)
        opt.step()


@pytest.mark.parametrize("mode", ["diagonal", "subspace"])
@pytest.mark.parametrize("gate", ["wiener", "paper", "clamp", "hard"])
def test_constant_gradient_opens_the_gate(mode, gate):
    p = torch.nn.Parameter(torch.zeros(8, 16))
    opt = SNRAdamW([p], lr=1e-3, weight_decay=0.0, mode=mode, rank=4, gate=gate)
    c = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    _drive(opt, p, lambda t: c.clone(), 60)
    m = opt.metrics()["params"]["group0.param0"]
    assert m["gate_mean"] > 0.99, m


@pytest.mark.parametrize("mode", ["diagonal", "subspace"])
@pytest.mark.parametrize("gate", ["wiener", "paper"])
def test_zero_mean_noise_closes_the_gate(mode, gate):
    p = torch.nn.Parameter(torch.zeros(16, 32))
    opt = SNRAdamW([p], lr=1e-3, weight_decay=0.0, mode=mode, rank=4, gate=gate)
    gen = torch.Generator().manual_seed(1)
    _drive(opt, p, lambda t: torch.randn(16, 32, generator=gen), 600)
    m = opt.metrics()["params"]["group0.param0"]
    assert m["gate_mean"] < 0.05, m
    assert m["frac_gate_below_0.1"] > 0.9, m


def test_finite_dataset_a():
    assert rule.finite_dataset_a(1000, 100) == pytest.approx(100 / 900)
    with pytest.raises(ValueError, match="batch_size"):
        rule.finite_dataset_a(100, 100)


@given(
    raw=st.floats(0, 1e6),
    var=st.floats(0, 1e6),
    k=st.floats(0, 1),
    tau=st.floats(1e-3, 1e3),
    a=st.floats(0, 10),
    rule_name=st.sampled_from(["wiener", "clamp", "hard", "paper"]),
)
@settings(max_examples=300, deadline=None)
def test_gates_are_in_unit_interval_and_monotone_in_signal(raw, var, k, tau, a, rule_name):
    g = rule.gate(
        torch.tensor([raw, raw * 2 + 1.0]), torch.tensor([var, var]), k, rule_name, tau, a
    )
    assert torch.isfinite(g).all()
    assert ((g >= 0) & (g <= 1)).all()
    assert g[1] >= g[0]  # more signal never closes the gate
