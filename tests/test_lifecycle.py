"""What torch.optim's own tests do to an optimizer: copies, pickles, garbage collection,
add_param_group, schedulers that cycle betas, option changes after the first step.

Each test here reproduced a defect: on b673a1b (issue 12, point 3 and 4), and complex
parameters on 17ad480."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp

from snr_dist import SNRAdamW, SNRPreconditioner

KINDS = [
    dict(),
    dict(mode="subspace", rank=3, refresh_every=3),
    dict(estimator="cross_sample"),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=3),
]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


def _snr_adamw(model, kw):
    return SNRAdamW(model.parameters(), lr=1e-2, **kw)


def _wrapped_sgd(model, kw):
    return SNRPreconditioner(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **kw)


MAKERS = {"SNRAdamW": _snr_adamw, "SNRPreconditioner": _wrapped_sgd}


@pytest.mark.parametrize("kw", KINDS, ids=_ids)
@pytest.mark.parametrize("maker", list(MAKERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_training_like_the_original(how, maker, kw):
    """The copy (made with its model, as a trainer checkpoints both) steps, saves a
    state_dict, and trains exactly as the original does from then on; the original's
    hooks never see the copy's backward passes."""
    model = tiny_mlp()
    opt = MAKERS[maker](model, kw)
    data = batches(8, micro=2)
    run(model, opt, data[:4])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.state_dict()  # AttributeError: gather_state_dict on b673a1b
    run(model2, opt2, data[4:])  # the copied SNRPreconditioner had no base on b673a1b
    run(model, opt, data[4:])
    assert max_diff(model, model2) == 0.0
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd.keys() == sd2.keys()


@pytest.mark.parametrize("maker", list(MAKERS))
def test_a_deleted_optimizer_is_collected_and_its_hooks_removed(maker):
    model = tiny_mlp()
    opt = MAKERS[maker](model, dict(estimator="cross_sample"))
    run(model, opt, batches(2, micro=2))
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None, "the gradient hooks kept the optimizer alive"
    assert all(not p._backward_hooks for p in model.parameters())
    torch.nn.functional.cross_entropy(
        model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])
    ).backward()


def test_close_removes_the_hooks_and_is_idempotent():
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), estimator="cross_sample")
    assert all(p._backward_hooks for p in model.parameters())
    opt.close()
    opt.close()
    assert all(not p._backward_hooks for p in model.parameters())


@pytest.mark.parametrize("maker", list(MAKERS))
def test_add_param_group_validates_before_it_changes_anything(maker):
    model = tiny_mlp()
    opt = MAKERS[maker](model, {})
    extra = torch.nn.Parameter(torch.randn(3, 4))
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="Invalid tau: -1"):
        opt.add_param_group({"params": [extra], "tau": -1})
    assert len(opt.param_groups) == n
    if maker == "SNRPreconditioner":
        assert len(opt.base.param_groups) == n
    run(model, opt, batches(3))  # still steps, with the groups it had
    opt.add_param_group({"params": [extra], "tau": 2.0})
    assert opt.param_groups[-1]["tau"] == 2.0


@pytest.mark.parametrize("kw", [dict(), dict(mode="subspace", rank=3, refresh_every=3)], ids=_ids)
def test_one_cycle_lr_cycling_betas_keeps_the_state_layout(kw):
    """snr_beta == betas[0] shares Adam's first moment; OneCycleLR starts betas[0] at its
    max_momentum (0.95) and then moves it away from snr_beta every step (KeyError: 'snr_avg'
    at step 2 on b673a1b)."""
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, betas=(0.95, 0.999), snr_beta=0.95, **kw)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=30)
    assert opt.param_groups[0]["betas"][0] == 0.95
    run(model, opt, batches(30), scheduler=sched)
    assert opt.param_groups[0]["betas"][0] != 0.95  # the scheduler did move it
    keys = set(opt.state[model[0].weight])
    assert "snr_avg" not in keys  # the layout chosen at the first step stayed
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "change",
    [("mode", "subspace"), ("estimator", "cross_sample"), ("rank", 2)],
    ids=lambda c: f"{c[0]}={c[1]}",
)
def test_layout_options_changed_after_the_first_step_are_refused_clearly(change):
    key, value = change
    model = tiny_mlp()
    start = dict(mode="subspace", rank=3) if key == "rank" else {}
    opt = SNRAdamW(model.parameters(), lr=1e-2, **start)
    run(model, opt, batches(2, micro=2))
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=rf"{key}.*after the first step"):
        run(model, opt, batches(1, micro=2))


def test_non_layout_options_may_change_between_steps():
    """tau, gate, warmup_steps and snr_beta are read each step (schedulers may drive them)."""
    model, ref = tiny_mlp(), tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2)
    ref_opt = SNRAdamW(ref.parameters(), lr=1e-2, tau=3.0, gate="clamp")
    data = batches(6)
    run(model, opt, data[:1])
    run(ref, ref_opt, data[:1])  # step 1: gates are 1 for both
    opt.param_groups[0].update(tau=3.0, gate="clamp")
    run(model, opt, data[1:])
    run(ref, ref_opt, data[1:])
    assert max_diff(model, ref) == 0.0


@pytest.mark.parametrize(
    "maker",
    [lambda ps: SNRAdamW(ps), lambda ps: SNRPreconditioner(torch.optim.Adam(ps))],
    ids=["SNRAdamW", "SNRPreconditioner"],
)
def test_complex_parameters_are_refused_not_trained_on_their_real_part(maker):
    """The statistics are real: a complex gradient cast to them loses its imaginary part, and
    SNRAdamW then never moved it (torch's AdamW steps complex parameters as pairs of reals)."""
    z = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"complex parameters \(got torch.complex64 of shape"):
        maker([z])
    opt = maker([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="view_as_real"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_the_preconditioners_state_dict_hooks_run_as_torchs_do():
    """SNRPreconditioner writes and reads its own state dict; the hooks registered on it (as
    frameworks do, e.g. to rename keys) ran on 17ad480 for neither."""
    model = tiny_mlp()
    opt = SNRPreconditioner(torch.optim.Adam(model.parameters(), lr=1e-2))
    run(model, opt, batches(2))
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: calls.append("load pre") or {k: v for k, v in sd.items() if k != "tag"}
    )
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    sd = opt.state_dict()
    assert sd["tag"] == 1 and calls == ["save pre"]
    opt.load_state_dict(sd)  # the pre-hook strips the tag; without it the load would refuse
    assert calls == ["save pre", "load pre", "load post"]
