"""State dicts that this version did not write: snr-dist 0.1.0's checkpoints (written by that
release, `tests/data/make_checkpoint_v0_1.py`), and state dicts whose ``step`` is a plain number
(as torch's optimizers accept). torch's own optimizers load their older state dicts; so must
these."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).with_name("data")
_spec = importlib.util.spec_from_file_location("v0_1", DATA / "make_checkpoint_v0_1.py")
v0_1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v0_1)


@pytest.fixture
def checkpoint():
    """Fresh for each test: a loaded optimizer steps the state dict's tensors in place (as
    torch's optimizers do with tensors of the parameter's dtype and device)."""
    return torch.load(DATA / "checkpoint_v0_1.pt", weights_only=True)


def _groups(opt):
    return getattr(opt, "base", opt).param_groups


@pytest.mark.parametrize("kind", v0_1.OPTIMIZERS)
def test_a_0_1_checkpoint_resumes_as_0_1_went_on(checkpoint, kind):
    """0.1's param groups have no ``noise`` option: its rule was the second-moment one, which
    this version keeps by that name. Loaded, the run goes on as 0.1 did, to rounding (the step
    has been rearranged since, and its last bits differ from 0.1's from the second step on,
    also from scratch; a state loaded wrongly is off by ~1e-2 here)."""
    saved = checkpoint[kind]
    m = v0_1.model()
    m.load_state_dict(saved["model"])
    opt = v0_1.make_optimizer(kind, m.parameters())  # today's defaults: the innovation rule
    opt.load_state_dict(saved["optimizer"])
    assert all(g["noise"] == "second_moment" for g in _groups(opt))
    v0_1.train(m, opt, range(5, 10))
    for name, value in m.state_dict().items():
        torch.testing.assert_close(value, saved["continued"][name], rtol=1e-5, atol=1e-6)
    # and it saves what it runs: a round trip keeps the rule
    again = v0_1.make_optimizer(kind, v0_1.model().parameters())
    again.load_state_dict(opt.state_dict())
    assert all(g["noise"] == "second_moment" for g in _groups(again))


def _numeric_steps(sd):
    for key, value in sd.items():
        if key == "step" and torch.is_tensor(value):
            sd[key] = value.item()
        elif isinstance(value, dict):
            _numeric_steps(value)
    return sd


@pytest.mark.parametrize("kind", v0_1.OPTIMIZERS)
def test_a_state_dict_with_plain_number_steps_loads_and_resumes_the_same(kind):
    torch.manual_seed(0)
    m = v0_1.model()
    opt = v0_1.make_optimizer(kind, m.parameters())
    v0_1.train(m, opt, range(3))
    sd = opt.state_dict()
    twins = []
    for transform in (copy.deepcopy, lambda s: _numeric_steps(copy.deepcopy(s))):
        m2 = copy.deepcopy(m)
        o2 = v0_1.make_optimizer(kind, m2.parameters())
        o2.load_state_dict(transform(sd))
        v0_1.train(m2, o2, range(3, 6))
        twins.append((m2, o2))
    (a, oa), (b, ob) = twins
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    steps = [st["step"] for st in ob.state.values() if "step" in st]
    assert steps and all(torch.is_tensor(t) and t.dtype == torch.float32 for t in steps)


def test_a_0_1_dcp_checkpoint_loads_into_the_rule_it_was_written_by():
    """`snr_dist.checkpoint` compares the SNR options it saved with the optimizer's: a 0.1
    checkpoint has no ``noise``, which means the second-moment rule, not a mismatch."""
    from snr_dist import SNRAdamW, checkpoint

    m = v0_1.model()
    opt = SNRAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # today's default rule
    with pytest.raises(checkpoint.CheckpointError, match="noise='second_moment' in the checkpoint"):
        checkpoint.load(DATA / "dcp_v0_1", m, opt)
    opt = SNRAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, noise="second_moment")
    assert checkpoint.load(DATA / "dcp_v0_1", m, opt) == 5
    v0_1.train(m, opt, range(5, 10))
    expected = torch.load(DATA / "dcp_v0_1_continued.pt", weights_only=True)
    for name, value in m.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6)


def test_megatron_load_compares_a_0_1_checkpoints_rule_as_second_moment(checkpoint):
    """`snr_dist.megatron.load_snr_state` refuses a checkpoint of another SNR configuration;
    a 0.1 one (no ``noise``) is the second-moment rule: refused by the default rule, loaded by
    that one."""
    megatron = pytest.importorskip("snr_dist.megatron")
    from snr_dist import SNRAdamW

    saved = checkpoint["diagonal"]
    m = v0_1.model()
    m.load_state_dict(saved["model"])
    opt = SNRAdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    with pytest.raises(ValueError, match="noise='second_moment' in the checkpoint but 'inno"):
        megatron.load_snr_state(opt, saved["optimizer"])
    opt = SNRAdamW(m.parameters(), lr=1e-2, weight_decay=0.1, noise="second_moment")
    megatron.load_snr_state(opt, saved["optimizer"])
    v0_1.train(m, opt, range(5, 10))
    for name, value in m.state_dict().items():
        torch.testing.assert_close(value, saved["continued"][name], rtol=1e-5, atol=1e-6)
