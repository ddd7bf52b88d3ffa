"""The optimizer step on a CUDA GPU: what the CPU tests can only check by construction.

Skipped without CUDA, and under Triton's interpreter (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` unless it is set: run these with ``TRITON_INTERPRET=0``, as
``launch/gpu_checks.sh`` does). Checked here: the default step (the Triton kernel) and
``kernels="compile"`` never synchronise the host with the device
(``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising call); both equal
the torch path; a NaN gradient is skipped on the device with the torch path's semantics.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="Triton's interpreter is on (tests/conftest.py): run with TRITON_INTERPRET=0",
    ),
]


def _model():
    from snr_dist.experiments.models import GPT

    torch.manual_seed(0)
    return GPT(64, 32, 64, 2, 2).cuda()


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (4, 33), generator=g).cuda() for _ in range(n)]


def _backward(model, idx):
    out = model(idx[:, :-1])
    F.cross_entropy(out.reshape(-1, 64), idx[:, 1:].reshape(-1)).backward()


def _train(kernels: str, steps: int = 12, nan_at: int | None = None):
    from snr_dist import SNRAdamW

    model = _model()
    opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, kernels=kernels)
    sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5)
    for i, idx in enumerate(_batches(steps)):
        opt.zero_grad()
        _backward(model, idx)
        if i == nan_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
        sched.step()
    return model, opt


@pytest.mark.parametrize("kernels", ["auto", "compile"])
def test_the_step_never_syncs_the_host_with_the_gpu(kernels):
    from snr_dist import SNRAdamW

    model = _model()
    opt = SNRAdamW(model.parameters(), lr=1e-3, kernels=kernels)
    data = _batches(4)
    for idx in data[:3]:  # warm-up: state, kernel tuning, compilation, the step table
        opt.zero_grad()
        _backward(model, idx)
        opt.step()
    opt.zero_grad()
    _backward(model, data[3])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(st["step"].is_cuda for st in opt.state.values())


@pytest.mark.parametrize("kernels", ["auto", "compile"])
def test_gpu_steps_equal_the_torch_path(kernels):
    a, _ = _train(kernels)
    b, _ = _train("torch")
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", ["auto", "compile"])
def test_a_nan_gradient_is_skipped_on_the_gpu_as_on_the_torch_path(kernels):
    a, opt_a = _train(kernels, nan_at=5)
    b, opt_b = _train("torch", nan_at=5)
    first_a, first_b = next(a.parameters()), next(b.parameters())
    assert opt_a.nonfinite_skips[first_a] == opt_b.nonfinite_skips[first_b] == 1
    assert float(opt_a.state[first_a]["step"]) == float(opt_b.state[first_b]["step"]) == 11
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
