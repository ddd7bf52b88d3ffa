"""Every step kernel (`snr_dist.optim.steps`) against the readable reference step in snr.py.

Each kernel is called through its interface (``kernel.step(group, params, grads)``) on the
same parameters and gradients as `snr_dist.snr.snr_adamw_reference_step`, for both temporal
noise rules and every gate rule, with warm-up, weight decay and ``maximize``. The torch and
chunked kernels compute what the reference computes in another order (the bias corrections
folded into constants): within float rounding. The compiled and Triton kernels compile only
the two configurations the other compiled-step tests use (a cold Inductor cache costs ~20-30
s per configuration on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from snr_dist import SNRAdamW
from snr_dist import snr as rule
from snr_dist.optim.steps import chunked_step

RULES = [
    dict(noise="innovation", gate="wiener"),
    dict(noise="innovation", gate="clamp", tau=0.5, warmup_steps=3),
    dict(noise="innovation", gate="hard", weight_decay=0.1),
    dict(noise="innovation", gate="paper", gate_a=0.5),
    dict(noise="innovation", gate="none"),
    dict(noise="second_moment", gate="wiener", snr_beta=0.95),
    dict(noise="second_moment", gate="clamp", tau=0.5, snr_beta=0.9),  # Adam's mean shared
    dict(noise="second_moment", gate="hard", warmup_steps=5),
    dict(noise="second_moment", gate="paper", maximize=True),
]
# the configurations tests/test_compiled_step.py compiles too
DEVICE_RULES = [
    dict(noise="innovation", gate="wiener", weight_decay=0.1),
    dict(
        noise="second_moment", snr_beta=0.95, gate="clamp", tau=0.5, maximize=True, warmup_steps=3
    ),
]
STEPS = 25


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items())


def _grads(shapes, t):
    gen = torch.Generator().manual_seed(100 + t)
    return [torch.randn(s, generator=gen) * 0.3 + 0.1 * (t % 4) for s in shapes]


def _reference(params, kw, steps):
    """``params`` after ``steps`` reference steps."""
    kw = dict(kw)
    maximize = kw.pop("maximize", False)
    options = dict(
        lr=1e-2,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=kw.pop("weight_decay", 0.0),
        snr_beta=kw.pop("snr_beta", 0.99),
        gate_rule=kw.pop("gate"),
        tau=kw.pop("tau", 1.0),
        gate_a=kw.pop("gate_a", 1.0),
        warmup_steps=kw.pop("warmup_steps", 0),
        noise=kw.pop("noise"),
    )
    assert not kw
    out = [p.detach().clone() for p in params]
    states = [{} for _ in out]
    for t in range(steps):
        for q, g, st in zip(out, _grads([p.shape for p in out], t), states):
            rule.snr_adamw_reference_step(q, -g if maximize else g, st, **options)
    return out


def _with_kernel(name, params, kw, steps, **opt_kw):
    """``params`` stepped ``steps`` times by one kernel, called through its interface."""
    kw = dict(kw)
    opt = SNRAdamW(params, lr=1e-2, weight_decay=kw.pop("weight_decay", 0.0), **kw, **opt_kw)
    kernels = opt._kernels
    kernel = {"torch": kernels.torch, "chunked": kernels.chunked, **kernels.device}[name]
    group = opt.param_groups[0]
    with torch.no_grad():  # as inside optimizer.step()
        for t in range(steps):
            kernels.begin_step(True, t + 1)
            kernel.step(group, params, _grads([p.shape for p in params], t))
    return opt


def _params(seed=0):
    torch.manual_seed(seed)
    # a matrix, a vector, a 3-D tensor and a single element
    return [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (11,), (2, 3, 4), (1,))]


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-tensor"])
@pytest.mark.parametrize("kw", RULES, ids=_ids)
def test_torch_kernel_equals_the_reference(kw, foreach):
    params = _params()
    ref = _reference(params, kw, STEPS)
    _with_kernel("torch", params, kw, STEPS, foreach=foreach)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", RULES, ids=_ids)
def test_chunked_kernel_equals_the_reference_and_the_torch_kernel_bit_for_bit(kw, monkeypatch):
    """Chunks of at most 40 elements (the 7 x 5 matrix alone, the other three together),
    their temporaries in the reused buffers: the torch kernel's bits."""
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 0)  # the reused buffers always
    params, twin = _params(), _params()
    ref = _reference(params, kw, STEPS)
    _with_kernel("chunked", params, kw, STEPS)
    _with_kernel("torch", twin, kw, STEPS)
    for p, q, r in zip(params, twin, ref):
        assert torch.equal(p, q)
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", [RULES[0], RULES[5]], ids=_ids)
def test_chunked_kernel_steps_large_tensors_in_pieces_like_the_reference(kw, monkeypatch):
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 128)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 64)
    torch.manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(30, 20)), torch.nn.Parameter(torch.randn(9))]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref = _reference(params, kw, STEPS)
    pieces = []
    step = chunked_step.ChunkedStep.pieces
    monkeypatch.setattr(
        chunked_step.ChunkedStep,
        "pieces",
        lambda self, group, p, g: pieces.append(p.numel()) or step(self, group, p, g),
    )
    opt = _with_kernel("chunked", params, kw, STEPS)
    _with_kernel("torch", twin, kw, STEPS)
    assert set(pieces) == {600}  # the matrix went in pieces of 128 elements
    assert int(opt.state[params[0]]["step"]) == STEPS  # its step advanced once per step
    for p, q, r in zip(params, twin, ref):
        assert torch.equal(p, q)
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["compile", "triton"])
@pytest.mark.parametrize("kw", DEVICE_RULES, ids=["innovation-wiener", "second_moment-clamp"])
def test_device_kernels_equal_the_reference(name, kw):
    params = _params()
    ref = _reference(params, kw, STEPS)
    opt = _with_kernel(name, params, kw, STEPS, kernels=name)
    for p, q in zip(params, ref):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
    assert all(float(opt.state[p]["step"]) == STEPS for p in params)  # steps on the device


def test_chunks_pack_small_tensors_into_the_large_ones_chunks(monkeypatch):
    """First fit, largest first: biases and norm scales join a matrix's chunk (each chunk
    costs the same ~20 multi-tensor calls whatever its size); a chunk stays within the limit
    unless one tensor alone exceeds it; within a chunk the tensors keep their order."""
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 100)
    sizes = [60, 5, 90, 5, 30, 150, 8]
    chunks = chunked_step._chunks(list(range(len(sizes))), sizes)
    assert chunks == [([5], 150), ([2, 6], 98), ([0, 1, 3, 4], 100)]
    assert chunked_step._chunks([0, 1], [40, 50]) == [([0, 1], 90)]  # all in one
