"""torch.optim's contract, checked over every optimizer and configuration snr-dist offers.

torch's own generic optimizer suite (``test/test_optim.py``, driven by the ``OptimizerInfo``
records of ``torch/testing/_internal/common_optimizers.py``) runs the same checks over every
optimizer torch ships. This module asks them of SNRAdamW and SNRPreconditioner in their
configurations (diagonal and subspace modes, temporal and cross-sample estimators, the gate
rules, both noise models, ``foreach`` and ``kernels="torch"``, bf16 parameters, bf16 state:
``state_dtype="bfloat16"``) and of
SNRPreconditioner around every torch optimizer it supports:

- ``state_dict`` round trips through ``torch.save`` / ``torch.load(weights_only=True)``: every
  state entry comes back with its dtype, device and value, and the loaded optimizer continues
  bit for bit as the uninterrupted one; ``deepcopy`` and ``pickle`` likewise;
- the state-dict hooks of every kind (pre/post, save/load, ``prepend``), each run once;
  entries in ``optimizer.state`` that are not tensors (torch's optimizers keep them);
- step hooks, per instance and global, each run exactly once per step, in torch's order;
- LR and momentum schedulers (the ungated configuration equals the torch optimizer under the
  same schedule), attached to the wrapper or to its base;
- zero and ``None`` gradients, closures, ``add_param_group``, ``zero_grad(set_to_none=...)``,
  and torch's refusals (an empty parameter list, a parameter in two groups).

Tiny models and few steps: the module takes about half a minute on one core.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pickle
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from snr_dist import SNRAdamW, SNRPreconditioner

LR = 1e-2


# ---------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    """One optimizer configuration: ``make(params)`` builds it (``params`` as torch's
    optimizers take them: tensors or param-group dicts), ``reference(params)`` the ungated
    torch optimizer it reduces to."""

    id: str
    make: Callable
    reference: Callable
    micro: int = 1  # backward passes per step (cross-sample needs >= 2)
    matrices_only: bool = False  # Muon steps weight matrices only
    dtype: torch.dtype = torch.float32
    momentum: bool = True  # its groups carry a momentum or betas a scheduler can cycle

    @property
    def wrapper(self) -> bool:
        return self.id.startswith("pre-")


def _adamw(**snr) -> tuple[Callable, Callable]:
    wd = snr.pop("weight_decay", 1e-2)
    return (
        lambda ps: SNRAdamW(ps, lr=LR, weight_decay=wd, **snr),
        lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=wd),
    )


def _wrapped(base: Callable, **snr) -> tuple[Callable, Callable]:
    return (lambda ps: SNRPreconditioner(base(ps), **snr), base)


SUB = dict(mode="subspace", rank=2, refresh_every=3)
CROSS = dict(estimator="cross_sample")

ADAMW_CASES = [
    Case("adamw-diagonal", *_adamw()),
    Case("adamw-subspace", *_adamw(**SUB)),
    Case("adamw-cross", *_adamw(**CROSS), micro=2),
    Case("adamw-cross-subspace", *_adamw(**CROSS, **SUB), micro=2),
    Case(
        "adamw-second_moment-hard-shared", *_adamw(noise="second_moment", gate="hard", snr_beta=0.9)
    ),
    Case("adamw-second_moment-subspace", *_adamw(noise="second_moment", **SUB)),
    Case("adamw-paper", *_adamw(gate="paper", gate_a=0.5)),
    Case(
        "adamw-clamp-cols-closed",
        *_adamw(gate="clamp", tau=0.5, basis_side="cols", complement="closed", **SUB),
    ),
    Case("adamw-none", *_adamw(gate="none", weight_decay=0.1)),
    Case("adamw-foreach_off-subspace", *_adamw(foreach=False, **SUB)),
    Case("adamw-torch_kernels-warmup", *_adamw(kernels="torch", warmup_steps=2)),
    Case("adamw-bf16-subspace", *_adamw(**SUB), dtype=torch.bfloat16),
    Case("adamw-state_bf16", *_adamw(state_dtype="bfloat16")),
    Case(
        "adamw-state_bf16-cross-subspace",
        *_adamw(state_dtype="bfloat16", **CROSS, **SUB),
        micro=2,
    ),
    Case(
        "adamw-state_bf16-second_moment-bf16_params",
        *_adamw(state_dtype="bfloat16", noise="second_moment"),
        dtype=torch.bfloat16,
    ),
]

PRECONDITIONER_CASES = [
    Case("pre-sgd", *_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.05)), momentum=False),
    Case(
        "pre-sgd_momentum-subspace",
        *_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), **SUB),
    ),
    Case(
        "pre-sgd_nesterov-cross",
        *_wrapped(
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
            **CROSS,
        ),
        micro=2,
    ),
    Case(
        "pre-adam-second_moment",
        *_wrapped(lambda ps: torch.optim.Adam(ps, lr=LR), noise="second_moment"),
    ),
    Case(
        "pre-adamw-cross-subspace",
        *_wrapped(lambda ps: torch.optim.AdamW(ps, lr=LR), **CROSS, **SUB),
        micro=2,
    ),
    Case(
        "pre-nadam-clamp", *_wrapped(lambda ps: torch.optim.NAdam(ps, lr=LR), gate="clamp", tau=0.5)
    ),
    Case("pre-radam-paper", *_wrapped(lambda ps: torch.optim.RAdam(ps, lr=LR), gate="paper")),
    Case("pre-adamax-hard", *_wrapped(lambda ps: torch.optim.Adamax(ps, lr=LR), gate="hard")),
    Case("pre-adagrad", *_wrapped(lambda ps: torch.optim.Adagrad(ps, lr=LR)), momentum=False),
    Case(
        "pre-adadelta-subspace",
        *_wrapped(lambda ps: torch.optim.Adadelta(ps, lr=1.0), **SUB),
        momentum=False,
    ),
    Case(
        "pre-rmsprop-cross",
        *_wrapped(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5), **CROSS),
        micro=2,
    ),
    Case("pre-asgd", *_wrapped(lambda ps: torch.optim.ASGD(ps, lr=LR)), momentum=False),
    Case(
        "pre-rprop-subspace",
        *_wrapped(lambda ps: torch.optim.Rprop(ps, lr=LR), **SUB),
        momentum=False,
    ),
    Case(
        "pre-adafactor",
        *_wrapped(lambda ps: torch.optim.Adafactor(ps, lr=LR), gate="paper"),
        momentum=False,
    ),
    Case(
        "pre-muon-subspace",
        *_wrapped(lambda ps: torch.optim.Muon(ps, lr=LR), **SUB),
        matrices_only=True,
    ),
    Case(
        "pre-article_form",
        lambda ps: SNRPreconditioner(ps, lr=LR, snr_threshold=0.5, rank=2),
        lambda ps: torch.optim.Adam(ps, lr=LR),
    ),
]
CASES = ADAMW_CASES + PRECONDITIONER_CASES
SUPPORTED_BASES = [  # every torch optimizer SNRPreconditioner supports has a case above
    "SGD", "Adam", "AdamW", "NAdam", "RAdam", "Adamax", "Adagrad", "Adadelta", "RMSprop",
    "ASGD", "Rprop", "Adafactor", "Muon",
]  # fmt: skip
REFUSED_BASES = ["LBFGS", "SparseAdam"]


def cases(*, only: Callable[[Case], bool] = lambda c: True):
    return pytest.mark.parametrize("case", [c for c in CASES if only(c)], ids=lambda c: c.id)


# ---------------------------------------------------------------- models, data, training
def model_for(case: Case, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    bias = not case.matrices_only
    model = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))
    return model.to(case.dtype)


def batch(step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def loss_of(model: nn.Module, step: int, micro: int, scale: float = 1.0) -> torch.Tensor:
    x, y = batch(step, micro)
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - y).square().mean() * scale


def backward(case: Case, model: nn.Module, opt, step: int, scale: float = 1.0) -> torch.Tensor:
    """One step's backward passes (``case.micro`` micro-batches, declared to the
    cross-sample estimator through ``opt.microbatch``)."""
    total = 0.0
    for m in range(case.micro):
        declared = case.micro > 1 and hasattr(opt, "microbatch")  # not the torch reference
        with opt.microbatch(8) if declared else contextlib.nullcontext():
            loss = loss_of(model, step, m, scale / case.micro)
            loss.backward()
        total = total + loss.detach()
    return total


def train(case: Case, model: nn.Module, opt, steps: range) -> None:
    for t in steps:
        opt.zero_grad()
        backward(case, model, opt, t)
        opt.step()


def built(case: Case, seed: int = 0):
    model = model_for(case, seed)
    return model, case.make(model.parameters())


# ---------------------------------------------------------------- exact comparisons
def states(opt) -> list[dict]:
    """The optimizer's state dicts to compare: its own, and the base's under the wrapper."""
    return [opt.state, opt.base.state] if isinstance(opt, SNRPreconditioner) else [opt.state]


def params_of(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def assert_same_value(a, b, where: str) -> None:
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b), where
        # dtype, device, shape and every bit (NaN equal to NaN)
        torch.testing.assert_close(
            a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}"
        )
    else:
        assert type(a) is type(b) and a == b, (where, a, b)


def assert_same_state(opt_a, opt_b) -> None:
    """Every state entry of ``opt_b`` is that of ``opt_a``: same keys, and per key the same
    dtype, device and value (parameters matched by position)."""
    pa, pb = params_of(opt_a), params_of(opt_b)
    ia, ib = ({id(p): i for i, p in enumerate(ps)} for ps in (pa, pb))
    for which, (sa, sb) in enumerate(zip(states(opt_a), states(opt_b))):
        keys_a = {ia[id(k)] if torch.is_tensor(k) else k for k in sa}
        keys_b = {ib[id(k)] if torch.is_tensor(k) else k for k in sb}
        assert keys_a == keys_b, (which, keys_a, keys_b)
        for i, (p, q) in enumerate(zip(pa, pb)):
            if p not in sa:
                continue
            assert set(sa[p]) == set(sb[q]), (which, i, set(sa[p]) ^ set(sb[q]))
            for k in sa[p]:
                assert_same_value(sa[p][k], sb[q][k], f"state {which} param {i} {k!r}")
        for k in sa:
            if not torch.is_tensor(k):
                assert_same_value(sa[k], sb[k], f"state {which} entry {k!r}")
    groups_a = [{k: v for k, v in g.items() if k != "params"} for g in opt_a.param_groups]
    groups_b = [{k: v for k, v in g.items() if k != "params"} for g in opt_b.param_groups]
    assert groups_a == groups_b


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for i, (p, q) in enumerate(zip(a.parameters(), b.parameters())):
        assert_same_value(p.detach(), q.detach(), f"parameter {i}")


def saved_and_loaded(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snr_state(sd: dict) -> dict:
    """Where a state dict keeps the optimizer's own per-parameter state."""
    return sd["snr"]["state"] if "snr" in sd else sd["state"]


def saved_groups(sd: dict) -> list[dict]:
    return sd["base"]["param_groups"] if "snr" in sd else sd["param_groups"]


def all_finite(model: nn.Module, opt) -> bool:
    values = [p.detach() for p in model.parameters()]
    for st in states(opt):
        for p, entry in st.items():
            if torch.is_tensor(p):
                values += [
                    v for v in entry.values() if torch.is_tensor(v) and v.is_floating_point()
                ]
    return all(bool(torch.isfinite(v).all()) for v in values)


# ---------------------------------------------------------------- state_dict, copies, pickles
@cases()
def test_state_dict_round_trip_is_exact_and_continues_bit_identically(case):
    """Saved with torch.save, read back with ``torch.load(weights_only=True)`` into a fresh
    optimizer on differently initialised parameters: every state entry (the trackers' bool
    ``basis_rows``, fp32 statistics of bf16 parameters, the base's state) comes back with
    its dtype, device and value, and training continues bit for bit as without the break."""
    full, full_opt = built(case)
    train(case, full, full_opt, range(9))

    first, opt = built(case)
    train(case, first, opt, range(5))
    sd = opt.state_dict()
    ckpt = saved_and_loaded({"model": first.state_dict(), "opt": sd})
    resumed, opt2 = built(case, seed=11)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert_same_state(opt, opt2)
    # and again: the loaded optimizer's state_dict is the one it was loaded from
    again = saved_and_loaded(opt2.state_dict())
    _, opt3 = built(case, seed=12)
    opt3.load_state_dict(again)
    assert_same_state(opt, opt3)

    train(case, resumed, opt2, range(5, 9))
    assert_same_params(full, resumed)
    assert_same_state(full_opt, opt2)


@cases()
def test_a_state_dict_with_plain_number_steps_loads_and_continues(case):
    """State dicts of older torch releases hold ``step`` as a Python number; torch's
    optimizers load them (as tensors), and so do these, the base's included."""
    full, full_opt = built(case)
    train(case, full, full_opt, range(6))
    first, opt = built(case)
    train(case, first, opt, range(3))
    sd = saved_and_loaded(opt.state_dict())
    converted = 0
    for st in [snr_state(sd), *([sd["base"]["state"]] if "snr" in sd else [])]:
        for entry in st.values():
            if isinstance(entry, dict) and torch.is_tensor(entry.get("step")):
                entry["step"] = entry["step"].item()
                converted += 1
    assert converted >= len(params_of(opt))
    resumed, opt2 = built(case, seed=11)
    resumed.load_state_dict(first.state_dict())
    opt2.load_state_dict(sd)
    assert_same_state(opt, opt2)
    train(case, resumed, opt2, range(3, 6))
    assert_same_params(full, resumed)


@cases()
def test_deepcopy_and_pickle_continue_bit_identically(case):
    """A deep copy, and a pickled and unpickled copy, of (model, optimizer) train as the
    original does; a copy has the original's public attributes."""
    model, opt = built(case)
    train(case, model, opt, range(3))
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for _, o in copies:
        assert type(o) is type(opt)
        assert {k for k in vars(o) if not k.startswith("_")} == {
            k for k in vars(opt) if not k.startswith("_")
        }
        assert_same_state(opt, o)
    train(case, model, opt, range(3, 6))
    for m, o in copies:
        train(case, m, o, range(3, 6))
        assert_same_params(model, m)
        assert_same_state(opt, o)


# ---------------------------------------------------------------- hooks
@cases()
def test_state_dict_hooks_each_run_once_and_see_the_final_state_dict(case):
    model, opt = built(case)
    train(case, model, opt, range(2))
    calls = []

    def pre(o):
        calls.append("pre")
        o.state["test"] = 1  # torch's optimizers save entries under other keys as they are

    def post(o, sd):
        calls.append("post")
        sd["ran_pre_hook"] = snr_state(sd).pop("test", None) == 1
        return sd

    def replace(o, sd):  # a post-hook may return another dict, or prune what is saved
        calls.append("replace")
        out = copy.copy(sd)
        snr_state(out).pop(0)
        return out

    h_pre = opt.register_state_dict_pre_hook(pre)
    h_post = opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["ran_pre_hook"] is True
    assert "test" not in snr_state(sd)
    h_replace = opt.register_state_dict_post_hook(replace, prepend=True)
    calls.clear()
    sd = opt.state_dict()
    assert calls == ["pre", "replace", "post"]
    assert 0 not in snr_state(sd) and 1 in snr_state(sd)
    for h in (h_pre, h_post, h_replace):
        h.remove()
    calls.clear()
    sd = opt.state_dict()
    assert calls == [] and 0 in snr_state(sd) and snr_state(sd)["test"] == 1


@cases()
def test_load_state_dict_hooks_each_run_once_in_order(case):
    model, opt = built(case)
    train(case, model, opt, range(2))
    sd = saved_and_loaded(opt.state_dict())
    calls = []

    def set_lr(o, sd):
        calls.append("set_lr")
        saved_groups(sd)[0]["lr"] = 0.002  # in place, on torch's shallow copy

    def copy_lr(o, sd):
        calls.append("copy_lr")
        out = copy.deepcopy(sd)
        saved_groups(out)[0]["lr"] = 0.003
        return out

    def post(o):
        params = params_of(o)
        calls.append("post")
        # the load is complete when post-hooks run: the state is what was saved
        saved = snr_state(sd)[0]
        for k, v in saved.items():
            assert_same_value(o.state[params[0]][k], v, f"post-hook sees {k!r}")
        o.state["loaded_lr"] = o.param_groups[0]["lr"]

    opt2 = built(case, seed=3)[1]
    opt2.register_load_state_dict_pre_hook(set_lr)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert calls == ["set_lr", "post"] and opt2.state["loaded_lr"] == 0.002
    opt2.register_load_state_dict_pre_hook(copy_lr, prepend=True)
    calls.clear()
    opt2.load_state_dict(sd)
    assert calls == ["copy_lr", "set_lr", "post"] and opt2.param_groups[0]["lr"] == 0.002


@cases()
def test_non_tensor_state_entries_are_saved_loaded_and_stepped_past(case):
    """torch's optimizers allow entries that are not tensors in ``optimizer.state``, under
    keys that are not parameters (torch's hook tests write ``state["test"] = 1``) and inside
    a parameter's state; they are saved and loaded as they are, and steps, copies and
    metrics go on around them."""
    model, opt = built(case)
    train(case, model, opt, range(2))
    w = params_of(opt)[0]
    opt.state["test"] = 1
    opt.state[w]["note"] = 7  # (torch mangles a str here: it casts iterables)
    opt.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("ran_post_hook", True))
    sd = saved_and_loaded(opt.state_dict())
    assert snr_state(sd)["test"] == 1 and snr_state(sd)[0]["note"] == 7
    opt.load_state_dict(sd)  # a post-hook writes one more
    assert opt.state["ran_post_hook"] is True and opt.state["test"] == 1
    assert opt.state[w]["note"] == 7
    other, opt2 = built(case, seed=4)
    other.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved_and_loaded(sd))  # its own tensors: a load shares the dict's
    assert opt2.state["test"] == 1 and opt2.state[params_of(opt2)[0]]["note"] == 7
    for m, o in ((model, opt), (other, opt2)):
        train(case, m, o, range(2, 4))
        assert o.state["test"] == 1
        o.metrics()
        copy.deepcopy(o).state_dict()
    assert_same_params(model, other)


@cases()
def test_step_hooks_run_once_per_step_in_torchs_order(case):
    """Global hooks (``register_optimizer_step_pre_hook`` / ``_post_hook``) and the
    optimizer's own run exactly once per step, in torch's order; so do hooks registered on
    the wrapper's base optimizer, inside the wrapper's step."""
    model, opt = built(case)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global pre", type(o)))),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", type(o)))),
        opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", type(o)))),
        opt.register_step_post_hook(lambda o, a, k: calls.append(("post", type(o)))),
    ]
    inner = []
    if case.wrapper:
        handles += [
            opt.base.register_step_pre_hook(lambda o, a, k: inner.append("base pre")),
            opt.base.register_step_post_hook(lambda o, a, k: inner.append("base post")),
        ]
    try:
        for t in range(3):
            opt.zero_grad()
            backward(case, model, opt, t)
            opt.step()
            me = type(opt)
            assert calls == [("global pre", me), ("pre", me), ("post", me), ("global post", me)]
            assert inner == (["base pre", "base post"] if case.wrapper else [])
            calls.clear()
            inner.clear()
    finally:
        for h in handles:
            h.remove()
    opt.zero_grad()
    backward(case, model, opt, 3)
    opt.step()
    assert calls == [] and inner == []


@cases(
    only=lambda c: (
        c.id in ("adamw-cross-subspace", "pre-sgd_nesterov-cross", "pre-adam-second_moment")
    )
)
def test_a_step_pre_hook_may_replace_the_arguments(case):
    """torch lets a pre-hook return ``(args, kwargs)`` for the step: here, the closure."""
    model, opt = built(case)
    loss = torch.tensor(7.0)

    def closure():
        opt.zero_grad()
        backward(case, model, opt, 0)
        return loss

    opt.register_step_pre_hook(lambda o, args, kwargs: (args, {"closure": closure}))
    assert opt.step() is loss
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- schedulers
SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.02, total_steps=8, cycle_momentum=True
    ),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1.0 + t)),
}
SCHEDULED = [  # gate="none": each equals its torch optimizer under the same schedule
    Case("adamw-none", *_adamw(gate="none")),
    Case(
        "pre-sgd_momentum-none",
        *_wrapped(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), gate="none"),
    ),
    Case(
        "pre-adam-none-subspace",
        *_wrapped(lambda ps: torch.optim.Adam(ps, lr=LR), gate="none", **SUB),
    ),
    Case(
        "pre-rmsprop-none-cross",
        *_wrapped(lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5), gate="none", **CROSS),
        micro=2,
    ),
    Case(
        "pre-adagrad-none",
        *_wrapped(lambda ps: torch.optim.Adagrad(ps, lr=LR), gate="none"),
        momentum=False,
    ),
]


def _hyper(opt) -> list[tuple]:
    return [(g["lr"], g.get("momentum"), g.get("betas")) for g in opt.param_groups]


@pytest.mark.parametrize("where", ["optimizer", "base"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("case", SCHEDULED, ids=lambda c: c.id)
def test_schedulers_drive_lr_and_momentum_as_on_the_torch_optimizer(case, name, where):
    """Under a scheduler (OneCycleLR cycling the momentum or ``betas[0]`` too) the ungated
    configuration makes the torch optimizer's updates with the same hyper-parameters at
    every step: bit for bit for the wrapper, to float rounding for SNRAdamW (its own
    arithmetic). The wrapper's scheduler may be attached to its base (shared groups), and
    neither warns that the optimizer did not step."""
    if where == "base" and not case.wrapper:
        pytest.skip("only the wrapper has a base optimizer")
    if name == "OneCycleLR" and not case.momentum:
        pytest.skip("OneCycleLR cycles a momentum this optimizer does not have")
    model, opt = built(case)
    ref_model = model_for(case)
    ref = case.reference(ref_model.parameters())
    sched = SCHEDULERS[name](opt.base if where == "base" else opt)
    ref_sched = SCHEDULERS[name](ref)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()" and kin
        warnings.filterwarnings("error", message=r".*optimizer\.step\(\)")
        for t in range(8):
            assert _hyper(opt) == _hyper(ref)
            for m, o, s in ((model, opt, sched), (ref_model, ref, ref_sched)):
                o.zero_grad()
                backward(case, m, o, t)
                o.step()
                s.step()
    if case.wrapper:
        assert_same_params(model, ref_model)
    else:
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


@cases(only=lambda c: c.id in ("adamw-subspace", "pre-rmsprop-cross", "pre-muon-subspace"))
def test_a_scheduler_keeps_its_place_through_a_state_dict_round_trip(case):
    """A gated optimizer and its scheduler saved mid-schedule and resumed continue as the
    run without the break."""
    full, opt = built(case)
    sched = SCHEDULERS["OneCycleLR"](opt)
    for t in range(8):
        train(case, full, opt, range(t, t + 1))
        sched.step()
    first, opt1 = built(case)
    sched1 = SCHEDULERS["OneCycleLR"](opt1)
    for t in range(4):
        train(case, first, opt1, range(t, t + 1))
        sched1.step()
    ckpt = saved_and_loaded(
        {"m": first.state_dict(), "o": opt1.state_dict(), "s": sched1.state_dict()}
    )
    resumed, opt2 = built(case, seed=5)
    sched2 = SCHEDULERS["OneCycleLR"](opt2)
    resumed.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    for t in range(4, 8):
        train(case, resumed, opt2, range(t, t + 1))
        sched2.step()
    assert_same_params(full, resumed)
    assert_same_state(opt, opt2)


# ---------------------------------------------------------------- gradients
@cases()
def test_zero_gradients_step_and_move_nothing_the_torch_optimizer_would_not(case):
    """All-zero gradients (real backward passes of a zero loss, so the cross-sample estimator
    sees its micro-batches): every value stays finite, the step counts advance, and where
    the ungated torch optimizer leaves the parameters as they were, so does this one."""
    model, opt = built(case)
    ref_model = copy.deepcopy(model)
    ref = case.reference(ref_model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    for t in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            backward(case, m, o, t, scale=0.0)
            assert all(bool((p.grad == 0).all()) for p in m.parameters())
            o.step()
    assert all_finite(model, opt)
    assert all(int(opt.state[p]["step"]) == 3 for p in params_of(opt))
    for p, q, b in zip(model.parameters(), ref_model.parameters(), before):
        if torch.equal(q.detach(), b):
            assert torch.equal(p.detach(), b)


@cases()
def test_none_gradients_leave_their_parameters_and_state_alone(case):
    model, opt = built(case)
    train(case, model, opt, range(2))
    frozen = list(model[2].parameters())  # the last layer gets no gradient this step
    values = [p.detach().clone() for p in frozen]
    kept = [
        {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st[p].items()}
        for st in states(opt)
        for p in frozen
    ]
    opt.zero_grad()
    backward(case, model, opt, 2)
    for p in frozen:
        p.grad = None
    moving = [p.detach().clone() for p in model[0].parameters()]
    opt.step()
    for p, v in zip(frozen, values):
        assert torch.equal(p.detach(), v)
    now = [st[p] for st in states(opt) for p in frozen]
    for a, b in zip(kept, now):
        assert set(a) == set(b)
        for k in a:
            assert_same_value(a[k], b[k], k)
    assert not all(torch.equal(p.detach(), v) for p, v in zip(model[0].parameters(), moving))
    # no gradient at all: a step is a no-op, as in torch
    opt.zero_grad(set_to_none=True)
    snapshot = copy.deepcopy((model, opt))
    opt.step()
    assert_same_params(model, snapshot[0])
    assert_same_state(snapshot[1], opt)


@cases()
def test_closure_loss_is_returned_and_its_backward_is_what_is_stepped(case):
    """``step(closure)`` runs the closure with gradients enabled (inside the step's
    ``no_grad``), returns what it returned, and steps the gradients its backward made:
    the same as calling the closure first and then ``step()``."""
    model, opt = built(case)
    twin, twin_opt = built(case)
    for t in range(3):
        seen = {}

        def closure(m=model, o=opt, t=t, seen=seen):
            o.zero_grad()
            seen["loss"] = backward(case, m, o, t)
            seen["grad_enabled"] = torch.is_grad_enabled()
            return seen["loss"]

        assert opt.step(closure) is seen["loss"] and seen["grad_enabled"]
        twin_opt.zero_grad()
        backward(case, twin, twin_opt, t)
        twin_opt.step()
        assert_same_params(model, twin)
    assert_same_state(opt, twin_opt)


# ---------------------------------------------------------------- groups and zero_grad
@cases()
def test_add_param_group_trains_as_a_group_present_from_the_start(case):
    """A group added after two steps (its own lr) trains as the same group would have in an
    optimizer built with it, whose parameters had no gradient for those two steps; a
    parameter already in a group is refused, as torch refuses it."""
    first, second = (lambda m: [m[0].weight], lambda m: [m[2].weight])
    if not case.matrices_only:
        first, second = (lambda m: list(m[0].parameters()), lambda m: list(m[2].parameters()))

    late = model_for(case)
    opt = case.make(first(late))
    early = model_for(case)
    opt_early = case.make([{"params": first(early)}, {"params": second(early), "lr": 5e-3}])
    for t in range(5):
        if t == 2:
            opt.add_param_group({"params": second(late), "lr": 5e-3})
        for m, o in ((late, opt), (early, opt_early)):
            o.zero_grad()
            backward(case, m, o, t)
            if t < 2 and o is opt_early:
                for p in second(m):
                    p.grad = None
            o.step()
    assert_same_params(late, early)
    assert_same_state(opt, opt_early)
    assert opt.param_groups[1]["lr"] == 5e-3
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": second(late)[:1]})


@pytest.mark.parametrize("set_to_none", [True, False])
@cases(
    only=lambda c: (
        c.id
        in (
            "adamw-diagonal",
            "adamw-cross-subspace",
            "pre-sgd_nesterov-cross",
            "pre-muon-subspace",
            "pre-rmsprop-cross",
        )
    )
)
def test_zero_grad_clears_gradients_and_the_micro_batches_seen(case, set_to_none):
    """``zero_grad(set_to_none=...)`` leaves None or zero gradients, and whatever backward
    passes came before it do not count in the next step (the cross-sample estimator forgets
    their micro-batches too)."""
    model, opt = built(case)
    twin, twin_opt = built(case)
    for t in range(3):
        backward(case, model, opt, 100 + t)  # a stray backward, then zero_grad
        opt.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in model.parameters()]
        if set_to_none:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and not g.any() for g in grads)
        backward(case, model, opt, t)
        opt.step()
        twin_opt.zero_grad()
        backward(case, twin, twin_opt, t)
        twin_opt.step()
    assert_same_params(model, twin)
    assert_same_state(opt, twin_opt)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "make",
    [
        lambda ps: SNRAdamW(ps),
        lambda ps: SNRPreconditioner(ps),  # the article's form: Adam over the parameters
        lambda ps: SNRPreconditioner(torch.optim.SGD(ps, lr=0.1)),
    ],
    ids=["SNRAdamW", "SNRPreconditioner(params)", "SNRPreconditioner(SGD)"],
)
@pytest.mark.parametrize(
    "params", [lambda: [], lambda: nn.Tanh().parameters()], ids=["empty list", "no parameters"]
)
def test_an_empty_parameter_list_is_refused_as_torch_refuses_it(make, params):
    with pytest.raises(ValueError, match="optimizer got an empty parameter list"):
        make(params())


def test_every_torch_optimizer_is_either_supported_and_tested_or_refused():
    """The lists here (and in docs/options.md) cover every optimizer this torch ships."""
    shipped = {
        name
        for name, cls in vars(torch.optim).items()
        if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
    } - {"Optimizer"}
    tested = {
        type(c.reference([nn.Parameter(torch.zeros(2, 2))])).__name__ for c in PRECONDITIONER_CASES
    }
    assert set(SUPPORTED_BASES) <= tested
    assert shipped <= set(SUPPORTED_BASES) | set(REFUSED_BASES), sorted(shipped)
    assert {"SGD", "Adam", "LBFGS"} <= shipped
    page = (Path(__file__).parents[1] / "docs" / "options.md").read_text()
    section = page.split("### Supported base optimizers")[1].split("\n### ")[0]
    supported, refused = section.split("Refused")
    assert all(f"`{name}`" in supported for name in SUPPORTED_BASES)
    assert all(f"`{name}`" in refused for name in REFUSED_BASES)


@pytest.mark.parametrize(
    "name, make, why",
    [
        ("LBFGS", lambda ps: torch.optim.LBFGS(ps), "re-evaluates the closure"),
        ("SparseAdam", lambda ps: torch.optim.SparseAdam(ps), "sparse gradients"),
    ],
)
def test_unsupported_torch_optimizers_are_refused_naming_them_and_what_works(name, make, why):
    assert name in REFUSED_BASES
    base = make([nn.Parameter(torch.zeros(3, 2))])
    with pytest.raises(TypeError) as e:
        SNRPreconditioner(base)
    msg = str(e.value)
    assert f"cannot wrap {name}" in msg and why in msg
    assert "SGD" in msg and "Adam" in msg and "Muon" in msg  # what it can wrap


def test_muon_as_a_base_trains_its_matrices():
    """torch.optim.Muon (weight matrices only) as the base: with gate="none" it is Muon
    exactly, gated it trains (the loss goes down) and its state round-trips (above)."""
    case = next(c for c in PRECONDITIONER_CASES if c.id == "pre-muon-subspace")
    model, opt = built(case)
    ref_model = model_for(case)
    ref = torch.optim.Muon(ref_model.parameters(), lr=LR)
    ungated_model = model_for(case)
    ungated = SNRPreconditioner(torch.optim.Muon(ungated_model.parameters(), lr=LR), gate="none")
    start = float(loss_of(model, 0, 0).detach())
    for m, o in ((model, opt), (ref_model, ref), (ungated_model, ungated)):
        for _ in range(8):
            o.zero_grad()
            loss_of(m, 0, 0).backward()
            o.step()
    assert_same_params(ungated_model, ref_model)
    end = float(loss_of(model, 0, 0).detach())
    assert math.isfinite(end) and end < start
