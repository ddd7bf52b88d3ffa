"""Cross-sample statistics from micro-batches: capture, weights, failure modes."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, run, tiny_mlp

from snr_dist import SNRAdamW


def _step_with(opt, p, contributions, weights=None):
    p.grad = None
    for i, c in enumerate(contributions):
        if weights is None:
            (p * c).sum().backward()
        else:
            with opt.microbatch(weights[i]):
                (p * c).sum().backward()
    opt.step()


def test_hooks_capture_microbatch_contributions_exactly():
    """EMAs after one step equal the closed form on the individual micro-batch gradients."""
    p = torch.nn.Parameter(torch.zeros(4, 3))
    beta = 0.9
    opt = SNRAdamW([p], estimator="cross_sample", snr_beta=beta)
    ds = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _step_with(opt, p, ds)
    g = torch.stack(ds)
    raw = g.sum(0).square()  # the applied gradient p.grad = sum of the contributions
    var = 3 * g.var(0, unbiased=True)  # Var(sum of 3) from the spread of the 3 parts
    st = opt.state[p]
    torch.testing.assert_close(st["raw_avg"], (1 - beta) * raw)
    torch.testing.assert_close(st["var_avg"], (1 - beta) * var)


def test_unequal_microbatch_weights():
    """With sum-reduced micro-batch losses and opt.microbatch(n_i), the noise estimate is
    the weighted-sample formula: Var(g) = W^2 sigma_e^2 / W."""
    p = torch.nn.Parameter(torch.zeros(5))
    opt = SNRAdamW([p], estimator="cross_sample", snr_beta=0.0)
    sizes = [2.0, 5.0, 3.0]
    means = [torch.randn(5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    _step_with(opt, p, [m * n for m, n in zip(means, sizes)], sizes)
    big = sum(sizes)
    g_big = sum(m * n for m, n in zip(means, sizes)) / big
    sigma2 = sum(n * (m - g_big).square() for m, n in zip(means, sizes)) / (len(sizes) - 1)
    st = opt.state[p]
    # in the units of the applied gradient p.grad = big * g_big
    torch.testing.assert_close(st["raw_avg"], (big * g_big).square())
    torch.testing.assert_close(st["var_avg"], big * sigma2)


def test_gradient_clipping_between_backward_and_step_keeps_units_consistent():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.zeros(6, 4))
    b = torch.nn.Parameter(torch.zeros(6, 4))
    oa = SNRAdamW([a], estimator="cross_sample", mode="subspace", rank=2)
    ob = SNRAdamW([b], estimator="cross_sample", mode="subspace", rank=2)
    for _ in range(5):
        ds = [torch.randn(6, 4) + 1.0 for _ in range(2)]
        a.grad = b.grad = None
        for d in ds:
            (a * d).sum().backward()
            (b * d * 8.0).sum().backward()  # e.g. a loss scale of 8...
        b.grad.div_(8.0)  # ...unscaled before step()
        oa.step()
        ob.step()
    for k in ("raw_dir", "noise_dir", "raw_energy", "noise_energy"):
        torch.testing.assert_close(oa.state[a][k], ob.state[b][k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b)


def test_microbatch_weight_must_be_positive():
    opt = SNRAdamW([torch.nn.Parameter(torch.zeros(2))], estimator="cross_sample")
    with pytest.raises(ValueError, match="Invalid microbatch weight"), opt.microbatch(0):
        pass


def test_hooks_follow_param_groups_replaced_by_load_state_dict():
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample")
    run(model, opt, batches(2, micro=2))
    opt.load_state_dict(opt.state_dict())
    run(model, opt, batches(2, micro=3, seed=5))  # still captured (else: < 2 error)
    assert int(opt.state[model[0].weight]["step"]) == 4


def test_zero_grad_forgets_recorded_microbatches():
    """A discarded backward pass (zero_grad afterwards) must not count towards the step."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample")
    x, y = torch.randn(4, 12), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()  # e.g. a probe, then discarded
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="saw 1"):
        opt.step()


def test_temporal_estimator_needs_positive_snr_beta():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="Invalid snr_beta: 0; allowed range with estimator"):
        SNRAdamW([p], snr_beta=0.0)
    SNRAdamW([p], snr_beta=0.0, estimator="cross_sample")  # per-step statistics are fine
