"""Subnormal floats flushed to zero during the optimizer step (`snr_dist.denormals`), and only
there: Adam's first moment of a coordinate whose gradient stays zero decays into the subnormal
range and stays, and CPU arithmetic on it is slow (`benchmarks/denormal_step.py`)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from snr_dist import SNRAdamW, SNRPreconditioner
from snr_dist.denormals import flush_denormals, flushing

SMALLEST = 2.0**-149  # the smallest fp32 subnormal: 0.9 * it rounds back to it


@pytest.fixture(autouse=True)
def _gradual_underflow():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def test_the_block_flushes_and_restores_the_threads_setting():
    assert not flushing()
    with flush_denormals():
        assert flushing()
        assert torch.tensor([SMALLEST]).item() == 0.0
        with flush_denormals():  # nested: leaves it on for the outer block
            pass
        assert flushing()
    assert not flushing()
    assert torch.tensor([SMALLEST]).item() == SMALLEST
    with flush_denormals(enabled=False):
        assert not flushing()


def test_the_block_restores_on_an_exception_and_keeps_a_global_setting():
    with pytest.raises(RuntimeError, match="boom"), flush_denormals():
        raise RuntimeError("boom")
    assert not flushing()
    torch.set_flush_denormal(True)  # the user's own choice stays after the step
    with flush_denormals():
        pass
    assert flushing()


def _one_coordinate_gone_quiet(make, eps: float = 1e-8):
    """A parameter whose first coordinate got gradients once and none since, its first moment
    (and, for eps=0, its second moment) at the smallest subnormal; one more step."""
    p = nn.Parameter(torch.full((4, 3), 0.5))
    opt = make([p], eps)
    p.grad = torch.ones(4, 3)
    opt.step()
    st = opt.state[p] if isinstance(opt, SNRAdamW) else opt.base.state[p]
    st["exp_avg"].view(-1)[0] = SMALLEST
    if eps == 0.0:
        st["exp_avg_sq"].view(-1)[0] = SMALLEST
    p.grad = torch.ones(4, 3)
    p.grad.view(-1)[0] = 0.0
    opt.step()
    return p, st, opt


OPTIMIZERS = {
    "diagonal": lambda ps, eps: SNRAdamW(ps, lr=1e-3, eps=eps),
    "subspace": lambda ps, eps: SNRAdamW(ps, lr=1e-3, eps=eps, mode="subspace", rank=2),
    "diagonal, not foreach": lambda ps, eps: SNRAdamW(ps, lr=1e-3, eps=eps, foreach=False),
    "preconditioner over Adam": lambda ps, eps: SNRPreconditioner(
        torch.optim.Adam(ps, lr=1e-3, eps=eps)
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_step_flushes_a_subnormal_moment_and_restores_gradual_underflow(name):
    _, st, _ = _one_coordinate_gone_quiet(OPTIMIZERS[name])
    assert st["exp_avg"].view(-1)[0].item() == 0.0  # read as zero inside the step
    assert not flushing()
    assert torch.tensor([SMALLEST]).item() == SMALLEST


@pytest.mark.parametrize("name", ["diagonal", "preconditioner over Adam"])
def test_flush_denormals_false_keeps_ieee_gradual_underflow(name):
    def make(ps, eps):
        opt = OPTIMIZERS[name](ps, eps)
        opt.flush_denormals = False
        return opt

    _, st, _ = _one_coordinate_gone_quiet(make)
    assert st["exp_avg"].view(-1)[0].item() == SMALLEST


@pytest.mark.parametrize("name", ["diagonal", "subspace", "preconditioner over Adam"])
def test_no_flush_when_eps_is_zero_where_it_would_make_0_over_0(name):
    p, st, _ = _one_coordinate_gone_quiet(OPTIMIZERS[name], eps=0.0)
    assert st["exp_avg"].view(-1)[0].item() == SMALLEST
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", ["diagonal", "preconditioner over Adam"])
def test_no_flush_below_min_eps_where_a_flushed_gradient_could_still_move_a_parameter(name):
    _, st, _ = _one_coordinate_gone_quiet(OPTIMIZERS[name], eps=1e-13)
    assert st["exp_avg"].view(-1)[0].item() == SMALLEST


def test_no_flush_over_a_base_without_eps():
    """SGD's update is proportional to the gradient: a base group without ``eps`` says nothing
    about how far a flushed value could move a parameter, so its steps keep IEEE underflow."""
    p = nn.Parameter(torch.ones(3))
    opt = SNRPreconditioner(torch.optim.SGD([p], lr=1e-3, momentum=0.9))
    p.grad = torch.ones(3)
    opt.step()
    opt.base.state[p]["momentum_buffer"][0] = SMALLEST
    p.grad = torch.tensor([0.0, 1.0, 1.0])
    opt.step()
    assert opt.base.state[p]["momentum_buffer"][0].item() == SMALLEST  # 0.9 x it rounds back


def test_tiny_gradients_stale_the_tracker_only_where_adam_cannot_move_anyway():
    """Gradients of 1e-21 have subnormal squares: flushed, a subspace sketch is zero and the
    refresh keeps its basis (IEEE finds the planted space, test_subspace). With eps = 1e-8 the
    Adam direction of such gradients is ~1e-13, and the parameters come out the same."""
    gen = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(24, 4, generator=gen)).Q
    grads = [u @ torch.randn(4, 40, generator=gen) * 1e-21 for _ in range(40)]

    def train(flush: bool):
        p = nn.Parameter(torch.zeros(24, 40))
        opt = SNRAdamW([p], mode="subspace", rank=4, refresh_every=10, flush_denormals=flush)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        return p.detach(), opt.state[p]

    p_ieee, st_ieee = train(False)
    p_flush, st_flush = train(True)
    assert (st_ieee["eigvals"] > 0).all() and torch.equal(st_flush["eigvals"], torch.zeros(4))
    assert torch.isfinite(st_flush["basis"]).all()
    assert torch.equal(p_ieee, p_flush)


def test_the_setting_survives_copies_pickles_and_old_pickles():
    opt = SNRAdamW([nn.Parameter(torch.ones(3))], flush_denormals=False)
    assert copy.deepcopy(opt).flush_denormals is False
    assert pickle.loads(pickle.dumps(opt)).flush_denormals is False
    state = opt.__getstate__()
    del state["flush_denormals"]  # a pickle from before the option
    fresh = SNRAdamW.__new__(SNRAdamW)
    fresh.__setstate__(state)
    assert fresh.flush_denormals is True


@pytest.mark.parametrize("mode", ["diagonal", "subspace"])
def test_a_run_whose_moments_go_subnormal_trains_to_the_same_parameters(mode):
    """Inputs 0-3 are nonzero only for the first steps, so their weights' first moments decay
    by beta1 = 0.7 per step into the subnormal range (about 230 steps). Flushed, the state holds
    none; the parameters come out bit-identical (values that small do not move them)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 32, 16, generator=gen)
    x[5:, :, :4] = 0.0
    y = torch.randint(0, 4, (300, 32), generator=gen)

    def train(flush: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 4))
        opt = SNRAdamW(
            model.parameters(), lr=1e-2, betas=(0.7, 0.999), mode=mode, rank=4,
            flush_denormals=flush,
        )  # fmt: skip
        for i in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
        m = opt.state[model[0].weight]["exp_avg"]
        subnormal = int(((m != 0) & (m.abs() < torch.finfo(torch.float32).tiny)).sum())
        return [p.detach().clone() for p in model.parameters()], subnormal

    plain, n_plain = train(False)
    flushed, n_flushed = train(True)
    assert n_plain >= 24  # the test means something: the quiet inputs' moments went subnormal
    assert n_flushed == 0
    assert all(torch.equal(a, b) for a, b in zip(plain, flushed))
