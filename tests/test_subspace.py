"""ENTK eigen-trackers: recovery of a planted eigenspace, refresh invariants, gated update."""

from __future__ import annotations

import pytest
import torch

from snr_dist import SNRAdamW, subspace


def _planted(d=24, o=40, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(d, r, generator=g)).Q
    scales = torch.tensor([6.0, 5.0, 4.0, 3.0])[:r]

    def draw():
        z = torch.randn(r, o, generator=g) * scales[:, None]
        return u @ z + 0.05 * torch.randn(d, o, generator=g)

    return u, scales, draw


@pytest.mark.parametrize("estimator", ["temporal", "cross_sample"])
def test_tracker_recovers_planted_eigenspace(estimator):
    """Largest principal angle to a planted rank-4 covariance < 0.1 rad within 40 steps."""
    u, scales, draw = _planted()
    p = torch.nn.Parameter(torch.zeros(24, 40))
    opt = SNRAdamW([p], lr=1e-3, mode="subspace", rank=4, refresh_every=10, estimator=estimator)
    for _ in range(40):
        if estimator == "cross_sample":
            p.grad = None
            for _ in range(2):
                (p * draw()).sum().backward()  # gradient contribution = the draw
        else:
            p.grad = draw()
        opt.step()
    q = opt.state[p]["basis"]
    angles = subspace.principal_angles(q, u)
    assert angles.max() < 0.1, angles
    # Nystrom eigenvalue estimates: E[G G^T] = o * scale^2 on the planted directions
    # (the sketch EMA over ~10 steps is noisy: 40% tolerance)
    eig = opt.state[p]["eigvals"]
    draws_per_step = 2 if estimator == "cross_sample" else 1  # p.grad sums the micro-batches
    torch.testing.assert_close(eig, draws_per_step * 40 * scales.square(), rtol=0.4, atol=0)
    assert opt.metrics()["params"]["group0.param0"]["captured_energy"] > 0.95


def test_basis_is_orthonormal_and_tall_matrices_use_column_side():
    p = torch.nn.Parameter(torch.zeros(50, 8))  # basis on the smaller (column) side
    opt = SNRAdamW([p], mode="subspace", rank=3, refresh_every=2)
    for t in range(7):
        p.grad = torch.randn(50, 8, generator=torch.Generator().manual_seed(t))
        opt.step()
    q = opt.state[p]["basis"]
    assert q.shape == (8, 3)
    torch.testing.assert_close(q.T @ q, torch.eye(3), atol=1e-5, rtol=0)


def test_apply_gates_matches_dense_projector_formula():
    torch.manual_seed(0)
    state = {"basis": torch.linalg.qr(torch.randn(6, 2)).Q, "basis_rows": torch.tensor(False)}
    direction = torch.randn(9, 6)  # basis on the column side (dimension 6)
    gates = torch.tensor([0.9, 0.2, 0.05])
    q = state["basis"]
    proj = q @ torch.diag(gates[:2]) @ q.T
    perp = torch.eye(6) - q @ q.T
    expected = direction @ (proj + gates[2] * perp)  # gates act on the row space of D^T
    out = direction.clone()
    subspace.apply_gates(state, out, gates)
    torch.testing.assert_close(out, expected)


def _tracked(estimator="temporal", steps=30, signal=1.0, seed=0, noise="innovation"):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(12, 30, generator=gen)
    p = torch.nn.Parameter(torch.zeros(12, 30))
    opt = SNRAdamW(
        [p],
        lr=1e-3,
        mode="subspace",
        rank=3,
        refresh_every=1000,
        estimator=estimator,
        noise=noise,
    )
    for _ in range(steps):
        if estimator == "cross_sample":
            p.grad = None
            for _ in range(3):
                (p * (signal * base + torch.randn(12, 30, generator=gen))).sum().backward()
        else:
            p.grad = signal * base + torch.randn(12, 30, generator=gen)
        opt.step()
    return p, opt


def test_temporal_refresh_within_the_same_span_preserves_statistics():
    """Re-expressing the basis by a rotation inside its span must not change the statistics as
    operators on parameter space (Q M Q^T), nor the complement's energies."""
    p, opt = _tracked("temporal", noise="second_moment")
    st = opt.state[p]
    group = opt.param_groups[0]
    t = int(st["step"])

    def as_operators():
        q = st["basis"].clone()
        ops = [q @ st["proj_cov"] @ q.T, q @ st["proj_avg"]]
        vec = subspace.temporal_vector(st, st["snr_avg"])
        return q, ops, subspace.temporal_direction_moments(vec, t, 0.99, 0.999)

    q_before, ops_before, (raw_b, var_b, _) = as_operators()
    _refresh_to_rotated_copy(st, group, t)
    q_after, ops_after, (raw_a, var_a, _) = as_operators()
    assert subspace.principal_angles(q_after, q_before).max() < 1e-3
    assert (q_after - q_before).abs().max() > 0.1  # the basis really changed
    for a, b in zip(ops_after, ops_before):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw_a[-1], raw_b[-1], rtol=1e-4, atol=1e-4)  # complement
    torch.testing.assert_close(var_a[-1], var_b[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw_a.sum(), raw_b.sum(), rtol=1e-4, atol=1e-4)


def test_innovation_refresh_within_the_same_span_conserves_its_statistics():
    """The innovation rule keeps the projected mean (re-projected exactly: the same operator
    Q P on parameter space) and per-direction innovation energies (rotated as a diagonal:
    totals inside the basis and in the complement conserved)."""
    p, opt = _tracked("temporal", noise="innovation")
    st = opt.state[p]
    group = opt.param_groups[0]
    t = int(st["step"])
    assert "proj_cov" not in st and "snr_avg" not in st

    def moments():
        vec = subspace.innovation_vector(st, st["exp_avg"])
        raw, var, _ = subspace.innovation_direction_moments(vec, t, 0.9, 0.9)
        return st["basis"] @ st["proj_avg"], raw, var

    op_b, raw_b, var_b = moments()
    _refresh_to_rotated_copy(st, group, t)
    op_a, raw_a, var_a = moments()
    torch.testing.assert_close(op_a, op_b, rtol=1e-4, atol=1e-4)
    for a, b in ((raw_a, raw_b), (var_a, var_b)):
        torch.testing.assert_close(a[:-1].sum(), b[:-1].sum(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=1e-4)


def test_cross_sample_refresh_within_the_same_span_conserves_energy():
    """Cross-sample keeps per-direction energies only (O(r) to all-reduce), rotated as a
    diagonal: totals inside the basis and the complement are conserved exactly."""
    p, opt = _tracked("cross_sample")
    st = opt.state[p]
    group = opt.param_groups[0]
    t = int(st["step"])
    raw_b, var_b = subspace.cross_direction_moments(st, t, group["snr_beta"])
    _refresh_to_rotated_copy(st, group, t)
    raw_a, var_a = subspace.cross_direction_moments(st, t, group["snr_beta"])
    for a, b in ((raw_a, raw_b), (var_a, var_b)):
        torch.testing.assert_close(a[:-1].sum(), b[:-1].sum(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a[-1], b[-1], rtol=1e-4, atol=1e-4)


def _refresh_to_rotated_copy(st, group, t):
    """Force a refresh whose sketch spans exactly the current basis (a rotated copy)."""
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5))).Q
    st["sketch"].copy_(st["basis"] @ rot @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ rot.T)
    st["sketch_weight"].fill_(1.0)
    mean = st.get("snr_avg", st.get("exp_avg"))
    subspace.refresh(st, mean, t, group["snr_beta"], group["betas"][1])


def test_refresh_keeps_coherent_signal_exact_after_large_rotation():
    """A constant gradient stays fully open across refreshes that rotate the basis a lot."""
    p = torch.nn.Parameter(torch.zeros(8, 16))
    opt = SNRAdamW([p], lr=1e-3, mode="subspace", rank=4, refresh_every=5)
    c = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(40):  # refreshes at 1, 2, 4, 5, 10, ...: the random basis moves a lot
        p.grad = c.clone()
        opt.step()
    m = opt.metrics()["params"]["group0.param0"]
    assert m["gate_mean"] > 0.99 and m["reservoir_gate"] > 0.99, m


def test_refresh_schedule():
    due = [t for t in range(1, 130) if subspace.refresh_due(t, 50)]
    assert due == [1, 2, 4, 8, 16, 32, 50, 100]


@pytest.mark.parametrize("magnitude", [1e-21, 1e12])
def test_refresh_is_scale_free_for_tiny_and_huge_gradients(magnitude):
    """Late in training gradients are tiny and the sketch holds their squares (~1e-42 here,
    below float32's normal range): the refresh must still find the planted space, not crash
    in eigh (found by the double-descent experiment) or keep a random basis. With IEEE gradual
    underflow; the default step flushes such squares to zero, which test_denormals covers."""
    u, scales, draw = _planted()
    p = torch.nn.Parameter(torch.zeros(24, 40))
    opt = SNRAdamW([p], lr=1e-3, mode="subspace", rank=4, refresh_every=10, flush_denormals=False)
    for _ in range(40):
        p.grad = draw() * magnitude
        opt.step()
    assert subspace.principal_angles(opt.state[p]["basis"], u).max() < 0.1
    eig = opt.state[p]["eigvals"]
    assert torch.isfinite(eig).all() and eig.min() > 0


def test_refresh_keeps_the_basis_when_there_is_nothing_to_solve():
    q = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q.float()
    q_new, evals, cov = subspace.refresh_solve(q, [torch.zeros(6, 2)], 1.0, None)
    assert torch.equal(q_new, q) and torch.equal(evals, torch.zeros(2)) and cov is None
    nan_sketch = torch.full((6, 2), float("nan"))
    q_new, _, _ = subspace.refresh_solve(q, [nan_sketch], 1.0, None)
    assert torch.equal(q_new, q)


@pytest.mark.parametrize(
    "wrapper, kernels",
    [("SNRAdamW", "torch"), ("SNRAdamW", "triton"), ("SNRPreconditioner", None)],
)
def test_a_channels_last_conv_weight_gets_the_same_gated_update(kernels, wrapper):
    """A channels_last conv weight has no 2-D view with the basis first, so its matrix view is
    a copy: the gated update written into it must reach the parameter (it used to be dropped:
    SNRAdamW left the weight still, SNRPreconditioner let the base step through ungated)."""
    from snr_dist import SNRPreconditioner

    runs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=fmt)
        kw = dict(mode="subspace", rank=2, refresh_every=2)
        if wrapper == "SNRAdamW":
            opt = SNRAdamW([conv.weight], lr=1e-2, kernels=kernels, **kw)
        else:
            opt = SNRPreconditioner(torch.optim.SGD([conv.weight], lr=1e-2), **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            x = torch.randn(4, 3, 6, 6, generator=gen)
            opt.zero_grad()
            conv(x.to(memory_format=fmt)).square().mean().backward()
            opt.step()
        assert conv.weight.is_contiguous(memory_format=fmt)
        runs.append(conv.weight.detach().contiguous())
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-7)
