"""SNRPreconditioner around arbitrary torch optimizers."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp

from snr_dist import SNRAdamW, SNRPreconditioner
from snr_dist import snr as rule


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
        SNRPreconditioner("adam")  # parameters are accepted: the article's form, below
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


# ---------------------------------------------------------------- the article's constructor
def _article_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _steps(model, opt, n=6):
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_article_constructor_builds_adam_with_the_clamp_gate_and_subspace_rank():
    """The call printed in the article (it raised TypeError before 0.3) equals the explicit
    SNRPreconditioner(Adam(...), gate="clamp", tau=threshold, mode="subspace", rank=rank)."""
    a = _article_model()
    article = SNRPreconditioner(a.parameters(), lr=1e-3, snr_threshold=0.5, rank=128)
    group = article.param_groups[0]
    assert isinstance(article.base, torch.optim.Adam)
    assert (group["gate"], group["tau"], group["mode"], group["rank"], group["lr"]) == (
        "clamp",
        0.5,
        "subspace",
        128,
        1e-3,
    )
    b = _article_model()
    explicit = SNRPreconditioner(
        torch.optim.Adam(b.parameters(), lr=1e-3), gate="clamp", tau=0.5, mode="subspace", rank=128
    )
    for p, q in zip(_steps(a, article), _steps(b, explicit)):
        assert torch.equal(p, q)
    # the article's rule on the last step: gates are min(1, SNR / threshold), some below 1
    w = a[0].weight
    info = article.estimator_of(w).info(w, article.state[w], group)
    snr = rule.snr(info["raw"], info["var"], info["k"])  # bias-corrected mean^2 / variance
    expected = torch.clamp(snr / 0.5, max=1.0)
    assert 0 < int((expected < 1).sum()) < expected.numel()
    torch.testing.assert_close(info["gates"], expected, rtol=1e-4, atol=1e-6)


def test_article_constructor_defaults_copies_and_state_dict():
    m = _article_model()
    opt = SNRPreconditioner(m.parameters())  # the article's defaults: lr 1e-3, 0.5, rank 128
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["tau"]) == (1e-3, 0.5)
    _steps(m, opt, 2)
    clone = copy.deepcopy(opt)
    assert isinstance(clone.base, torch.optim.Adam)
    restored = SNRPreconditioner(m.parameters(), weight_decay=0.0, betas=(0.9, 0.999))
    restored.load_state_dict(pickle.loads(pickle.dumps(opt.state_dict())))
    assert restored.state_dict()["base"]["state"].keys() == opt.state_dict()["base"]["state"].keys()


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: SNRPreconditioner(m), ["got a module", "model.parameters()"]),
        (lambda m: SNRPreconditioner(5), ["torch.optim.Optimizer to wrap", "got int"]),
        (
            lambda m: SNRPreconditioner(torch.optim.SGD(m.parameters(), lr=0.1), lr=0.1),
            ["learning rate belongs to the base optimizer", "SGD(params, lr=...)"],
        ),
        (
            lambda m: SNRPreconditioner(m.parameters(), snr_threshold=0.5, tau=1.0),
            ["gate='clamp', tau=0.5", "cannot be combined with tau"],
        ),
        (
            lambda m: SNRPreconditioner(m.parameters(), threshold=0.5),
            ["did you mean snr_threshold"],
        ),
        (lambda m: SNRPreconditioner(m.parameters(), rnak=8), ["'rnak' -> 'rank'"]),
    ],
)
def test_wrong_article_calls_name_what_is_accepted(call, words):
    with pytest.raises((TypeError, ValueError)) as e:
        call(_article_model())
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_a_group_added_to_the_base_after_wrapping_gets_the_snr_defaults():
    """``opt.base.add_param_group`` (the base's list is the wrapper's) used to fail the next
    step with KeyError 'estimator'; it now trains as if added through the wrapper."""
    out = []
    for where in ("wrapper", "base"):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 3))
        opt = SNRPreconditioner(torch.optim.SGD(m[0].parameters(), lr=0.1), tau=2.0)
        (opt if where == "wrapper" else opt.base).add_param_group({"params": m[2].parameters()})
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            m(torch.randn(4, 6, generator=gen)).square().sum().backward()
            opt.step()
        assert opt.param_groups[1]["tau"] == 2.0
        out.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*out):
        assert torch.equal(a, b)
