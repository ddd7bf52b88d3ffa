"""Megatron-core on CPU: real parallel_state groups on gloo, a real GPTModel with tensor-parallel
layers (use_cpu_initialization), Megatron's own param groups, optimizer wrapper code and
checkpoint validation.

What needs CUDA in megatron-core 0.16 and is therefore not exercised here (see
docs/megatron.md): the GPT forward pass (its attention buffer and TP collectives allocate on
``torch.cuda.current_device()``), ``ChainedOptimizer.step``'s gradient norm, and
``dist_checkpointing.save`` (its writer calls ``torch.cuda.synchronize()``). Gradients are
therefore synthetic (the same full gradient, sliced along each weight's ``partition_dim`` and
split across data-parallel ranks, then averaged over the DP group as Megatron's DDP does), the
step runs the wrapper's ``prepare_grads`` + ``step_with_ready_grads``, and a checkpoint's file
I/O is replaced by exchanging the main replicas of the sharded tensors between the ranks.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from distributed_utils import run_distributed  # noqa: E402

from snr_dist.megatron import MegatronConfigError, get_megatron_snr_optimizer  # noqa: E402

STEPS = 4
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "megatron" / "gpt_tiny.yaml")
SUBSPACE = {"mode": "subspace", "rank": 3, "refresh_every": 2, "snr_beta": 0.95}


def _config(**kw):
    from megatron.core.optimizer import OptimizerConfig

    # clip_grad=0: Megatron's gradient norm allocates on CUDA (the GPU test covers it).
    return OptimizerConfig(optimizer="adam", lr=1e-2, weight_decay=0.01, clip_grad=0.0, **kw)


def _model(tp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)  # CPU initialisation builds the full weight, then slices it
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True
    )
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=64,
        max_sequence_length=8,
    )


def _set_grads(model, step: int) -> None:
    """Megatron DDP's job on CPU: each DP rank's gradient (full gradient +/- noise, TP slice),
    averaged over the data-parallel group into ``main_grad``."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    dp_rank = ps.get_data_parallel_rank()
    for name, p in model.named_parameters():
        full = list(p.shape)
        split = getattr(p, "tensor_model_parallel", False)
        if split:
            full[p.partition_dim] *= tp
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
        g = torch.randn(full, generator=gen) + 0.3
        noise = torch.randn(full, generator=gen)
        if ps.get_data_parallel_world_size() > 1:  # two DP ranks: mean g, spread noise
            g = g + noise if dp_rank == 0 else g - noise
        if split:
            g = g.chunk(tp, dim=p.partition_dim)[tp_rank].contiguous()
        dist.all_reduce(g, group=ps.get_data_parallel_group())
        p.main_grad = g / ps.get_data_parallel_world_size()


def _train(model, optimizer, steps: range) -> None:
    inner = optimizer.chained_optimizers[0]
    for step in steps:
        _set_grads(model, step)
        assert not inner.prepare_grads()  # main_grad -> grad, as before Megatron's step
        assert inner.step_with_ready_grads()


def _full_params(model) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state as ps

    out = {}
    for name, p in model.named_parameters():
        t = p.detach().clone()
        if (
            getattr(p, "tensor_model_parallel", False)
            and ps.get_tensor_model_parallel_world_size() > 1
        ):
            parts = [torch.empty_like(t) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, t, group=ps.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=p.partition_dim)
        out[name] = t
    return out


def _exchange_main_replicas(saved, loading):
    """Stand-in for the checkpoint files (dist_checkpointing.save needs CUDA): every sharded
    tensor to load gets the data of the main replica with the same key and offset, from
    whichever rank wrote it; non-persistent objects are unwrapped as a real load does."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedTensor,
        is_main_replica,
    )

    mine = {
        (t.key, t.global_offset): t.data.clone()
        for t in nested_values(saved)
        if isinstance(t, ShardedTensor) and is_main_replica(t.replica_id)
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    table = {k: v for d in everyone for k, v in d.items()}

    def fill(x):
        if isinstance(x, ShardedTensor):
            return table[(x.key, x.global_offset)].clone()
        if isinstance(x, LocalNonpersistentObject):
            return x.unwrap()
        return x

    return dict_list_map_inplace(fill, loading)


def _validate_sharding(sharded) -> None:
    """Megatron's own check: main replicas of every key cover it exactly once, over all ranks."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.validation import validate_sharding_integrity

    local = [t.without_data() for t in nested_values(sharded) if isinstance(t, ShardedBase)]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)
    validate_sharding_integrity(everyone)


def _round_trip(tp: int, snr: dict, optimizer, model) -> dict:
    """Save -> load into a fresh model and optimizer -> one more step on both: equal?"""
    saved = optimizer.sharded_state_dict(model.sharded_state_dict())
    _validate_sharding(saved)
    fresh_model = _model_keep_groups(tp)
    fresh = get_megatron_snr_optimizer(_config(), [fresh_model], snr=snr)
    loading = fresh.sharded_state_dict(fresh_model.sharded_state_dict(), is_loading=True)
    fresh.load_state_dict(_exchange_main_replicas(saved, loading))
    with torch.no_grad():
        for p, q in zip(fresh_model.parameters(), model.parameters()):
            p.copy_(q)  # the model's own checkpoint (not snr-dist's concern)
    _train(model, optimizer, range(STEPS, STEPS + 2))
    _train(fresh_model, fresh, range(STEPS, STEPS + 2))
    return {
        "resumed_equal": all(
            torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters())
        ),
        "keys": sorted({k for st in saved["snr"]["state"].values() for k in st}),
    }


def _model_keep_groups(tp: int):
    """A second model in the same parallel layout (no re-initialisation of parallel_state)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    torch.manual_seed(1)
    cfg = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True
    )
    return GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=64,
        max_sequence_length=8,
    )


def _layout(tp: int, snr: dict) -> dict:
    """Build under TP=tp (DP = 2 / tp), train, inspect, round-trip a checkpoint."""
    from megatron.core import parallel_state as ps

    model = _model(tp)
    optimizer = get_megatron_snr_optimizer(_config(), [model], snr=snr)
    inner = optimizer.chained_optimizers[0].optimizer
    distributor = inner.distributor
    dp_group = ps.get_data_parallel_group(with_context_parallel=True)
    names = {p: n for n, p in model.named_parameters()}
    routing = {
        names[p]: (g["mode"], g["basis_side"], g["wd_mult"])
        for g in inner.param_groups
        for p in g["params"]
    }
    _train(model, optimizer, range(STEPS))
    bases = {
        names[p]: tuple(inner.state[p]["basis"].shape)
        for g in inner.param_groups
        for p in g["params"]
        if "basis" in inner.state[p]
    }
    owners = {names[p]: distributor.owner(p) for p in distributor.owners}
    out = {
        "dp_size": dist.get_world_size(dp_group),
        "ctx_mode": distributor.name,
        "ctx_world": distributor.world,
        "group_is_dp": getattr(distributor.comm, "group", None) is dp_group,
        "routing": routing,
        "bases": bases,
        "owners": owners,
        "n_groups": len(inner.param_groups),
        "params": _full_params(model),
        "wrapper": type(optimizer.chained_optimizers[0]).__name__,
    }
    out.update(_round_trip(tp, snr, optimizer, model))
    return out


def _worker(rank: int, world: int):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    results = {}
    for tp in (2, 1):
        results[f"tp{tp}-diagonal"] = _layout(tp, {})
        results[f"tp{tp}-subspace"] = _layout(tp, SUBSPACE)
    ps.destroy_model_parallel()
    return results


@pytest.fixture(scope="module")
def ranks():
    return run_distributed(_worker, 2, timeout=240)


def test_dp_group_is_parallel_state_not_world(ranks):
    for r in ranks:
        # TP=2 x DP=1: the world has 2 ranks but each DP group 1 -> no SNR communication
        assert r["tp2-subspace"]["dp_size"] == 1
        assert (r["tp2-subspace"]["ctx_mode"], r["tp2-subspace"]["ctx_world"]) == ("local", 1)
        # TP=1 x DP=2: replicated over Megatron's DP group, trackers shared out between ranks
        tp1 = r["tp1-subspace"]
        assert tp1["dp_size"] == 2 and tp1["group_is_dp"]
        assert (tp1["ctx_mode"], tp1["ctx_world"]) == ("replicated", 2)
        assert sorted(set(tp1["owners"].values())) == [0, 1]
        assert r["tp1-subspace"]["wrapper"] == "SNRFP32Optimizer"
    assert ranks[0]["tp1-subspace"]["owners"] == ranks[1]["tp1-subspace"]["owners"]


def test_routing_embeddings_and_1d_diagonal_tp_aware_basis_side(ranks):
    routing = ranks[0]["tp2-subspace"]["routing"]
    diag = {n for n, (mode, _, _) in routing.items() if mode == "diagonal"}
    assert "embedding.word_embeddings.weight" in diag
    assert "embedding.position_embeddings.weight" in diag
    assert "output_layer.weight" in diag
    assert all(n in diag for n in routing if n.endswith(("bias", "layernorm.weight")))
    for layer in (0, 1):
        pre = f"decoder.layers.{layer}."
        # column-parallel (split rows): basis on the columns; row-parallel: on the rows
        assert routing[pre + "self_attention.linear_qkv.weight"][:2] == ("subspace", "cols")
        assert routing[pre + "mlp.linear_fc1.weight"][:2] == ("subspace", "cols")
        assert routing[pre + "self_attention.linear_proj.weight"][:2] == ("subspace", "rows")
        assert routing[pre + "mlp.linear_fc2.weight"][:2] == ("subspace", "rows")
        # Megatron's own groups survive: no weight decay on biases and norms
        assert routing[pre + "mlp.linear_fc1.bias"][2] == 0.0
        assert routing[pre + "mlp.linear_fc1.weight"][2] == 1.0
    for r in ranks:
        # the basis spans the unsplit side in full: hidden=16 (qkv, fc1 inputs; proj, fc2 outputs)
        for layout in ("tp2-subspace", "tp1-subspace"):
            for name, shape in r[layout]["bases"].items():
                assert shape == (16, 3), (layout, name, shape)
    # every Megatron param group becomes 4 SNR groups on every rank (checkpoints need equality)
    assert ranks[0]["tp2-subspace"]["n_groups"] == ranks[1]["tp2-subspace"]["n_groups"] == 8
    assert ranks[0]["tp2-diagonal"]["n_groups"] == 2


def test_diagonal_mode_tp2_equals_dp2(ranks):
    """Elementwise gates: TP=2 x DP=1 and TP=1 x DP=2 train the same model the same way."""
    for r in ranks:
        a, b = r["tp2-diagonal"]["params"], r["tp1-diagonal"]["params"]
        assert a.keys() == b.keys()
        diff = {n: (a[n] - b[n]).abs().max().item() for n in a}
        assert max(diff.values()) < 1e-5, diff
    c = ranks[0]["tp1-diagonal"]["params"]
    for name, t in ranks[1]["tp1-diagonal"]["params"].items():
        assert torch.equal(t, c[name])  # DP replicas stay identical


def test_sharded_state_dict_round_trip(ranks):
    for r in ranks:
        for layout in ("tp2-diagonal", "tp2-subspace", "tp1-diagonal", "tp1-subspace"):
            assert r[layout]["resumed_equal"], layout
        assert {"exp_avg", "exp_avg_sq", "noise_avg", "step"} <= set(r["tp1-diagonal"]["keys"])
        assert {"basis", "sketch", "proj_avg", "noise_dir"} <= set(r["tp1-subspace"]["keys"])


def test_refusals_name_the_setting():
    with pytest.raises(MegatronConfigError, match="use_distributed_optimizer = True"):
        get_megatron_snr_optimizer(_config(use_distributed_optimizer=True), [])
    with pytest.raises(MegatronConfigError, match="cross_sample"):
        get_megatron_snr_optimizer(_config(), [], snr={"estimator": "cross_sample"})
    with pytest.raises(MegatronConfigError, match="basis_side = 'rows'"):
        get_megatron_snr_optimizer(_config(), [], snr={"basis_side": "rows"})
    with pytest.raises(ValueError, match="Invalid tau"):
        get_megatron_snr_optimizer(_config(), [], snr={"tau": -1.0})
    # refused as SNRAdamW refuses it (it used to be dropped without a word)
    with pytest.raises(MegatronConfigError, match="snr_beta2 applies to SNRPreconditioner"):
        get_megatron_snr_optimizer(_config(), [], snr={"snr_beta2": 0.5})


def test_float16_wrapper_loads_megatrons_plain_state_dict():
    """The bf16/fp16 wrapper's state_dict() is Megatron's plain format (torch-format
    checkpoints); its load_state_dict took only the sharded one (KeyError 'snr'). Its __init__
    needs CUDA, so the object is assembled by hand around a real SNRAdamW."""
    from snr_dist import SNRAdamW
    from snr_dist.megatron import SNRFloat16Optimizer

    saved = SNRAdamW([torch.nn.Parameter(torch.zeros(3))], lr=5e-3)
    wrapper = SNRFloat16Optimizer.__new__(SNRFloat16Optimizer)
    wrapper.optimizer = SNRAdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    wrapper.grad_scaler, wrapper.config = None, _config()
    main = torch.zeros(3)
    wrapper.fp32_from_float16_groups = [[main]]
    plain = {"optimizer": saved.state_dict(), "fp32_from_fp16_params": [[torch.ones(3)]]}
    wrapper.load_state_dict(plain)
    assert wrapper.optimizer.param_groups[0]["lr"] == 5e-3
    assert torch.equal(main, torch.ones(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_example_script_fails_clearly_without_cuda():
    from snr_dist.experiments.megatron_gpt import main

    with pytest.raises(SystemExit, match="needs CUDA"):
        main(["--config", CONFIG, "--steps", "1"])


def test_example_script_checks_its_arguments_before_any_work(tmp_path, capsys):
    """--steps 0 was taken as unset (200 steps) and a --save folder that did not exist failed
    only after training; bad numbers now stop at once, and the folder is made up front."""
    from snr_dist.experiments.megatron_gpt import main

    for flag in ("--steps", "--tp"):
        with pytest.raises(SystemExit) as e:
            main(["--config", CONFIG, flag, "0"])
        assert e.value.code == 2
        assert f"{flag} 0: allowed: an int >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():  # then stops for want of CUDA, after making the folder
        save = tmp_path / "not" / "yet"
        with pytest.raises(SystemExit, match="needs CUDA"):
            main(["--config", CONFIG, "--steps", "1", "--save", str(save)])
        assert save.is_dir()


def test_example_config_is_validated(tmp_path):
    from snr_dist.experiments.megatron_gpt import load_config

    assert load_config(CONFIG)["snr"]["mode"] == "subspace"
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden: 8\n")
    with pytest.raises(ValueError, match=r"unknown model key\(s\) \['hidden'\]"):
        load_config(bad)
