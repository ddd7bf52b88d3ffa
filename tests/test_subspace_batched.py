"""The batched subspace step: several trackers' innovation statistics at once, the next
mean's squared norm from the same dot products, and the weight decay folded into the gate."""

from __future__ import annotations

import copy

import pytest
import torch

from snr_dist import SNRAdamW, subspace


def _trackers(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, shape in enumerate(shapes):
        st: dict = {}
        opts = {"basis_side": "auto", "rank": 3, "seed": 0}
        subspace.init_tracker(st, shape, shape, opts, "cpu", k, stats="innovation")
        st["sketch"].normal_(generator=gen)
        st["sketch_weight"].fill_(0.5)
        st["proj_avg"].normal_(generator=gen)
        st["noise_dir"].uniform_(generator=gen)
        st["noise_energy"].fill_(7.0)
        grad = torch.randn(shape, generator=gen)
        mean = torch.randn(shape, generator=gen) * 0.5
        out.append((st, grad, mean))
    return out


def _observe_reference(state, grad, mean, step, beta, rho, sketch_beta):
    """One tracker, written out term by term (the rule the batched update must keep)."""
    q = state["basis"]
    g = subspace.matrix_view(grad, bool(state["basis_rows"]))
    p = q.T @ g
    state["sketch"].mul_(sketch_beta).add_((1.0 - sketch_beta) * (g @ p.T))
    state["sketch_weight"].mul_(sketch_beta).add_(1.0 - sketch_beta)
    if step >= 2:
        c = 1.0 / (1.0 - beta ** (step - 1))
        r_dir = (p - c * state["proj_avg"]).square().sum(dim=1)
        total = (grad - c * mean).square().sum()
        state["noise_dir"].mul_(rho).add_((1.0 - rho) * r_dir)
        state["noise_energy"].mul_(rho).add_((1.0 - rho) * total)
    state["proj_avg"].lerp_(p, 1.0 - beta)


@pytest.mark.parametrize("step", [1, 2, 5])
def test_observe_innovation_many_matches_each_tracker_alone(step):
    shapes = [(6, 10), (10, 6), (6, 10), (4, 2, 5)]  # mixed sides, a repeated shape, a 3-D one
    batch = _trackers(shapes)
    ref = [(copy.deepcopy(st), g, m) for st, g, m in batch]
    beta, sketch_beta = 0.9, 0.8
    mean_sq = subspace.observe_innovation_many(
        [st for st, _, _ in batch],
        [g for _, g, _ in batch],
        [m for _, _, m in batch],
        step,
        beta,
        beta,
        sketch_beta,
    )
    for (st, g, m), (want, _, _), got_sq in zip(batch, ref, mean_sq):
        _observe_reference(want, g, m, step, beta, beta, sketch_beta)
        for key in ("sketch", "sketch_weight", "proj_avg", "noise_dir", "noise_energy"):
            torch.testing.assert_close(st[key], want[key], rtol=1e-5, atol=1e-5)
        # the mean once the optimizer's lerp has taken this gradient
        torch.testing.assert_close(got_sq, m.lerp(g, 1.0 - beta).square().sum(), rtol=1e-5, atol=0)


def test_innovation_vector_with_and_without_the_precomputed_mean_norm():
    ((st, g, m),) = _trackers([(6, 10)])
    mean_sq = subspace.observe_innovation(st, g, m, 3, 0.9, 0.9, 0.8)
    m.lerp_(g, 0.1)
    torch.testing.assert_close(
        subspace.innovation_vector(st, m, mean_sq),
        subspace.innovation_vector(st, m),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize("rows", [False, True])
def test_apply_gates_into_out_with_decay(rows):
    torch.manual_seed(0)
    side = 9 if rows else 6
    state = {"basis": torch.linalg.qr(torch.randn(side, 2)).Q, "basis_rows": torch.tensor(rows)}
    direction = torch.randn(9, 6)
    gates = torch.tensor([0.9, 0.2, 0.05])
    gated = direction.clone()
    subspace.apply_gates(state, gated, gates)
    out = torch.randn(9, 6)
    want = 0.97 * out + (-0.3) * gated
    subspace.apply_gates(state, direction, gates, out=out, alpha=-0.3, decay=0.97)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_subspace_step_matches_the_per_tensor_path(weight_decay):
    """The multi-tensor step (scratch directions, decay in the matmul, bias correction in the
    step size) and the per-tensor one (``foreach=False``) agree over refreshes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)
    )
    twin = copy.deepcopy(model)
    kw = dict(lr=1e-2, weight_decay=weight_decay, mode="subspace", rank=3, refresh_every=4)
    a = SNRAdamW(model.parameters(), **kw)
    b = SNRAdamW(twin.parameters(), foreach=False, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) + 0.5
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, torch.zeros_like(p))
