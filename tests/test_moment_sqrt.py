"""Adam's ``sqrt(v)`` raised to the smallest normal number where ``v`` holds zeros
(`snr_dist.optim.moment_sqrt`): off MKL's slow path on the CPU, and bit for bit the step the
plain ``sqrt`` gives (`benchmarks/moment_sqrt.py` times it)."""

import copy
import pickle

import pytest
import torch
from torch import nn

from snr_dist import SNRAdamW
from snr_dist.optim import moment_sqrt as msq
from snr_dist.optim.moment_sqrt import MIN_SHARE, RECHECK, MomentSqrt

TINY = torch.finfo(torch.float32).tiny
needs_mkl = pytest.mark.skipif(
    not torch.backends.mkl.is_available(), reason="the floor only applies where VML computes sqrt"
)


@pytest.fixture(autouse=True)
def _gradual_underflow():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


def _awkward_moment(dtype=torch.float32) -> torch.Tensor:
    """Every kind of value a second moment can hold: zeros (a tenth), subnormals, the smallest
    normals, tiny and ordinary values, and a NaN and an Inf."""
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(4000, generator=gen, dtype=dtype) * 1e-3
    v[::10] = 0.0
    tiny = torch.finfo(dtype).tiny
    v[1:200:10] = tiny / 3  # subnormal
    v[2:200:10] = tiny
    v[3:200:10] = tiny * 1.5
    v[4:200:10] = 1e-30
    v[5] = float("nan")
    v[6] = float("inf")
    return v


@needs_mkl
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [1e-8, 1e-6, 5e-10])  # 5e-10: near the bound at scale 31.6
@pytest.mark.parametrize("scale", [1.0, 31.6])
def test_the_floor_changes_no_bit_of_the_denominator(dtype, eps, scale):
    v = _awkward_moment(dtype)
    p = torch.zeros(1)
    ms = MomentSqrt()
    assert ms._floor(p, v, eps, scale) is not None  # the floor is taken here
    want = torch.sqrt(v) * scale + eps
    got = ms.sqrt(p, v, eps, scale) * scale + eps
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    out = torch.empty_like(v)  # into a caller's buffer too
    assert ms.sqrt(p, v, eps, scale, out=out) is out
    assert torch.equal((out * scale + eps).nan_to_num(), want.nan_to_num())


@needs_mkl
def test_an_eps_too_small_to_absorb_the_floor_keeps_the_plain_sqrt():
    """Below the bound the floor would show through (so the guard matters)."""
    v = torch.zeros(100)
    eps = 2.0**-40
    assert (torch.sqrt(torch.clamp_min(v, TINY)) + eps != torch.sqrt(v) + eps).all()
    ms = MomentSqrt()
    p = torch.zeros(1)
    assert ms._floor(p, v, eps, 1.0) is None
    assert ms._floor(p, v, 2.0**-36, 1.0) is not None
    assert ms._floor(p, v, 2.0**-36, 2.0) is None  # the scale counts against eps
    assert torch.equal(ms.sqrt(p, v, eps) + eps, torch.sqrt(v) + eps)


@needs_mkl
def test_the_floor_is_taken_only_where_zeros_are_common():
    ms, gen = MomentSqrt(), torch.Generator().manual_seed(1)
    v = torch.rand(10_000, generator=gen) + 0.1
    assert ms._floor(torch.zeros(1), v, 1e-8, 1.0) is None  # no zeros: the plain sqrt
    few = v.clone()
    few[: int(10_000 * MIN_SHARE) - 1] = 0.0
    assert ms._floor(torch.zeros(1), few, 1e-8, 1.0) is None
    many = v.clone()
    many[: int(10_000 * MIN_SHARE)] = 0.0
    assert ms._floor(torch.zeros(1), many, 1e-8, 1.0) == TINY
    half = many.to(torch.bfloat16)  # not a VML dtype
    assert ms._floor(torch.zeros(1), half, 1e-8, 1.0) is None


@needs_mkl
def test_the_choice_is_looked_at_again_every_recheck_calls():
    ms, p = MomentSqrt(), torch.zeros(1)
    v = torch.zeros(1000)
    assert ms._floor(p, v, 1e-8, 1.0) is not None
    v.fill_(1.0)  # the zeros are gone
    for _ in range(RECHECK - 1):
        assert ms._floor(p, v, 1e-8, 1.0) is not None  # not looked at yet
    assert ms._floor(p, v, 1e-8, 1.0) is None
    ms.clear()
    v[:100] = 0.0
    assert ms._floor(p, v, 1e-8, 1.0) is not None


@needs_mkl
def test_sqrt_foreach_mixes_raised_and_plain_tensors_in_order():
    ms = MomentSqrt()
    vs = [
        _awkward_moment(),
        torch.rand(300) + 1.0,
        _awkward_moment(torch.float64),
        torch.zeros(7),
    ]
    params = [torch.zeros(1) for _ in vs]
    added = [1e-8, 1e-8, 1e-8, 1e-30]  # the last: too small for the floor
    got = ms.sqrt_foreach(params, vs, added)
    taken = [ms._seen[p][1] is not None for p in params]
    assert taken == [True, False, True, True]
    for g, v, a in zip(got, vs, added):
        assert g is not v
        assert torch.equal((g + a).nan_to_num(), (torch.sqrt(v) + a).nan_to_num())


def _blank_input_run(kw: dict, steps: int = 40, floor: bool = True) -> nn.Module:
    """An MLP whose first 8 of 32 inputs are always zero (a quarter of the first layer's second
    moment stays exactly zero, its first moment too) and whose next 4 are ~1e-19 (first moments
    ~1e-20 over second moments that underflow: there the denominator is eps alone, and a floor
    that showed through would change the step of their weights, which start at zero)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    with torch.no_grad():  # weights that start at 0 keep the eps-sized steps visible
        model[0].weight[:, 8:12] = 0.0
    opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.01, **kw)
    if not floor:
        opt._engine.moment_sqrt._floor = lambda *a: None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        x[:, :8] = 0.0
        x[:, 8:12] *= 1e-19
        y = torch.randint(0, 5, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    if floor:
        w = model[0].weight
        assert (opt.state[w]["exp_avg_sq"] == 0).float().mean() >= 0.25
        assert opt._engine.moment_sqrt._seen[w][1] is not None
    return model


@needs_mkl
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"foreach": False},
        {"gate": "hard"},
        {"warmup_steps": 1000},
        {"mode": "subspace", "rank": 4},
        {"noise": "second_moment"},
    ],
    ids=["diagonal", "no-foreach", "hard-gate", "ungated", "subspace", "second-moment"],
)
def test_snradamw_trains_bit_identically_with_the_floor(kw):
    with_floor = _blank_input_run(kw)
    without = _blank_input_run(kw, floor=False)
    for a, b in zip(with_floor.parameters(), without.parameters()):
        assert torch.equal(a, b)


@needs_mkl
def test_the_choices_are_not_state_and_survive_copies():
    model = nn.Linear(4, 3)
    opt = SNRAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert opt._engine.moment_sqrt._seen
    assert "moment_sqrt" not in str(opt.state_dict())
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        clone.step()  # rebuilt engine, fresh choices
        assert clone._engine.moment_sqrt is not opt._engine.moment_sqrt


def test_off_the_floor_the_module_computes_the_plain_sqrt(monkeypatch):
    """Without MKL (e.g. an aarch64 build) nothing is raised."""
    monkeypatch.setattr(msq, "_MKL", False)
    ms, p, v = MomentSqrt(), torch.zeros(1), torch.zeros(1000)
    assert ms._floor(p, v, 1e-8, 1.0) is None
    assert torch.equal(ms.sqrt(p, v, 1e-8), torch.zeros(1000))
