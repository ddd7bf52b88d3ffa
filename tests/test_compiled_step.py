"""The device-side diagonal steps: kernels="compile" (one torch.compile'd pass per
parameter) and the Triton step (what kernels="auto" runs on a GPU), neither reading a value
on the host.

Real Inductor (C++ on the CPU); Triton in its interpreter (``tests/conftest.py``). Each
configuration compiles once per process (a cold Inductor cache costs ~20-30 s per
configuration on 2 cores), so the tests share two configurations: the defaults, and the
second-moment rule with its own mean, the clamp gate, ``maximize`` and a warm-up.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp
from distributed_utils import run_distributed

import snr_dist.kernels.compiled as compiled_mod
from snr_dist import SNRAdamW, fsdp
from snr_dist.kernels import step_kernels

DEFAULTS: dict = {}
OTHER = dict(
    noise="second_moment", snr_beta=0.95, gate="clamp", tau=0.5, maximize=True, warmup_steps=3
)


@contextlib.contextmanager
def host_reads():
    """Counts every read of a tensor value on the host (``item``, ``tolist``, ``bool()``, ...):
    on an accelerator each one is a device-to-host sync."""
    count = [0]
    saved = {}
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"):
        saved[name] = orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **k):
            count[0] += 1
            return _orig(self, *a, **k)

        setattr(torch.Tensor, name, counted)
    try:
        yield count
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def _pair(kw, steps=20, scheduler=False):
    data = batches(steps)
    out = []
    for kernels in ("torch", "compile"):
        model = tiny_mlp()
        opt = SNRAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, kernels=kernels, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, 4, gamma=0.5) if scheduler else None
        run(model, opt, data, sched)
        out.append((model, opt))
    return out


@pytest.mark.parametrize("kw", [DEFAULTS, OTHER], ids=["defaults", "second_moment-clamp-max"])
def test_compiled_step_equals_the_torch_path(kw):
    (a, opt_a), (b, opt_b) = _pair(kw, scheduler=True)
    assert max_diff(a, b) <= 1e-5
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert set(sa) == set(sb)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-4, atol=1e-7, msg=k)


@pytest.mark.parametrize("device_path", ["compile", "triton"])
def test_device_steps_read_nothing_on_the_host(device_path):
    """No value is read on the host during a compiled or Triton step (so no device sync on a
    GPU); the counter sees the torch path's reads, so it can fail."""
    reads = {}
    for kernels in ("torch", device_path):
        model = tiny_mlp()
        opt = SNRAdamW(model.parameters(), lr=1e-2, kernels=kernels)
        run(model, opt, batches(3))
        x, y = batches(1, seed=5)[0][0]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        with host_reads() as count:
            opt.step()
        reads[kernels] = count[0]
    assert reads["torch"] > 0
    assert reads[device_path] == 0


def _with_bad_gradients(kernels):
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, kernels=kernels)
    w = model[0].weight
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, step in enumerate(batches(10)):
            opt.zero_grad()
            x, y = step[0]
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i in (3, 6):
                w.grad[1, 2] = float("nan") if i == 3 else float("inf")
            if i == 6:
                before = (w.detach().clone(), {k: v.clone() for k, v in opt.state[w].items()})
            opt.step()
            if i == 6:
                assert torch.equal(w.detach(), before[0])
                for k, v in before[1].items():
                    assert torch.equal(opt.state[w][k], v), k
        during = [str(c.message) for c in caught]
        skips = opt.metrics()["nonfinite_skips"]
        after = [str(c.message) for c in caught]
    return model, opt, skips, during, after


@pytest.mark.parametrize("device_path", ["compile", "triton"])
def test_nonfinite_gradients_are_masked_on_the_device_with_the_same_semantics(device_path):
    a, opt_a, skips_a, during_a, _ = _with_bad_gradients("torch")
    b, opt_b, skips_b, during_b, after_b = _with_bad_gradients(device_path)
    assert skips_a == skips_b == 2
    assert max_diff(a, b) <= 1e-5
    for p, q in zip(a.parameters(), b.parameters()):
        assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"])
    assert float(opt_b.state[b[0].weight]["step"]) == 8.0  # two steps skipped
    assert sum("NaN or Inf" in m for m in during_a) == 1  # the host path warns at once
    assert not any("NaN or Inf" in m for m in during_b)  # the device path when read
    assert sum("NaN or Inf" in m for m in after_b) == 1
    assert opt_b.nonfinite_skips[b[0].weight] == 2


@pytest.mark.parametrize("device_path", ["compile", "triton"])
def test_device_step_state_round_trips_and_resumes_exactly(device_path):
    data = batches(12)
    ref = tiny_mlp()
    opt_ref = SNRAdamW(ref.parameters(), lr=1e-2, kernels=device_path)
    run(ref, opt_ref, data)

    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2, kernels=device_path)
    run(model, opt, data[:6])
    blob = pickle.dumps((model.state_dict(), opt.state_dict()))
    copied = copy.deepcopy(opt)  # torch.optim's own tests deepcopy a stepped optimizer
    assert copied.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    msd, osd = pickle.loads(blob)
    osd_copy = copy.deepcopy(osd)  # a loaded optimizer steps the loaded tensors in place
    resumed = tiny_mlp()
    resumed.load_state_dict(msd)
    opt2 = SNRAdamW(resumed.parameters(), lr=1e-2, kernels=device_path)
    opt2.load_state_dict(osd)
    run(resumed, opt2, data[6:])
    assert max_diff(ref, resumed) == 0.0
    # the state layout is the torch path's: a compiled or Triton run resumes on the torch path
    eager = tiny_mlp()
    eager.load_state_dict(msd)
    opt3 = SNRAdamW(eager.parameters(), lr=1e-2, kernels="torch")
    opt3.load_state_dict(osd_copy)
    run(eager, opt3, data[6:])
    assert max_diff(ref, eager) <= 1e-5


def test_bf16_parameters_keep_fp32_state_and_match_the_torch_path():
    """Step by step from the same bf16 weights and fp32 state (bf16 trajectories drift apart
    by rounding alone: the torch path rounds the decayed weight and the update separately,
    the compiled pass rounds once)."""
    b = tiny_mlp().to(torch.bfloat16)
    opt_b = SNRAdamW(b.parameters(), lr=1e-2, kernels="torch")
    for step in batches(6):
        a = copy.deepcopy(b)
        opt_a = SNRAdamW(a.parameters(), lr=1e-2, kernels="compile")
        opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            x, y = step[0]
            torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
            opt.step()
        assert all(v.dtype == torch.float32 for st in opt_a.state.values() for v in st.values())
        for p, q in zip(a.parameters(), b.parameters()):
            assert p.dtype == torch.bfloat16
            assert (p.float() - q.float()).norm() <= 2e-2 * q.float().norm()


def test_without_a_compiler_it_says_why_once_and_runs_uncompiled(monkeypatch):
    import snr_dist.kernels as kernels

    monkeypatch.setattr(compiled_mod, "compile_available", lambda: "RuntimeError: no cc")
    monkeypatch.setattr(kernels, "_warned_compile", False)
    with pytest.warns(RuntimeWarning, match="cannot compile here .RuntimeError: no cc"):
        assert step_kernels("compile", "cpu") == "torch"
    (a, _), (b, _) = _pair(DEFAULTS, steps=3)
    assert max_diff(a, b) == 0.0  # both ran the torch path


def test_a_configuration_that_does_not_compile_runs_uncompiled(monkeypatch):
    """Each configuration and dtype compiles on scratch buffers before any real tensor is
    stepped; one that fails says why once and runs the torch path, nothing half done."""
    import snr_dist.kernels as kernels

    seen = []

    def refuse(config, device, pdt, gdt):
        seen.append((config, pdt))
        return "InductorError: unsupported"

    monkeypatch.setattr(compiled_mod, "compile_available", lambda: None)  # torch.compile runs
    monkeypatch.setattr(compiled_mod, "prepare", refuse)  # but not this configuration
    monkeypatch.setattr(kernels, "_warned_compile", False)
    with pytest.warns(RuntimeWarning, match="InductorError: unsupported"):
        (a, _), (b, _) = _pair(DEFAULTS, steps=3)
    assert max_diff(a, b) == 0.0
    assert seen[0] == (("innovation", False, "wiener", False, True), torch.float32)


def test_environment_variable_selects_compile(monkeypatch):
    monkeypatch.setenv("SNR_DIST_KERNELS", "compile")
    assert step_kernels("auto", "cpu") == "compile"
    monkeypatch.setenv("SNR_DIST_KERNELS", "torch")
    assert step_kernels("auto", "cpu") == "torch"


def _fsdp_nan_worker(rank: int, world: int):
    out = {}
    for kernels in ("torch", "compile", "triton"):  # one process pair for every path
        model = tiny_mlp()
        model, opt = fsdp.wrap(model, lr=1e-2, kernels=kernels)
        w = model[0].weight
        for i, step in enumerate(batches(6, batch=8, seed=1 + rank)):
            opt.zero_grad()
            x, y = step[0]
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if i == 3 and rank == 1:  # only rank 1's rows of w are non-finite
                w.grad.to_local()[0, 0] = float("nan")
            before = w.full_tensor().detach().clone()
            opt.step()
            if i == 3:
                unchanged = torch.equal(w.full_tensor().detach(), before)
        out[kernels] = {
            "params": [p.full_tensor().detach().clone() for p in model.parameters()],
            "unchanged": unchanged,
            "skips": opt.metrics()["nonfinite_skips"],
        }
    return out


def test_fsdp2_ranks_agree_on_a_nonfinite_shard_without_a_host_read():
    for out in run_distributed(_fsdp_nan_worker, 2):
        a = out["torch"]
        for b in (out["compile"], out["triton"]):
            assert b["unchanged"] and a["unchanged"]  # both ranks skipped the whole parameter
            assert a["skips"] == b["skips"] == 1
            for p, q in zip(a["params"], b["params"]):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-5)


def test_a_graph_break_fails_prepare_instead_of_running_eagerly(monkeypatch):
    """A step that Dynamo cannot capture whole would otherwise run op by op, silently (this
    happened while indexing the step table with a 0-dim tensor); with fullgraph it fails
    `prepare`, which makes that configuration run the torch path with one warning."""

    def breaking(*config):
        def step_bucket(ps, *rest):
            if float(ps[0].sum()) > 0:  # a host read inside the step: a graph break
                ps[0].add_(1.0)

        return step_bucket

    monkeypatch.setattr(compiled_mod, "_make_step", breaking)
    monkeypatch.setattr(compiled_mod, "_compiled", {})
    monkeypatch.setattr(compiled_mod, "_prepared", {})
    config = ("innovation", False, "wiener", False, True)
    why = compiled_mod.prepare(config, "cpu", torch.float32, torch.float32)
    assert why is not None  # the reason names the data-dependent expression


def test_auto_compiles_a_large_cpu_group_and_says_so_once(monkeypatch):
    """kernels="auto" compiles the diagonal step of a CPU param group from
    AUTO_COMPILE_ELEMENTS elements on (lowered here to split the tiny MLP's two groups):
    that group trains as with kernels="compile", the smaller one as with kernels="torch",
    one warning says so; SNR_DIST_KERNELS=torch keeps both uncompiled."""
    import snr_dist.kernels as kernels

    monkeypatch.setattr(kernels, "AUTO_COMPILE_ELEMENTS", 24 * 12 + 24)  # the first layer
    monkeypatch.setattr(kernels, "_said_auto_compile", False)
    data = batches(8)

    def train(choices):
        model = tiny_mlp()
        groups = [
            {"params": list(model[0].parameters()), "kernels": choices[0]},
            {"params": list(model[2].parameters()), "kernels": choices[1]},
        ]
        run(model, SNRAdamW(groups, lr=1e-2, weight_decay=0.1), data)
        return model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = train(("auto", "auto"))
        train(("auto", "auto"))  # a second optimizer: not said again
    said = [str(c.message) for c in caught if "kernels='auto' compiles" in str(c.message)]
    assert len(said) == 1 and "param group 0" in said[0]
    mixed = train(("compile", "torch"))
    assert max_diff(auto, mixed) == 0.0
    eager = train(("torch", "torch"))
    assert max_diff(auto, eager) > 0.0  # the compiled pass rounds differently: it ran
    monkeypatch.setenv("SNR_DIST_KERNELS", "torch")
    assert max_diff(train(("auto", "auto")), eager) == 0.0
