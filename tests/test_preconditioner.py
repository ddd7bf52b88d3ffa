"""SNRPreconditioner around arbitrary torch optimizers."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp

from snr_dist import SNRAdamW, SNRPreconditioner


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    ],
)
def test_gate_none_equals_the_base_optimizer(make):
    a, b = tiny_mlp(), tiny_mlp()
    data = batches(20)
    run(a, SNRPreconditioner(make(a.parameters()), gate="none"), data)
    run(b, make(b.parameters()), data)
    assert max_diff(a, b) == 0.0


def test_gates_scale_the_base_update_exactly():
    """One step: new = old + gate * (base update), gate recomputed from the wrapper's state."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = SNRPreconditioner(torch.optim.SGD([p], lr=0.1), gate="wiener", snr_beta=0.9)
    for t in range(10):
        p.grad = torch.randn(6, 5) + (0.5 if t % 2 else 0.0)
        before = p.detach().clone()
        opt.step()
    st = opt.state[p]
    gate = opt.estimator_of(p).gates(p, st, opt.param_groups[0], 10)
    torch.testing.assert_close(p.detach(), before - 0.1 * gate * p.grad, rtol=1e-6, atol=1e-7)
    assert 0.0 < gate.mean() < 1.0


@pytest.mark.parametrize("noise", ["innovation", "second_moment"])
def test_wrapped_adamw_temporal_matches_snr_adamw_when_statistics_agree(noise):
    """SNRAdamW gates AdamW's step like the wrapper whose own statistics use the same betas:
    second moment, SNRAdamW(snr_beta=b, betas=(.., b2)) == wrapper(snr_beta=b, snr_beta2=b2);
    innovation, the wrapper's own mean with snr_beta = Adam's betas[0]."""
    a, b = tiny_mlp(), tiny_mlp()
    data = batches(25)
    snr_beta = 0.95 if noise == "second_moment" else 0.9
    opt = SNRAdamW(a.parameters(), lr=1e-2, weight_decay=0.0, snr_beta=snr_beta, noise=noise)
    run(a, opt, data)
    base = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    run(b, SNRPreconditioner(base, snr_beta=snr_beta, snr_beta2=0.999, noise=noise), data)
    assert max_diff(a, b) < 1e-5


@pytest.mark.parametrize(
    "kw", [dict(), dict(mode="subspace", rank=3, refresh_every=3), dict(estimator="cross_sample")]
)
def test_state_dict_holds_base_and_snr_and_resumes_bit_identically(kw):
    micro = 2 if kw.get("estimator") == "cross_sample" else 1
    data = batches(20, micro=micro)
    make = lambda m: SNRPreconditioner(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), **kw)
    full = tiny_mlp()
    run(full, make(full), data)
    first = tiny_mlp()
    opt = make(first)
    run(first, opt, data[:8])
    sd = opt.state_dict()
    assert set(sd) == {"base", "snr"}
    assert sd["base"]["state"][0]["momentum_buffer"] is not None
    buf = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": sd}, buf)
    buf.seek(0)
    ck = torch.load(buf)
    resumed = tiny_mlp(seed=7)
    resumed.load_state_dict(ck["m"])
    opt2 = make(resumed)
    opt2.load_state_dict(ck["o"])
    run(resumed, opt2, data[8:])
    for x, y in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(x, y)


def test_per_group_options_from_base_groups_and_scheduler():
    model = tiny_mlp()
    base = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "mode": "subspace", "rank": 2},
            {"params": model[2].parameters(), "lr": 0.01},
        ],
        lr=0.1,
    )
    opt = SNRPreconditioner(base, gate="paper")
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    run(model, opt, batches(4), scheduler=sched)
    assert base.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)  # scheduler acts on base
    m = opt.metrics()
    assert [v["kind"] for v in m["params"].values()] == [
        "subspace",
        "diagonal",
        "diagonal",
        "diagonal",
    ]
    assert all(g["gate"] == "paper" for g in m["groups"])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert base.param_groups[-1]["gate"] == "paper"


def test_bad_input():
    model = tiny_mlp()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        SNRPreconditioner(model.parameters())
    with pytest.raises(TypeError, match="LBFGS"):
        SNRPreconditioner(torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="Invalid snr_beta2"):
        SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1), snr_beta2=2.0)
    with pytest.raises(ValueError, match="Unknown SNR option"):
        SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1), tua=1.0)
    opt = SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="expected keys 'base' and 'snr'"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_nonfinite_gradient_hidden_from_base_and_restored():
    model = tiny_mlp()
    opt = SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run(model, opt, batches(2))
    w = model[0].weight
    before = w.detach().clone()
    mom = opt.base.state[w]["momentum_buffer"].clone()
    opt.zero_grad()
    model(torch.randn(2, 12)).sum().backward()
    w.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        opt.step()
    assert torch.equal(w.detach(), before)
    assert torch.equal(opt.base.state[w]["momentum_buffer"], mom)
    assert w.grad is not None and torch.isnan(w.grad[0, 0])  # the user's grad is untouched
    assert opt.metrics()["nonfinite_skips"] == 1


def test_copy_and_pickle_roundtrip():
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample")
    clone = copy.deepcopy(opt)
    assert isinstance(clone, SNRAdamW) and clone.param_groups[0]["estimator"] == "cross_sample"
