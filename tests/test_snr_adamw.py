"""SNRAdamW: parity with AdamW, implementation equivalence, torch.optim contracts, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import batches, max_diff, run, tiny_mlp

from snr_dist import SNRAdamW
from snr_dist import snr as rule
from snr_dist.optim.steps import chunked_step
from snr_dist.optim.steps.chunked_step import ChunkedStep
from snr_dist.optim.steps.torch_step import TorchStep

MODES = [
    dict(),
    dict(mode="subspace", rank=3, refresh_every=4),
    dict(estimator="cross_sample"),
    dict(estimator="cross_sample", mode="subspace", rank=3, refresh_every=4),
    dict(gate="paper", gate_a=0.5),
    dict(gate="clamp", tau=0.5),
    dict(gate="hard", snr_beta=0.9),  # snr_beta == beta1: shares Adam's first moment
    dict(mode="subspace", rank=3, basis_side="cols", snr_beta=0.9),
]


def _ids(kw):
    return ",".join(f"{k}={v}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("how", ["gate_none", "warmup"])
@pytest.mark.parametrize("foreach", [True, False])
def test_gates_forced_to_one_match_torch_adamw(how, foreach):
    model = tiny_mlp()
    ref = copy.deepcopy(model)
    kw = dict(gate="none") if how == "gate_none" else dict(warmup_steps=1000, mode="subspace")
    opt = SNRAdamW(
        model.parameters(), lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, foreach=foreach, **kw
    )
    ref_opt = torch.optim.AdamW(
        ref.parameters(), lr=3e-3, betas=(0.8, 0.99), weight_decay=0.1, foreach=True
    )
    data = batches(50)
    run(model, opt, data)
    run(ref, ref_opt, data)
    assert max_diff(model, ref) < 1e-6


def test_reference_step_equals_optimizer_diagonal_temporal():
    """The readable single-tensor reference in snr.py is what the optimizer computes."""
    for gate in ("wiener", "clamp", "hard", "paper"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 7))
        q = p.detach().clone()
        opt = SNRAdamW([p], lr=1e-2, weight_decay=0.05, gate=gate, tau=0.7, warmup_steps=3)
        state: dict = {}
        for t in range(40):
            g = torch.randn(5, 7) * 0.3 + 0.2 * (t % 3)
            p.grad = g.clone()
            opt.step()
            rule.snr_adamw_reference_step(
                q,
                g,
                state,
                lr=1e-2,
                betas=(0.9, 0.999),
                eps=1e-8,
                weight_decay=0.05,
                snr_beta=0.99,
                gate_rule=gate,
                tau=0.7,
                warmup_steps=3,
            )
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kw", MODES, ids=_ids)
def test_foreach_equals_single_tensor(kw):
    a, b = tiny_mlp(), tiny_mlp()
    micro = 2 if kw.get("estimator") == "cross_sample" else 1
    data = batches(25, micro=micro)
    run(a, SNRAdamW(a.parameters(), lr=1e-2, foreach=True, **kw), data)
    run(b, SNRAdamW(b.parameters(), lr=1e-2, foreach=False, **kw), data)
    assert max_diff(a, b) < 1e-6


CHUNKED = MODES + [
    dict(warmup_steps=10, weight_decay=0.1),
    dict(noise="second_moment"),
    dict(noise="second_moment", gate="clamp", tau=0.5),
    dict(maximize=True, weight_decay=0.05),
]


@pytest.mark.parametrize("kw", CHUNKED, ids=_ids)
def test_cache_sized_chunks_step_bit_identically(kw, monkeypatch):
    """The CPU step of the elementwise rules in chunks of parameters (the weights, larger
    than a chunk, in flat pieces), its temporaries in reused buffers, gives the same bits as
    one multi-tensor step over all of them with fresh temporaries (warmup, subspace and
    cross-sample params mixed in), and chunk boundaries inside the model are really crossed."""
    micro = 2 if kw.get("estimator") == "cross_sample" else 1
    data = batches(30, micro=micro)
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 1 << 30)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 1 << 30)
    whole = tiny_mlp()
    run(whole, SNRAdamW(whole.parameters(), lr=1e-2, **kw), data)
    # the biases (24 and 5 elements) in chunks of their own, the weights in pieces
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 26)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 0)
    calls, pieces = [], []
    moments, step_pieces = TorchStep.moments, ChunkedStep.pieces
    monkeypatch.setattr(
        ChunkedStep,
        "pieces",
        lambda self, group, p, g: pieces.append(p.numel()) or step_pieces(self, group, p, g),
    )
    monkeypatch.setattr(
        TorchStep,
        "moments",
        lambda self, group, params, *args: (
            calls.append(len(params)) or moments(self, group, params, *args)
        ),
    )
    chunked = tiny_mlp()
    run(chunked, SNRAdamW(chunked.parameters(), lr=1e-2, **kw), data)
    for p, q in zip(whole.parameters(), chunked.parameters()):
        assert torch.equal(p, q)
    if kw.get("estimator") != "cross_sample":  # cross-sample is not elementwise: one call
        assert max(calls) < 4 and len(calls) > len(data)
    if kw.get("estimator") != "cross_sample" and kw.get("mode") != "subspace":
        assert set(pieces) == {12 * 24, 24 * 5}  # the weights went in pieces


def test_chunked_step_allocates_no_model_sized_temporaries(monkeypatch):
    """The CPU diagonal step's new tensors stay below a chunk (the scratch buffers are made
    once): the allocator has nothing model-sized to fault back in on the next step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fresh(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.biggest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not (func._schema.is_mutable or func.is_view):  # a new tensor
                for t in out if isinstance(out, (list, tuple)) else [out]:
                    if isinstance(t, torch.Tensor):
                        self.biggest = max(self.biggest, t.numel())
            return out

    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 5000)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 1000)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])  # 33K elements
    opt = SNRAdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for _ in range(2):  # state, then (once the gates run) the scratch buffers are made
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    fresh = Fresh()
    with fresh:
        opt.step()
    assert fresh.biggest < 1000
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 1 << 30)  # the old step
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 1 << 30)
    fresh = Fresh()
    with fresh:
        opt.step()
    assert fresh.biggest == 64 * 64  # the test sees fresh temporaries when there are some


def test_scratch_buffers_stay_chunk_sized_next_to_a_large_tensor(monkeypatch):
    """A tensor larger than a chunk is stepped in chunk-sized pieces: the buffers kept
    between steps never grow past a chunk."""
    monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", 3000)
    monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", 1000)
    model = torch.nn.Sequential(torch.nn.Linear(100, 100), torch.nn.Linear(100, 30))
    opt = SNRAdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    sizes = [b.numel() for b in opt._engine.scratch._buffers.values()]
    assert sizes and max(sizes) <= 3000  # the 100 x 100 weight (10,000) never went in


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_pieces_of_large_and_non_contiguous_parameters_step_bit_identically(dtype, monkeypatch):
    """bf16 parameters (fp32 state) and a non-contiguous one (stepped whole) in the chunked
    step: the same bits as the one-call step, the step count advanced once per parameter."""

    def build():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(40, 30, dtype=dtype))
        t = torch.nn.Parameter(torch.randn(30, 40, dtype=dtype).t())  # not contiguous
        b = torch.nn.Parameter(torch.randn(30, dtype=dtype))
        return [w, t, b]

    def train(params, limit, scratch_min):
        monkeypatch.setattr(chunked_step, "CPU_CHUNK_ELEMENTS", limit)
        monkeypatch.setattr(chunked_step, "SCRATCH_MIN_ELEMENTS", scratch_min)
        opt = SNRAdamW(params, lr=1e-2, weight_decay=0.1)
        gen = torch.Generator().manual_seed(3)
        for _ in range(12):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            opt.step()
        return opt

    whole, pieced = build(), build()
    train(whole, 1 << 30, 1 << 30)
    opt = train(pieced, 500, 100)
    assert not pieced[1].is_contiguous()
    for p, q in zip(whole, pieced):
        assert torch.equal(p, q)
    assert all(int(opt.state[p]["step"]) == 12 for p in pieced)


@pytest.mark.parametrize("kw", MODES, ids=_ids)
def test_state_dict_restart_is_bit_identical(kw):
    micro = 2 if kw.get("estimator") == "cross_sample" else 1
    data = batches(30, micro=micro)
    full = tiny_mlp()
    run(full, SNRAdamW(full.parameters(), lr=1e-2, **kw), data)

    first = tiny_mlp()
    opt = SNRAdamW(first.parameters(), lr=1e-2, **kw)
    run(first, opt, data[:13])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = tiny_mlp(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = SNRAdamW(resumed.parameters(), lr=1e-2, **kw)
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, data[13:])
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_lr_scheduler_closure_zero_grad_and_maximize():
    model = tiny_mlp()
    ref = copy.deepcopy(model)
    opt = SNRAdamW(model.parameters(), lr=1e-2, gate="none")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5)
    data = batches(20)
    for step in data:
        x, y = step[0]
        for mod, o, s in ((model, opt, sched), (ref, ref_opt, ref_sched)):

            def closure(mod=mod, o=o, x=x, y=y):
                o.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(mod(x), y)
                loss.backward()
                return loss

            loss = o.step(closure)
            assert torch.is_tensor(loss)
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**4)
    assert max_diff(model, ref) < 1e-6
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())

    # maximize: ascending -f equals descending f
    p1 = torch.nn.Parameter(torch.ones(4, 4))
    p2 = torch.nn.Parameter(torch.ones(4, 4))
    o1 = SNRAdamW([p1], lr=0.1, maximize=True)
    o2 = SNRAdamW([p2], lr=0.1)
    for t in range(10):
        g = torch.randn(4, 4, generator=torch.Generator().manual_seed(t)) + 1.0
        p1.grad, p2.grad = -g, g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2)


def test_per_group_options_and_1d_params_use_diagonal():
    model = tiny_mlp()
    first = list(model[0].parameters())  # weight (2-D) and bias (1-D) in a subspace group
    last = list(model[2].parameters())
    opt = SNRAdamW(
        [
            {"params": first, "mode": "subspace", "rank": 2},
            {"params": last, "gate": "paper", "lr": 1e-3},
        ],
        lr=1e-2,
    )
    run(model, opt, batches(5))
    m = opt.metrics()
    kinds = [v["kind"] for v in m["params"].values()]
    assert kinds == ["subspace", "diagonal", "diagonal", "diagonal"]
    assert m["groups"][1]["gate"] == "paper"
    assert opt.param_groups[1]["lr"] == 1e-3


def test_an_optimizer_built_from_named_parameters_reports_metrics_by_those_names():
    model = tiny_mlp()
    opt = SNRAdamW(model.named_parameters(), lr=1e-2, mode="subspace", rank=2)
    run(model, opt, batches(3))
    assert list(opt.metrics()["params"]) == [n for n, _ in model.named_parameters()]
    first = next(model.parameters())
    named = list(opt.metrics(names={first: "w"})["params"])  # names= wins where it names
    assert named == ["w"] + [n for n, _ in model.named_parameters()][1:]


def test_torch_compiled_model():
    model = tiny_mlp()
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    data = batches(6, micro=2)
    o1 = SNRAdamW(model.parameters(), lr=1e-2, estimator="cross_sample")
    o2 = SNRAdamW(ref.parameters(), lr=1e-2, estimator="cross_sample")
    run(compiled, o1, data)
    run(ref, o2, data)
    assert max_diff(model, ref) < 1e-5


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), "betas[0]"),
        (dict(betas=(0.9, -0.1)), "betas[1]"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(estimator="spatial"), "estimator"),
        (dict(mode="lowrank"), "mode"),
        (dict(gate="sigmoid"), "gate"),
        (dict(tau=0.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(gate_a=-1), "gate_a"),
        (dict(snr_beta=1.0), "snr_beta"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(warmup_steps=2.5), "warmup_steps"),
        (dict(rank=0), "rank"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(sketch_beta=1.5), "sketch_beta"),
        (dict(basis_side="left"), "basis_side"),
    ],
)
def test_bad_hyperparameters_name_the_argument(kwargs, key):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError) as e:
        SNRAdamW([p], **kwargs)
    msg = str(e.value)
    assert f"Invalid {key}:" in msg and "allowed" in msg


def test_bad_group_option_is_caught_too():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid rank"):
        SNRAdamW([{"params": [a]}, {"params": [b], "rank": -2}])


def test_sparse_gradient_raises_clearly():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = SNRAdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_nonfinite_gradient_skips_param_warns_once_and_counts():
    model = tiny_mlp()
    opt = SNRAdamW(model.parameters(), lr=1e-2)
    run(model, opt, batches(3))
    w0 = model[0].weight
    before_p = w0.detach().clone()
    before_state = {k: v.clone() for k, v in opt.state[w0].items()}
    other_before = model[2].weight.detach().clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for bad in (float("nan"), float("inf")):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(
                model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])
            ).backward()
            w0.grad[0, 0] = bad
            opt.step()
    msgs = [w for w in caught if "NaN or Inf" in str(w.message)]
    assert len(msgs) == 1
    assert torch.equal(w0.detach(), before_p)
    for k, v in before_state.items():
        assert torch.equal(opt.state[w0][k], v), k
    assert not torch.equal(model[2].weight.detach(), other_before)  # others stepped
    m = opt.metrics()
    assert m["nonfinite_skips"] == 2
    assert m["params"]["group0.param0"]["nonfinite_skips"] == 2


def test_bf16_parameters_keep_fp32_state_through_save_and_load():
    model = tiny_mlp().to(torch.bfloat16)
    opt = SNRAdamW(model.parameters(), lr=1e-2)
    for step in batches(3):
        opt.zero_grad()
        x, y = step[0]
        torch.nn.functional.cross_entropy(model(x.bfloat16()).float(), y).backward()
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    opt2 = SNRAdamW(model.parameters(), lr=1e-2)
    opt2.load_state_dict(sd)
    for st in opt2.state.values():
        assert {"exp_avg", "exp_avg_sq", "noise_avg"} <= set(st)
        assert all(v.dtype == torch.float32 for k, v in st.items() if k != "step")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_huge_but_finite_gradient_is_not_skipped():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = SNRAdamW([p], lr=0.1)
    p.grad = torch.full((4,), 1.5e19)  # its 2-norm overflows float32, its square does not
    opt.step()
    assert opt.metrics()["nonfinite_skips"] == 0
    assert (p < 0).all()
