"""Megatron-core: `SNRAdamW` as a Megatron optimizer.

megatron-core 0.16 has no optimizer registry: ``get_megatron_optimizer`` builds Adam or SGD by
the name in ``OptimizerConfig.optimizer``, and its one "emerging" optimizer (Muon) comes with a
factory function of its own, ``get_megatron_muon_optimizer``. snr-dist follows Muon's pattern::

    from snr_dist.megatron import get_megatron_snr_optimizer
    optimizer = get_megatron_snr_optimizer(config, model_chunks, snr={"mode": "subspace"})

takes the same ``OptimizerConfig`` (Adam's lr, betas, eps, weight decay, bf16/fp16, clip_grad)
and returns the same kind of object (a ``ChainedOptimizer``), so Megatron's training step, LR
scheduler (``wd_mult``/``lr_mult`` param groups from ``config_overrides``) and distributed
checkpointing drive it as they drive Adam.

How Megatron's parallelism maps onto snr-dist:

- **Data parallel.** Parameters are replicated over ``parallel_state``'s data-parallel group
  (with context parallelism: the data x context group, over which Megatron's DDP averages the
  gradients). That group, never the world, is SNRAdamW's ``process_group``: every rank keeps
  the complete statistics, and the refreshes of the subspace trackers are shared out between
  its ranks (each owner solves and broadcasts the new basis).
- **Tensor parallel.** A column-parallel weight (``partition_dim == 0``) is split along its
  rows, a row-parallel one along its columns. Its tracker's basis lives on the side that is not
  split (``basis_side="cols"``, resp. ``"rows"``), so every projection is local to the rank and
  no tensor-parallel communication is added. Each tensor-parallel rank tracks the gradient
  covariance of its own slice (a block of the full matrix's statistics), so subspace mode
  under TP > 1 is not numerically identical to TP = 1; diagonal mode is elementwise and is.
- **Routing.** 1-D parameters (biases, norms) and embeddings (word and position embeddings,
  the output layer: ``is_embedding_or_output_parameter``) use the diagonal estimator.
- **Refused**, with the reason: Megatron's distributed optimizer (it hands the optimizer flat
  fp32 shards that cut across tensors), Megatron-FSDP, optimizer CPU offload, the precision-
  aware optimizer, mixture-of-experts expert parameters (they are replicated over a different
  group) and ``estimator="cross_sample"`` (Megatron's DDP accumulates micro-batch gradients
  into its own buffers, where snr-dist's gradient hooks cannot see them).

Checkpoints: ``sharded_state_dict`` saves Adam's moments and the other parameter-shaped state
as ``ShardedTensor``s with the parameter's own sharding (so they reshard when TP changes), and
the per-shard state (step, eigen-trackers) as ``ShardedTensor``s laid out on the parameter's
shard grid (same layout on load: a change of TP size keeps diagonal-mode state, not
trackers). Every data-parallel rank holds the same state; Megatron's replica ids pick the
writer. No communication is needed to save.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from snr_dist.layout import Kind
from snr_dist.optim.snr_adamw import SNRAdamW
from snr_dist.options import SNROptions, complete_saved_group, gives_snr_beta2, param_mode

try:
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedTensor,
        ShardedTensorFactory,
    )
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
    )
    from megatron.core.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
        MegatronOptimizer,
        _get_param_groups,
    )
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
except ImportError as err:  # pragma: no cover - exercised only without megatron-core
    raise ImportError(
        "snr_dist.megatron needs megatron-core (pip install 'snr-dist[megatron]'): " + str(err)
    ) from err

#: SNR options set per param group by the routing (the user's ``mode`` picks the roles).
_ROUTED = ("mode", "basis_side")
#: Role order of the param groups built from each Megatron param group.
_ROLES = (("diagonal", None), ("subspace", "cols"), ("subspace", "rows"), ("subspace", None))


class MegatronConfigError(ValueError):
    """An OptimizerConfig / SNR option combination snr-dist cannot run, with the reason."""


# ---------------------------------------------------------------------- routing


def embedding_params(model_chunks: Iterable[torch.nn.Module]) -> set[Tensor]:
    """Parameters of embedding tables (vocab-parallel or plain) and the output layer."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    out: set[Tensor] = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            if isinstance(module, (VocabParallelEmbedding, torch.nn.Embedding)):
                out.update(module.parameters(recurse=False))
        for p in chunk.parameters():
            if getattr(p, "is_embedding_or_output_parameter", False):
                out.add(p)
    return out


def param_role(param: Tensor, embedding: bool, mode: str, basis_side: str) -> tuple[str, str]:
    """``(mode, basis_side)`` of one Megatron parameter.

    Diagonal for 1-D parameters and embeddings; under tensor parallelism the basis lives on the
    side that ``partition_dim`` does not split, so its projections need no TP communication.
    """
    if mode == "diagonal" or embedding or param_mode(tuple(param.shape), mode) == "diagonal":
        return "diagonal", basis_side
    if getattr(param, "tensor_model_parallel", False):
        dim = getattr(param, "partition_dim", -1)
        if dim == 0:
            return "subspace", "cols"
        if dim >= 1:
            return "subspace", "rows"  # the basis is on dim 0 of the matrix view: never split
    return "subspace", basis_side


def data_parallel_group(pg_collection=None):
    """The group over which Megatron's DDP averages gradients (data x context parallel)."""
    if pg_collection is not None and hasattr(pg_collection, "dp_cp"):
        return pg_collection.dp_cp
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def _snr_options(snr: SNROptions | dict[str, Any] | None) -> dict[str, Any]:
    if gives_snr_beta2(snr):  # as SNRAdamW refuses it, instead of dropping it
        raise MegatronConfigError(
            "snr_beta2 applies to SNRPreconditioner; SNRAdamW's squared-gradient EMA is Adam's "
            "own: set the optimizer's adam_beta2"
        )
    opts = SNROptions.parse(snr).model_dump(exclude={"snr_beta2"})
    if opts["estimator"] == "cross_sample":
        raise MegatronConfigError(
            "snr estimator='cross_sample' is not supported with megatron-core: Megatron's DDP "
            "accumulates each micro-batch's gradient into its own grad buffer, where snr-dist's "
            "per-micro-batch hooks cannot see it. Allowed: estimator='temporal'."
        )
    return opts


def check_config(config, model_chunks) -> None:
    """Refuse the Megatron settings SNRAdamW cannot honour, naming the field."""
    checks = [
        (
            config.optimizer != "adam",
            f"OptimizerConfig.optimizer = {config.optimizer!r}: SNRAdamW takes Adam's "
            "settings; allowed: 'adam'",
        ),
        (
            config.use_distributed_optimizer,
            "OptimizerConfig.use_distributed_optimizer = True: Megatron's distributed "
            "optimizer hands the inner optimizer flat fp32 shards that cut across tensors, and "
            "per-matrix statistics on them would be wrong. Allowed: False (snr-dist shards "
            "its own trackers over the data-parallel ranks).",
        ),
        (
            config.optimizer_cpu_offload,
            "OptimizerConfig.optimizer_cpu_offload = True: offloading runs Megatron's own "
            "hybrid CPU/GPU Adam; allowed: False",
        ),
        (
            config.use_precision_aware_optimizer,
            "OptimizerConfig.use_precision_aware_optimizer = True needs Transformer Engine's "
            "FusedAdam; allowed: False",
        ),
        (
            not config.decoupled_weight_decay,
            "OptimizerConfig.decoupled_weight_decay = False asks for L2-coupled Adam; "
            "SNRAdamW's weight decay is decoupled (AdamW). Allowed: True",
        ),
    ]
    for chunk in model_chunks:
        ddp = getattr(chunk, "ddp_config", None)
        checks.append(
            (
                ddp is not None and getattr(ddp, "use_megatron_fsdp", False),
                "DistributedDataParallelConfig.use_megatron_fsdp = True: Megatron-FSDP "
                "shards parameters into DTensors snr-dist does not read; allowed: False",
            )
        )
        for name, p in chunk.named_parameters():
            checks.append(
                (
                    p.requires_grad and not getattr(p, "allreduce", True),
                    f"parameter {name!r} is a mixture-of-experts expert parameter (allreduce="
                    "False), replicated over the expert data-parallel group; snr-dist's "
                    "Megatron integration supports dense models only",
                )
            )
    for failed, msg in checks:
        if failed:
            raise MegatronConfigError(msg)


def build_param_groups(
    model_chunks: list, config, snr: dict[str, Any], config_overrides=None
) -> list[dict[str, Any]]:
    """Megatron's param groups (wd/lr multipliers), each split by SNR role.

    Every Megatron group yields the same number of SNR groups on every rank (some may be
    empty), because Megatron's distributed checkpoint needs identical param groups everywhere.
    """
    embeddings = embedding_params(model_chunks)
    mode, side = snr["mode"], snr["basis_side"]
    roles = _ROLES if mode == "subspace" else _ROLES[:1]
    groups = []
    for mgroup in _get_param_groups(model_chunks, config, config_overrides):
        by_role: dict[tuple[str, str], list[Tensor]] = {}
        for p in mgroup["params"]:
            by_role.setdefault(param_role(p, p in embeddings, mode, side), []).append(p)
        for role_mode, role_side in roles:
            key = (role_mode, role_side or side)
            group = {k: v for k, v in mgroup.items() if k != "params"}
            groups.append(
                {**group, "params": by_role.pop(key, []), "mode": key[0], "basis_side": key[1]}
            )
        assert not by_role, f"unrouted parameters: {list(by_role)}"
    return groups


def snr_adamw(
    model_chunks: list,
    config,
    snr: dict[str, Any] | None = None,
    config_overrides=None,
    pg_collection=None,
) -> SNRAdamW:
    """The inner `SNRAdamW` (unwrapped; runs on CPU); see `get_megatron_snr_optimizer`."""
    opts = _snr_options(snr)
    check_config(config, model_chunks)
    if opts.get("basis_side", "auto") != "auto":
        raise MegatronConfigError(
            f"snr basis_side = {opts['basis_side']!r}: under Megatron the basis side follows "
            "each weight's tensor-parallel split; allowed: 'auto'"
        )
    groups = build_param_groups(model_chunks, config, opts, config_overrides)
    kwargs = {k: v for k, v in opts.items() if k not in _ROUTED}
    return SNRAdamW(
        groups,
        lr=config.lr,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
        process_group=data_parallel_group(pg_collection),
        **kwargs,
    )


def init_state(opt: SNRAdamW, config=None) -> None:
    """Allocate every parameter's state (Megatron calls this before loading a checkpoint)."""
    opt.init_state()


# ---------------------------------------------------------------------- checkpoint layout


def _grid(sh) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(fragments per axis, this shard's index per axis)`` of a model parameter's sharding."""
    if isinstance(sh, ShardedTensorFactory):
        sh = next(t for t in nested_values(sh.build()) if isinstance(t, ShardedTensor))
    pre = sh.prepend_axis_num
    sizes = [1] * pre + list(sh.local_shape)
    index = tuple(off // max(size, 1) for off, size in zip(sh.global_offset, sizes))
    return tuple(sh.axis_fragmentations), index


def _per_shard(key: str, value: Tensor, sh, replica_id) -> ShardedTensor:
    """Small state kept per parameter shard (step, trackers), laid out on the shard grid."""
    frags, index = _grid(sh)
    offsets = [(i, index[i], frags[i]) for i in range(len(frags))]
    return ShardedTensor.from_rank_offsets(
        key, value, *offsets, replica_id=replica_id, prepend_axis_num=len(frags)
    )


def snr_sharded_state(
    opt: SNRAdamW, model_sharded_state_dict, model_params: list[Tensor]
) -> dict[int, dict[str, Any]]:
    """Per optimizer-param index, its state as sharded tensors (``model_params[i]`` is the
    model parameter of the optimizer's ``i``-th parameter)."""
    opt.init_state()
    id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, model_params)
    out: dict[int, dict[str, Any]] = {}
    values = opt.global_state()  # every data-parallel rank holds the complete state
    for index, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        if index not in id_map:
            raise KeyError(
                f"a parameter of shape {tuple(p.shape)} (optimizer index {index}) is not in "
                "the model's sharded_state_dict; build it with the same model chunks"
            )
        sh, kinds = id_map[index], opt.state_kinds(p)
        entry: dict[str, Any] = {}
        for k, v in values[p].items():
            if kinds.get(k) is Kind.PARAM and tuple(v.shape) == tuple(p.shape):
                entry[k] = make_sharded_optimizer_tensor(sh, v, prefix=f"optimizer.state.{k}")
            else:
                entry[k] = _per_shard(f"optimizer.state.{k}.{sh.key}", v, sh, sh.replica_id)
        out[index] = entry
    return out


def _groups_for_checkpoint(opt: SNRAdamW) -> list[dict[str, Any]]:
    groups = []
    for g in opt.param_groups:
        saved = {k: v for k, v in g.items() if k != "params"}
        saved["params"] = LocalNonpersistentObject(len(g["params"]))
        groups.append(saved)
    return groups


def load_snr_state(opt: SNRAdamW, state: dict[str, Any]) -> None:
    """Install a loaded ``{'param_groups', 'state'}`` (global values) into ``opt``."""
    saved_groups = state["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} SNRAdamW param groups; the optimizer has "
            f"{len(opt.param_groups)} (was it built with the same snr options?)"
        )
    for i, (old, group) in enumerate(zip(saved_groups, opt.param_groups)):
        old = complete_saved_group(old, opt.defaults)  # options an earlier release predates
        for k in (*SNROptions.model_fields, "betas"):
            if k in old and k in group and old[k] != group[k]:
                raise ValueError(
                    f"checkpoint was written with a different SNR configuration: param group {i} "
                    f"has {k}={old[k]!r} in the checkpoint but {group[k]!r} now"
                )
        for k in ("lr", "weight_decay", "eps"):
            if k in old:
                group[k] = old[k]
    params = [p for g in opt.param_groups for p in g["params"]]
    loaded = {params[i]: dict(st) for i, st in state["state"].items()}
    opt.load_global_state(loaded)


class _SNRCheckpointing:
    """``sharded_state_dict`` / ``load_state_dict`` for the SNR state (mixed into Megatron's
    FP32 and Float16 optimizer wrappers)."""

    optimizer: SNRAdamW

    def _model_params(self) -> list[Tensor]:
        return self.get_parameters()

    def _snr_state_dict(self, model_sharded_state_dict) -> dict[str, Any]:
        return {
            "param_groups": _groups_for_checkpoint(self.optimizer),
            "state": snr_sharded_state(
                self.optimizer, model_sharded_state_dict, self._model_params()
            ),
        }


class SNRFP32Optimizer(_SNRCheckpointing, FP32Optimizer):
    """Megatron's fp32 wrapper around SNRAdamW.

    ``FP32Optimizer.__init__`` only adds a unit loss scale allocated on ``'cuda'``; here it
    lives on the parameters' device, so the same wrapper also runs on CPU (tests).
    """

    def __init__(self, optimizer: SNRAdamW, config, init_state_fn=init_state) -> None:
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        params = self.get_parameters()
        device = params[0].device if params else torch.device("cpu")
        self._scale = torch.tensor([1.0], dtype=torch.float, device=device)
        self.is_stub_optimizer = optimizer is None

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        """A loaded `sharded_state_dict` (key ``"snr"``) or a plain ``state_dict()``."""
        if "snr" in state_dict:
            load_snr_state(self.optimizer, state_dict["snr"])
        else:
            self.optimizer.load_state_dict(state_dict)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        return {"snr": self._snr_state_dict(model_sharded_state_dict)}


class SNRFloat16Optimizer(_SNRCheckpointing, Float16OptimizerWithFloat16Params):
    """Megatron's bf16/fp16 wrapper (fp32 main parameters) around SNRAdamW (CUDA only, as
    Megatron's own)."""

    def __init__(self, optimizer: SNRAdamW, config, grad_scaler, init_state_fn=init_state):
        super().__init__(optimizer, config, grad_scaler, init_state_fn)
        # The wrapper swapped the bf16/fp16 params for fp32 main copies inside param_groups:
        # re-derive the SNR bookkeeping (owners, group lookup) for the new tensors.
        optimizer.sync_param_groups()

    def _model_params(self) -> list[Tensor]:
        model_of = {
            id(p.main_param): p for group in self.float16_groups for p in group
        }  # main (fp32) copy -> the model's bf16/fp16 parameter
        return [model_of.get(id(q), q) for q in self.get_parameters()]

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self._model_params())
        mains = {id(p.main_param): p.main_param for group in self.float16_groups for p in group}
        fp32_params = {
            i: make_sharded_optimizer_tensor(id_map[i], q, prefix="optimizer.state.fp32_param")
            for i, q in enumerate(self.get_parameters())
            if id(q) in mains
        }
        out = {"snr": self._snr_state_dict(model_sharded_state_dict)}
        out["fp32_from_fp16_params"] = fp32_params
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    def load_state_dict(self, state_dict) -> None:
        """A loaded `sharded_state_dict` (key ``"snr"``) or Megatron's plain ``state_dict()``
        (``"optimizer"``, ``"grad_scaler"``, ``"fp32_from_fp16_params"``: torch-format
        checkpoints), as `SNRFP32Optimizer` takes both."""
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "snr" not in state_dict:
            key = "optimizer" if "optimizer" in state_dict else "optimizer_state_dict"
            self.optimizer.load_state_dict(state_dict[key])
            saved = state_dict.get("fp32_from_fp16_params", state_dict.get("fp32_from_fp16", []))
            for current, kept in zip(self.fp32_from_float16_groups, saved):
                for param, value in zip(current, kept):
                    param.data.copy_(value.data)
            return
        load_snr_state(self.optimizer, state_dict["snr"])
        params = self.get_parameters()
        for i, value in state_dict.get("fp32_from_fp16_params", {}).items():
            params[i].data.copy_(value)


def _grad_scaler(config):
    if config.loss_scale:
        return ConstantGradScaler(config.loss_scale)
    if config.fp16:
        return DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    return None


def get_megatron_snr_optimizer(
    config,
    model_chunks: list,
    snr: dict[str, Any] | None = None,
    config_overrides=None,
    pg_collection=None,
) -> ChainedOptimizer:
    """SNRAdamW for Megatron model chunks, wrapped as Megatron wraps Adam.

    Args:
        config: megatron's ``OptimizerConfig`` (``optimizer='adam'``; lr, betas, eps, weight
            decay, bf16/fp16, clip_grad are used as for Adam).
        model_chunks: the model chunks (Megatron DDP-wrapped in training).
        snr: SNR options (`snr_dist.options`), e.g. ``{"mode": "subspace", "rank": 32}``;
            ``mode`` and ``basis_side`` are routed per parameter (module docstring).
        config_overrides: Megatron's per-parameter overrides (as for ``get_megatron_optimizer``).
        pg_collection: Megatron's ``ProcessGroupCollection``; default: ``parallel_state``.
    """
    inner = snr_adamw(model_chunks, config, snr, config_overrides, pg_collection)
    if config.fp16 or config.bf16:
        wrapped = SNRFloat16Optimizer(inner, config, _grad_scaler(config))
    else:
        wrapped = SNRFP32Optimizer(inner, config)
    mp_group = (
        pg_collection.mp
        if pg_collection is not None and hasattr(pg_collection, "mp")
        else parallel_state.get_model_parallel_group()
    )
    tp_group = (
        pg_collection.tp
        if pg_collection is not None and hasattr(pg_collection, "tp")
        else parallel_state.get_tensor_model_parallel_group()
    )
    wrapped.grad_stats_parallel_group = mp_group
    wrapped.tp_group = tp_group
    return ChainedOptimizer([wrapped])
