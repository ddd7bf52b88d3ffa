"""`snr_dist.grad_mode.no_grad`: the step's helpers run without autograd, called from the step
or on their own."""

import pickle

import pytest
import torch

from snr_dist import subspace
from snr_dist.grad_mode import no_grad


@no_grad
def _double_(t: torch.Tensor) -> bool:
    t.mul_(2.0)
    return torch.is_grad_enabled()


def test_turns_gradients_off_inside_and_restores_them_after():
    view = torch.ones(3)
    assert torch.is_grad_enabled()
    assert _double_(view) is False
    assert torch.is_grad_enabled()
    with torch.no_grad():
        assert _double_(view) is False
        assert not torch.is_grad_enabled()
    assert torch.equal(view, torch.full((3,), 4.0))


def test_restores_gradients_when_the_function_raises():
    @no_grad
    def fails():
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fails()
    assert torch.is_grad_enabled()


def test_keeps_the_name_docstring_and_picklability_of_what_it_wraps():
    assert subspace.apply_gates.__name__ == "apply_gates"
    assert "g_perp" in subspace.apply_gates.__doc__
    assert pickle.loads(pickle.dumps(subspace.apply_gates)) is subspace.apply_gates


def test_a_helper_called_with_gradients_on_records_no_graph():
    state: dict = {}
    subspace.init_tracker(
        state, (8, 4), (8, 4), dict(basis_side="auto", rank=2, seed=0), "cpu", 0, "innovation"
    )
    direction = torch.randn(8, 4, requires_grad=True)
    out = torch.zeros(8, 4)
    subspace.apply_gates(state, direction, torch.full((3,), 0.5), out=out)
    assert not out.requires_grad and out.grad_fn is None
