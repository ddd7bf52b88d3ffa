"""Pretrain-style script: a megatron-core GPTModel with tensor parallelism, trained with
SNRAdamW (`snr_dist.megatron`) or Megatron's Adam on synthetic token sequences.

Needs CUDA (megatron-core's GPT forward, DDP grad buffers and optimizer step do); launch it with
``launch/megatron_gpt.sh``. The data is a fixed random first-order Markov chain over the
vocabulary, so the loss can fall well below ``log(vocab)`` and two optimizers can be compared.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 128,
        "seq_length": 32,
        "bf16": False,
    },
    "train": {
        "steps": 20,
        "micro_batch_size": 8,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "clip_grad": 1.0,
        "seed": 0,
        "log_every": 1,
    },
}


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Defaults overlaid with the YAML file; unknown keys are refused by name."""
    cfg = {k: dict(v) for k, v in DEFAULTS.items()}
    cfg.update(optimizer="snr", snr={})
    if path is None:
        return cfg
    raw = yaml.safe_load(Path(path).read_text()) or {}
    for key, value in raw.items():
        if key in DEFAULTS:
            unknown = sorted(set(value) - set(DEFAULTS[key]))
            if unknown:
                raise ValueError(
                    f"{path}: unknown {key} key(s) {unknown}; allowed: {sorted(DEFAULTS[key])}"
                )
            cfg[key].update(value)
        elif key in ("optimizer", "snr"):
            cfg[key] = value
        else:
            raise ValueError(f"{path}: unknown key {key!r}; allowed: model, train, optimizer, snr")
    if cfg["optimizer"] not in ("snr", "adam"):
        raise ValueError(f"optimizer = {cfg['optimizer']!r}; allowed: snr, adam")
    return cfg


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "snr_dist.experiments.megatron_gpt needs CUDA: megatron-core's GPT forward "
            "allocates its attention and tensor-parallel buffers on torch.cuda.current_device(), "
            "and its DDP grad buffers and optimizer step are CUDA-only. The CPU-checkable parts "
            "are in tests/test_megatron.py."
        )


def _init_distributed(tp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            from snr_dist.distributors.ports import free_port

            os.environ["MASTER_PORT"] = str(free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(0)


def _markov_batch(vocab: int, batch: int, seq: int, seed: int, step: int, dp_rank: int):
    """Token sequences from a fixed random Markov chain (each token has 4 likely successors)."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + dp_rank)
    tokens = torch.empty(batch, seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for t in range(seq):
        pick = torch.randint(0, 4, (batch,), generator=g)
        tokens[:, t + 1] = successors[tokens[:, t], pick]
    return tokens[:, :-1], tokens[:, 1:]


def train(cfg: dict[str, Any], tp: int = 1, save_dir: str | None = None) -> dict[str, Any]:
    """Train; returns the per-step losses (averaged over data-parallel ranks) and, with
    ``save_dir``, whether a dist_checkpointing save/load of the optimizer round-trips."""
    _require_cuda()
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    _init_distributed(tp)
    m, t = cfg["model"], cfg["train"]
    torch.manual_seed(t["seed"])
    dtype = torch.bfloat16 if m["bf16"] else torch.float32
    tcfg = TransformerConfig(
        num_layers=m["num_layers"],
        hidden_size=m["hidden_size"],
        num_attention_heads=m["num_attention_heads"],
        bf16=m["bf16"],
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,  # the same initial weights for every TP size
    )
    model = GPTModel(
        config=tcfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=m["vocab_size"],
        max_sequence_length=m["seq_length"],
    ).cuda()
    ddp = DistributedDataParallel(
        config=tcfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    ocfg = OptimizerConfig(
        optimizer="adam",
        lr=t["lr"],
        weight_decay=t["weight_decay"],
        clip_grad=t["clip_grad"],
        bf16=m["bf16"],
        params_dtype=dtype,
    )
    if cfg["optimizer"] == "snr":
        from snr_dist.megatron import get_megatron_snr_optimizer

        optimizer = get_megatron_snr_optimizer(ocfg, [ddp], snr=cfg.get("snr") or {})
    else:
        optimizer = get_megatron_optimizer(ocfg, [ddp])
    dp_group = parallel_state.get_data_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    seq = m["seq_length"]
    position_ids = torch.arange(seq, device="cuda").unsqueeze(0).expand(t["micro_batch_size"], -1)
    mask = torch.tril(torch.ones(1, 1, seq, seq, device="cuda")) < 0.5
    losses = []
    for step in range(t["steps"]):
        tokens, labels = _markov_batch(
            m["vocab_size"], t["micro_batch_size"], seq, t["seed"], step, dp_rank
        )
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens.cuda(), position_ids, mask, labels=labels.cuda()).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, grad_norm, _ = optimizer.step()
        value = loss.detach().clone()
        dist.all_reduce(value, group=dp_group)
        losses.append(float(value) / dist.get_world_size(dp_group))
        if dist.get_rank() == 0 and (step + 1) % t["log_every"] == 0:
            print(json.dumps({"step": step + 1, "loss": losses[-1], "grad_norm": grad_norm}))
    out: dict[str, Any] = {"losses": losses, "log_vocab": math.log(m["vocab_size"])}
    if save_dir is not None:
        out["checkpoint_round_trip"] = _checkpoint_round_trip(
            dist_checkpointing, ddp, optimizer, save_dir
        )
    return out


def _checkpoint_round_trip(dist_checkpointing, ddp, optimizer, save_dir: str) -> bool:
    """Save model + optimizer with Megatron's dist_checkpointing, reload, compare state."""
    before = {k: v.clone() for k, v in _flat_state(optimizer).items() if torch.is_tensor(v)}
    model_sd = ddp.module.sharded_state_dict()
    dist_checkpointing.save(
        {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd)}, save_dir
    )
    model_sd = ddp.module.sharded_state_dict()
    loaded = dist_checkpointing.load(
        {"optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True)}, save_dir
    )
    for st in _flat_state(optimizer).values():
        if torch.is_tensor(st):
            st.zero_()
    optimizer.load_state_dict(loaded["optimizer"])
    after = _flat_state(optimizer)
    return all(torch.equal(before[k].cpu(), after[k].cpu()) for k in before)


def _flat_state(optimizer) -> dict[str, Any]:
    out = {}
    for i, opt in enumerate(optimizer.chained_optimizers):
        params = [p for g in opt.optimizer.param_groups for p in g["params"]]
        for j, p in enumerate(params):
            for k, v in opt.optimizer.state.get(p, {}).items():
                out[f"{i}.{j}.{k}"] = v
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML (configs/megatron/gpt_tiny.yaml)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--optimizer", choices=("snr", "adam"), default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--save", default=None, help="directory for a dist_checkpointing test")
    args = parser.parse_args(argv)
    for name in ("tp", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} {value}: allowed: an int >= 1")
    if args.save is not None:  # dist_checkpointing writes into an existing folder: make it now
        Path(args.save).mkdir(parents=True, exist_ok=True)  # rather than fail after training
    cfg = load_config(args.config)
    if args.optimizer:
        cfg["optimizer"] = args.optimizer
    if args.steps is not None:
        cfg["train"]["steps"] = args.steps
    try:
        out = train(cfg, tp=args.tp, save_dir=args.save)
        if dist.get_rank() == 0:
            print(json.dumps({"optimizer": cfg["optimizer"], "tp": args.tp, **out}))
    finally:  # a failed run too: a process group left to interpreter exit can abort the rank
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
