"""The cross-sample estimator in the loops frameworks run: a step skipped by a loss scaler and
cleared with ``model.zero_grad()``, a short last accumulation window, a parameter unfrozen
after the optimizer was built."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import batches, run, tiny_mlp

from snr_dist import SNRAdamW

SUBSPACE = dict(mode="subspace", rank=2)


def _loss(model, x, y, parts: int) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(x), y) / parts


def _scaled_loop(model, opt, data, overflow_at: int, clear: str) -> list[bool]:
    """Trainer's fp16 loop on the CPU: scale, backward per micro-batch, unscale, clip, a
    scaler step (skipped on inf), then gradients cleared by ``clear``."""
    scaler = torch.amp.GradScaler("cpu")
    skipped = []
    for i, step in enumerate(data):
        for j, (x, y) in enumerate(step):
            loss = _loss(model, x, y, len(step))
            if i == overflow_at and j == 0:
                loss = loss * 1e38  # overflows once scaled
            scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < before)
        if clear == "model":
            model.zero_grad()  # as transformers.Trainer does: the optimizer is not told
        else:
            opt.zero_grad()
    return skipped


@pytest.mark.parametrize("kw", [{}, SUBSPACE], ids=["diagonal", "subspace"])
def test_a_step_skipped_by_the_loss_scaler_leaves_no_trace(kw):
    """The skipped step's micro-batch sums (inf) are dropped when the next backward finds the
    gradient cleared, whoever cleared it: the run equals one cleared through the optimizer."""
    data = batches(5, micro=2)
    runs = {}
    for clear in ("optimizer", "model"):
        model = tiny_mlp()
        opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample", **kw)
        skipped = _scaled_loop(model, opt, data, overflow_at=1, clear=clear)
        assert skipped == [False, True, False, False, False]
        runs[clear] = (model, opt)
    (a, opt_a), (b, opt_b) = runs["optimizer"], runs["model"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(q).all()
        assert torch.equal(p, q)
    for p, q in zip(a.parameters(), b.parameters()):
        for k, v in opt_a.state[p].items():
            assert torch.equal(v, opt_b.state[q][k]), k


@pytest.mark.parametrize("kw", [{}, SUBSPACE], ids=["diagonal", "subspace"])
def test_a_short_last_accumulation_window_carries_the_statistics_over(kw):
    """Frameworks step on a shorter last window (an epoch of 5 batches, accumulation 2): with
    one micro-batch there is no spread to measure, so the step keeps the noise statistics of
    the previous steps (and says so once) instead of failing."""
    model = tiny_mlp()
    # refreshes at steps 1, 2, 3, 6: none rotates the statistics at the short steps 4 and 5
    opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample", refresh_every=3, **kw)
    run(model, opt, batches(3, micro=2))
    keys = ("raw_avg", "var_avg", "raw_dir", "noise_dir", "raw_energy", "noise_energy")
    before = {p: {k: v.clone() for k, v in opt.state[p].items() if k in keys} for p in opt.state}
    params = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, opt, batches(1, micro=1, seed=7))
        run(model, opt, batches(1, micro=1, seed=8))
    said = [w for w in caught if "fewer than 2 micro-batch" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    for p, stats in before.items():
        assert stats
        assert int(opt.state[p]["step"]) == 5
        for k, v in stats.items():
            assert torch.equal(opt.state[p][k], v), k
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), params))
    run(model, opt, batches(1, micro=2, seed=9))  # full windows fold in again
    changed = [not torch.equal(opt.state[p][k], v) for p, s in before.items() for k, v in s.items()]
    assert all(changed)


def test_the_first_step_with_one_microbatch_still_fails_before_changing_anything():
    """Without earlier statistics one micro-batch is a mistake (no accumulation at all), not a
    short window: it fails as before."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample")
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"needs >= 2 gradient contributions.*saw 1"):
        run(model, opt, batches(1, micro=1))
    for p, before in zip(model.parameters(), params):
        assert torch.equal(p, before)
    assert not any(opt.state.values())


@pytest.mark.parametrize("when", ["after_zero_grad", "before_zero_grad"])
def test_a_parameter_unfrozen_after_the_optimizer_was_built(when):
    """Frozen at construction and unfrozen later without add_param_group (Lightning's
    BaseFinetuning does this): torch's optimizers train it from then on, and so does this one.
    Unfrozen before ``zero_grad`` its micro-batches are seen at once; unfrozen between
    ``zero_grad`` and backward its first step has no noise estimate: it moves only once the
    next step has one, and says so."""
    model = tiny_mlp()
    first = model[0].weight
    first.requires_grad_(False)
    opt = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample", weight_decay=0.0)
    data = batches(4, micro=2)
    run(model, opt, data[:2])
    assert first not in opt.state
    start = first.detach().clone()
    if when == "before_zero_grad":
        first.requires_grad_(True)
    opt.zero_grad()
    if when == "after_zero_grad":
        first.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x, y in data[2]:
            _loss(model, x, y, 2).backward()
        opt.step()
    late = [w for w in caught if "became trainable" in str(w.message)]
    if when == "before_zero_grad":
        assert not late
        assert not torch.equal(first, start)
        assert opt.state[first]["var_avg"].abs().sum() > 0
    else:
        assert len(late) == 1
        assert torch.equal(first, start)  # no noise estimate yet: gate closed
        assert torch.count_nonzero(opt.state[first]["var_avg"]) == 0
    run(model, opt, data[3:])
    assert not torch.equal(first, start)
    assert opt.state[first]["var_avg"].abs().sum() > 0
