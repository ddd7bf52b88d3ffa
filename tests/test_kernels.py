"""Triton kernels against their torch references (CPU interpreter), dispatch, bad input.

``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before anything imports Triton, so the
kernels run on CPU tensors here; sizes are kept small because every program is interpreted.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp

pytest.importorskip("triton")
kernels = pytest.importorskip("snr_dist.triton_kernels")

from snr_dist import SNRAdamW  # noqa: E402
from snr_dist import kernels as dispatch  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
SHAPES = [(1, 64), (17, 257), (64, 17), (257, 1000), (1000, 257), (1000, 1)]
RANKS = [1, 8, 32]
LAYOUTS = ["contiguous", "transposed", "strided"]
CASES = [(m, n, r) for m, n in SHAPES for r in RANKS if r <= n]


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-30))


def laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a transposed or gapped (non-contiguous) layout."""
    if layout == "transposed":
        return t.T.contiguous().T
    if layout == "strided":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


def basis(n: int, r: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q.float()


def inputs(m, n, r, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = laid_out(torch.randn(m, n, generator=g).to(dtype), layout)
    q = basis(n, r, seed + 1).to(dtype)
    if layout == "transposed":
        q = q.T.contiguous().T
    return x, q


# ------------------------------------------------------------------ projection
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,n,r", CASES)
def test_project_with_stats_matches_torch(m, n, r, dtype):
    for i, layout in enumerate(LAYOUTS):
        x, q = inputs(m, n, r, dtype, layout, seed=i)
        assert layout == "contiguous" or not x.is_contiguous() or min(m, n) == 1
        got_r, got_sq = kernels.project_with_stats(x, q)
        want_r, want_sq = dispatch.project_with_stats_torch(x, q)
        assert got_r.shape == (m, r) and got_sq.shape == (r,) and got_r.dtype == torch.float32
        assert rel_err(got_r, want_r) <= TOL[dtype], layout
        assert rel_err(got_sq, want_sq) <= TOL[dtype], layout


def test_project_wide_basis_uses_several_program_columns():
    x, q = inputs(5, 300, 200, torch.float32, "contiguous")  # r > 128: two blocks of R
    got_r, got_sq = kernels.project_with_stats(x, q)
    want_r, want_sq = dispatch.project_with_stats_torch(x, q)
    assert rel_err(got_r, want_r) <= 1e-5 and rel_err(got_sq, want_sq) <= 1e-5


# ------------------------------------------------------------------ gate and reconstruct
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m,n,r", CASES)
def test_gate_reconstruct_matches_torch(m, n, r, dtype):
    g = torch.Generator().manual_seed(m * n + r)
    c = torch.rand(r, generator=g)
    a = float(torch.rand((), generator=g))
    for i, layout in enumerate(LAYOUTS):
        x, q = inputs(m, n, r, dtype, layout, seed=i)
        coef = laid_out(x.float() @ q.float(), layout)
        want = dispatch.gate_reconstruct_torch(x, coef, q, c, a)
        if i == 0:  # out of place, a as a Python float
            got = kernels.gate_reconstruct(x, coef, q, c, a)
        elif i == 1:  # in place, a as a 0-d tensor
            got = x.clone() if m == 1 else laid_out(x.clone(), layout)
            kernels.gate_reconstruct(got, coef, q, c, torch.tensor(a), inplace=True)
        else:  # accumulate into a strided out
            base = laid_out(torch.randn(m, n, generator=g).to(dtype), layout)
            got = base.clone()
            kernels.gate_reconstruct(x, coef, q, c, a, out=got, accumulate=True)
            want = (want.float() + base.float()).to(dtype)
        assert got.dtype == dtype and got.shape == (m, n)
        assert rel_err(got, want) <= TOL[dtype], layout


def test_gate_reconstruct_in_place_equals_the_subspace_update():
    """X = D^T, R = X Q, c = g - g_perp, a = g_perp: DESIGN section 3's gated update."""
    torch.manual_seed(0)
    d = torch.randn(40, 70)
    q = basis(40, 6, 3)
    gates = torch.rand(7)
    state = {"basis": q, "basis_rows": torch.tensor(True)}
    want = d.clone()
    from snr_dist import subspace

    subspace.apply_gates(state, want, gates)
    got = d.clone()
    subspace.apply_gates(state, got, gates, kernels="triton")
    assert rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------ fused step
STEP_SHAPES = [(1,), (17,), (64, 17), (257, 3), (1000,)]
RULES = ["wiener", "clamp", "hard", "paper", "none"]


def step_tensors(pdt, gdt, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in STEP_SHAPES:

        def make(scale=1.0, dtype=torch.float32, positive=False, shape=shape):
            t = torch.randn(shape, generator=g) * scale
            t = (t.abs() if positive else t).to(dtype)
            return laid_out(t, layout) if len(shape) == 2 else t

        # state after some steps: v >= s^2 roughly, so every gate rule sees real SNRs
        p, grad = make(dtype=pdt), make(dtype=gdt)
        m, s = make(0.1), make(0.1)
        v = make(0.01, positive=True).add_(s.square())
        out.append((p, grad, m, v, s))
    return [list(col) for col in zip(*out)]


@pytest.mark.parametrize("noise", ["innovation", "second_moment"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    "pdt,gdt",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32", "bf16"],
)
def test_fused_step_matches_torch(rule, pdt, gdt, noise):
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, snr_beta=0.99)
    kw.update(gate_rule=rule, tau=0.7, gate_a=0.5, warmup_steps=2, noise=noise)
    variants = [
        dict(step=7, layout="contiguous"),
        dict(step=7, layout="transposed", maximize=True),
        dict(step=3, layout="strided", shared=True),  # s is Adam's m (snr_beta == beta1)
        dict(step=2, layout="contiguous"),  # inside warmup: gate 1
        dict(step=1, layout="contiguous"),  # first step: no variance estimate, gate 1
    ]
    for i, var in enumerate(variants):
        shared = var.pop("shared", False) and noise == "second_moment"
        layout = var.pop("layout")
        ref = step_tensors(pdt, gdt, seed=i, layout=layout)
        if noise == "innovation":  # the fifth tensor is the innovation EMA: a variance
            ref[4] = [x.abs() for x in ref[4]]
        mine = [
            [
                t.clone()
                if layout == "contiguous"
                else laid_out(t.clone(), layout)
                if t.dim() == 2
                else t.clone()
                for t in ts
            ]
            for ts in ref
        ]
        opts = {**kw, **var, "snr_beta": 0.9 if shared else 0.99}
        layouts = [[(t.data_ptr(), t.stride()) for t in ts] for ts in mine]
        for impl, ts in (
            (dispatch.fused_snr_adamw_step_torch, ref),
            (kernels.fused_snr_adamw_step, mine),
        ):
            impl(ts[0], ts[1], ts[2], ts[3], None if shared else ts[4], **opts)
        for name, a, b, before in zip(("p", "g", "m", "v", "s"), mine, ref, layouts):
            for x, y, (ptr, stride) in zip(a, b, before):
                tol = TOL[pdt] if name == "p" else 1e-5
                assert rel_err(x, y) <= tol, (name, var, x.shape)
                assert x.dtype == y.dtype and (x.data_ptr(), x.stride()) == (ptr, stride)


def test_fused_step_many_tensors_in_one_launch_and_bigger_than_a_chunk():
    ps = [torch.randn(n) for n in (70_000, 3, 131_073)]  # chunks of 65536, uneven tails
    ref = [p.clone() for p in ps]
    st = [[torch.full_like(p, 0.01) for _ in range(3)] for p in ps]
    st_ref = copy.deepcopy(st)
    grads = [torch.randn_like(p) for p in ps]
    kw = dict(
        step=4,
        lr=1e-3,
        betas=(0.9, 0.99),
        eps=1e-8,
        weight_decay=0.0,
        snr_beta=0.95,
        gate_rule="wiener",
        tau=1.0,
    )
    kernels.fused_snr_adamw_step(ps, grads, *[[s[k] for s in st] for k in range(3)], **kw)
    dispatch.fused_snr_adamw_step_torch(
        ref, grads, *[[s[k] for s in st_ref] for k in range(3)], **kw
    )
    for a, b in zip(ps, ref):
        assert rel_err(a, b) <= 1e-5


# ------------------------------------------------------------------ bad input
def test_bad_input_raises_before_launch():
    x, q = inputs(10, 20, 4, torch.float32, "contiguous")
    with pytest.raises(ValueError, match="X must be a 2-D float32 or bfloat16 tensor.*float64"):
        kernels.project_with_stats(x.double(), q)
    with pytest.raises(ValueError, match=r"X.shape\[1\] must equal Q.shape\[0\]"):
        kernels.project_with_stats(x[:, :19], q)
    with pytest.raises(ValueError, match="Q must be thin"):
        kernels.project_with_stats(x[:, :3], torch.randn(3, 4))
    coef = x @ q
    with pytest.raises(ValueError, match="orthonormal"):
        kernels.gate_reconstruct(x, coef, q * 2.0, torch.ones(4), 1.0)
    kernels.gate_reconstruct(x, coef, q * 2.0, torch.ones(4), 1.0, check_orthonormal=False)
    with pytest.raises(ValueError, match="shapes do not match"):
        kernels.gate_reconstruct(x, coef[:5], q, torch.ones(4), 1.0)
    with pytest.raises(ValueError, match="c must be a float tensor of 4 gates"):
        kernels.gate_reconstruct(x, coef, q, torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        kernels.gate_reconstruct(x, coef, q, torch.ones(4), 1.0, accumulate=True)
    p = [torch.zeros(5)]
    good = dict(
        step=1,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        snr_beta=0.99,
        gate_rule="wiener",
        tau=1.0,
    )
    state = [[torch.zeros(5)] for _ in range(3)]
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] must be an fp32 tensor"):
        kernels.fused_snr_adamw_step(
            p, [torch.zeros(5)], [torch.zeros(5).bfloat16()], *state[1:], **good
        )
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(4,\)"):
        kernels.fused_snr_adamw_step(p, [torch.zeros(4)], *state, **good)
    with pytest.raises(ValueError, match="1 params but 2 exp_avg_sqs"):
        kernels.fused_snr_adamw_step(p, [torch.zeros(5)], state[0], state[1] * 2, state[2], **good)
    with pytest.raises(ValueError, match=r"params\[0\] must be an fp32 or bf16 tensor"):
        kernels.fused_snr_adamw_step([torch.zeros(5).double()], [torch.zeros(5)], *state, **good)
    with pytest.raises(ValueError, match="gate_rule must be one of"):
        kernels.fused_snr_adamw_step(p, [torch.zeros(5)], *state, **{**good, "gate_rule": "x"})
    assert torch.equal(p[0], torch.zeros(5))  # nothing ran


# ------------------------------------------------------------------ dispatch
def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve("auto", "cpu") == "torch"  # CPU: the torch path by default
    assert dispatch.resolve("torch", "cpu") == "torch"
    assert dispatch.resolve("triton", "cpu") == "triton"  # the interpreter is on
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert dispatch.resolve("auto", "cpu") == "triton"
    assert dispatch.resolve("torch", "cpu") == "torch"  # an explicit choice wins
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="Invalid SNR_DIST_KERNELS: 'cuda'; allowed values"):
        dispatch.resolve("auto", "cpu")
    monkeypatch.delenv(dispatch.ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve("triton", "cpu")


def test_optimizer_kernels_option_is_validated():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid kernels: 'cuda'; allowed values: auto, torch"):
        SNRAdamW([p], kernels="cuda")
    with pytest.raises(ValueError, match="Invalid kernels"):
        SNRAdamW([{"params": [p], "kernels": 1}])


PARITY = [
    dict(gate="wiener"),
    dict(gate="clamp", tau=0.5),
    dict(gate="hard", snr_beta=0.9),  # shares Adam's first moment
    dict(gate="paper", gate_a=0.5, warmup_steps=3),
    dict(gate="none", maximize=True),
    dict(mode="subspace", rank=3, refresh_every=4),
    dict(mode="subspace", rank=3, basis_side="cols", snr_beta=0.9),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=4),
]


@pytest.mark.parametrize("kw", PARITY, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_optimizer_with_kernels_equals_torch_path(kw, monkeypatch):
    calls = []
    names = ("fused_snr_adamw_step_device", "project_with_stats", "gate_reconstruct")
    for name in names:
        real = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k)
        )
    micro = 2 if kw.get("estimator") == "cross_sample" else 1
    data = batches(20, micro=micro)
    a = tiny_mlp()
    b = copy.deepcopy(a)
    opt_a = SNRAdamW(a.parameters(), lr=1e-2, weight_decay=0.1, kernels="triton", **kw)
    run(a, opt_a, data)
    run(b, SNRAdamW(b.parameters(), lr=1e-2, weight_decay=0.1, kernels="torch", **kw), data)
    assert max_diff(a, b) <= 1e-5
    assert opt_a.metrics()["groups"][0]["gate_mean"] <= 1.0
    if kw.get("estimator", "temporal") == "temporal":  # biases (diagonal weights) fused
        assert "fused_snr_adamw_step_device" in calls
    if kw.get("mode") == "subspace":
        assert {"project_with_stats", "gate_reconstruct"} <= set(calls)


def test_optimizer_bf16_params_with_kernels():
    """Step by step from the same bf16 weights and fp32 state (bf16 trajectories drift apart
    by rounding alone: the torch path rounds the decayed weight and the update separately,
    the kernel rounds once)."""
    b = tiny_mlp().to(torch.bfloat16)
    opt_b = SNRAdamW(b.parameters(), lr=1e-2, kernels="torch")
    for step in batches(6):
        a = copy.deepcopy(b)
        opt_a = SNRAdamW(a.parameters(), lr=1e-2, kernels="triton")
        opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            x, y = step[0]
            torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
            opt.step()
        assert all(st["exp_avg"].dtype == torch.float32 for st in opt_a.state.values())
        for p, q in zip(a.parameters(), b.parameters()):
            assert p.dtype == torch.bfloat16 and rel_err(p.detach(), q.detach()) <= 2e-2


@pytest.mark.parametrize("case", ["fp16", "fp64", "zero-size"])
def test_parameters_the_kernel_cannot_take_run_the_torch_path(case):
    """kernels="triton" picks an implementation, not the dtypes that work: fp16 and fp64
    parameters (the kernel takes fp32 and bf16) and empty ones (the device-side finite check
    has nothing to take a norm of) step as on the torch path instead of raising."""
    out = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        if case == "zero-size":
            params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(0, 3))]
        else:
            dtype = torch.float16 if case == "fp16" else torch.float64
            params = [torch.nn.Parameter(torch.randn(4, 3, dtype=dtype))]
        opt = SNRAdamW(params, lr=1e-2, kernels=kernels)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        out.append([p.detach().clone() for p in params])
    for a, b in zip(*out):  # the fp32 parameter beside the empty one runs in the kernel
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ real GPU compilation
def test_every_kernel_compiles_for_ampere_and_hopper():
    """The interpreter runs a kernel's Python body and skips the compiler's rules: c298a1f's
    fused step read a plain-float global (GATE_FLOOR), which passes every interpreted test but
    does not compile for any GPU. kernels/compile_check.py lowers each kernel variant to a
    cubin for sm_80 and sm_90 with Triton's own toolchain (no GPU needed)."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, without its warning
    done = subprocess.run(
        [sys.executable, str(root / "kernels" / "compile_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FAILED" not in done.stdout and "kernel variants compiled" in done.stdout


def test_defaults_route_a_gpu_diagonal_step_to_the_device_side_triton_step():
    """kernels="auto" on CUDA parameters runs the Triton step that keeps step counts and the
    non-finite check on the device (no host read); the routing, checked without a GPU."""
    from snr_dist.kernels import step_kernels

    opt = SNRAdamW(tiny_mlp().parameters())
    group = opt.param_groups[0]
    for device, want in (("cuda", "triton"), ("cpu", "torch")):
        kind = step_kernels(group["kernels"], torch.device(device))
        path = opt._kernels._path(group, kind, device, torch.float32, torch.float32, True)
        assert path == want


# ------------------------------------------------------------------ benchmark smoke
def test_bench_smoke(capsys):
    path = Path(__file__).resolve().parents[1] / "kernels" / "bench.py"
    spec = importlib.util.spec_from_file_location("kernels_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--smoke"])
    printed = capsys.readouterr().out
    kinds = {"project_with_stats", "gate_reconstruct", "project + reconstruct", "fused step"}
    assert {r["kernel"] for r in rows} == kinds
    tol = {"fp32": 1e-5, "bf16": 2e-2}
    assert all(r["max_rel_err"] <= tol[r["dtype"]] for r in rows)
    assert "| kernel |" in printed and "interpreter" in printed


def test_loading_a_checkpoint_keeps_this_optimizers_kernels_choice():
    model = tiny_mlp()
    saved = SNRAdamW(model.parameters(), kernels="triton")
    run(model, saved, batches(2))
    opt = SNRAdamW(model.parameters(), kernels="torch")
    opt.load_state_dict(saved.state_dict())
    assert opt.param_groups[0]["kernels"] == "torch"


def test_preconditioner_subspace_follows_the_environment_variable(monkeypatch):
    from snr_dist import SNRPreconditioner

    data = batches(8)
    a = tiny_mlp()
    b = copy.deepcopy(a)
    kw = dict(mode="subspace", rank=3, refresh_every=4)
    calls = []
    real = dispatch.project_with_stats
    monkeypatch.setattr(
        dispatch, "project_with_stats", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    run(a, SNRPreconditioner(torch.optim.SGD(a.parameters(), lr=0.1), **kw), data)
    assert calls  # the kernels ran
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    run(b, SNRPreconditioner(torch.optim.SGD(b.parameters(), lr=0.1), **kw), data)
    assert max_diff(a, b) <= 1e-5


def test_auto_warns_once_when_it_falls_back_from_a_cuda_parameter(monkeypatch):
    """b673a1b fell back to the torch path for good, silently, when Triton failed to import."""
    monkeypatch.setattr(dispatch, "_triton_error", None)
    monkeypatch.setattr(dispatch, "_warned_fallback", False, raising=False)
    monkeypatch.delenv("SNR_DIST_KERNELS", raising=False)
    monkeypatch.setitem(sys.modules, "snr_dist.triton_kernels", None)  # import fails
    with pytest.warns(
        RuntimeWarning, match="Triton kernels do not import.*(ModuleNotFound|Import)Error"
    ):
        assert dispatch.resolve("auto", torch.device("cuda")) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", torch.device("cuda")) == "torch"  # once
        assert dispatch.resolve("auto", torch.device("cpu")) == "torch"  # CPU: no warning
