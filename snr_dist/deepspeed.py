"""DeepSpeed: enable snr-dist from the DeepSpeed JSON config.

A user's script changes one import line::

    engine, optimizer, _, lr_scheduler = snr_dist.deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config="ds_config.json")

with a top-level ``"snr_preconditioner"`` block in the JSON (every key optional, unknown keys
rejected)::

    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.999],
                                              "eps": 1e-8, "weight_decay": 0.01}},
    "snr_preconditioner": {"estimator": "temporal", "mode": "diagonal", "gate": "wiener",
                           "tau": 1.0, "snr_beta": 0.99, "warmup_steps": 0}

`initialize` builds `snr_dist.SNRAdamW` from the ``"optimizer"`` block (type Adam or AdamW) and
the ``"snr_preconditioner"`` block, hands it to DeepSpeed as a client optimizer (setting
``zero_allow_untested_optimizer``), and returns DeepSpeed's usual ``(engine, optimizer,
dataloader, lr_scheduler)``. A ``"scheduler"`` block keeps working.

What each ZeRO stage allows, and why:

- Diagonal temporal mode is elementwise: it runs on the flat fp32 partitions that ZeRO 1-3
  hand the client optimizer, in fp32, bf16 and fp16 configs, and adds no communication.
- Subspace mode and the cross-sample estimator need whole rows of each matrix and each rank's
  own micro-batch gradients. Stage 0 in fp32 keeps the model's parameters (replicated, as under
  DDP); bf16 at stage 0 keeps whole fp32 copies of them. Under ZeRO 1-3 the partitions cut
  across tensors, so `initialize` attaches `snr_dist.optim.zero_view`: each rank steps the rows
  whose first element its partition holds, rows cut by a partition boundary are completed by a
  small exchange, and the per-rank gradients come from tensor hooks on the model's parameters
  (they run before accumulation, so before ZeRO's reduction hooks). fp16 is refused for these
  (not tested), and so is ``basis_side="rows"`` (bases live on the column side of row shards).
- ``offload_optimizer`` needs DeepSpeed's own CPU Adam and is refused.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch.distributed as dist
from pydantic import ValidationError

from snr_dist.options import SNROptions, error_lines

_OPTIMIZER_TYPES = {"adam", "adamw"}
_DEEPSPEED_DEFAULT_CLIPPING = 1.0  # deepspeed.runtime.constants.GRADIENT_CLIPPING_DEFAULT
_OPTIMIZER_PARAMS = {"lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam"}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON config that snr-dist cannot run, with the key and the reason."""


def _load(config) -> dict[str, Any]:
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        if not path.is_file():
            raise DeepSpeedConfigError(f"DeepSpeed config not found: {path}")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"{path}: not valid JSON: {e}") from None
    if isinstance(config, dict):
        return copy.deepcopy(config)
    raise DeepSpeedConfigError(f"config must be a path or a dict, got {type(config).__name__}")


def _snr_block(cfg: dict) -> SNROptions:
    block = cfg.pop("snr_preconditioner", {})
    if not isinstance(block, dict):
        raise DeepSpeedConfigError(
            f"snr_preconditioner must be a JSON object, got {type(block).__name__}"
        )
    if "snr_beta2" in block:
        raise DeepSpeedConfigError(
            "snr_preconditioner.snr_beta2: applies to SNRPreconditioner; SNRAdamW's "
            "squared-gradient EMA is Adam's own (optimizer.params.betas[1])"
        )
    try:
        return SNROptions.model_validate(block)
    except ValidationError as err:
        lines = error_lines(err, prefix="snr_preconditioner.")
        raise DeepSpeedConfigError(
            "invalid snr_preconditioner block:\n  " + "\n  ".join(lines)
        ) from None


def experiment_options(snr: SNROptions | None, ds_config: dict) -> SNROptions:
    """An experiment's SNRAdamW options under ``snr-dist train --deepspeed``: the JSON's
    ``"snr_preconditioner"`` block, when present, overrides the keys it names."""
    base = (snr or SNROptions()).model_dump()
    block = _snr_block({"snr_preconditioner": ds_config.get("snr_preconditioner", {})})
    given = block.model_dump(exclude_unset=True)
    try:
        return SNROptions.model_validate({**base, **given})
    except ValidationError as err:  # each part valid alone, not together
        lines = error_lines(err, prefix="")
        named = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise DeepSpeedConfigError(
            f"the experiment's SNR options with the snr_preconditioner block's ({named}) "
            "on top do not go together:\n  " + "\n  ".join(lines)
        ) from None


def _adam_options(cfg: dict) -> dict[str, Any]:
    block = cfg.pop("optimizer", None)
    if block is None:
        raise DeepSpeedConfigError(
            'snr_dist.deepspeed.initialize needs an "optimizer" block of type "Adam" or '
            '"AdamW" (its lr, betas, eps, weight_decay configure SNRAdamW)'
        )
    kind = str(block.get("type", "")).lower()
    if kind not in _OPTIMIZER_TYPES:
        raise DeepSpeedConfigError(
            f"optimizer.type = {block.get('type')!r}: snr-dist builds SNRAdamW, so the type "
            'must be "Adam" or "AdamW"'
        )
    params = dict(block.get("params", {}))
    unknown = sorted(set(params) - _OPTIMIZER_PARAMS)
    if unknown:
        raise DeepSpeedConfigError(
            f"optimizer.params: unknown key(s) {unknown}; allowed: {sorted(_OPTIMIZER_PARAMS)}"
        )
    if params.pop("adam_w_mode", True) is False and params.get("weight_decay", 0):
        raise DeepSpeedConfigError(
            "optimizer.params.adam_w_mode = false with weight_decay > 0 asks for L2-coupled "
            "Adam; SNRAdamW's weight decay is decoupled (AdamW)"
        )
    params.pop("torch_adam", None)
    if isinstance(params.get("betas"), list):
        params["betas"] = tuple(params["betas"])
    return params


def check_support(cfg: dict, snr: SNROptions) -> int:
    """Refuse the stage / mode / dtype combinations that would be wrong; returns the stage."""
    zero = cfg.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage = {stage!r}: allowed 0, 1, 2, 3")
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload not in (None, "none"):
        raise DeepSpeedConfigError(
            f"zero_optimization.offload_optimizer.device = {offload!r}: optimizer offload runs "
            "DeepSpeed's own CPU Adam, not a client optimizer such as SNRAdamW; remove the "
            "offload_optimizer block"
        )
    fp16 = (cfg.get("fp16") or {}).get("enabled")
    if needs_rows(snr) and fp16:
        what = f"mode='{snr.mode}'" if snr.mode == "subspace" else f"estimator='{snr.estimator}'"
        raise DeepSpeedConfigError(
            f"snr_preconditioner {what} with fp16.enabled = true: not supported yet (DeepSpeed's "
            "fp16 optimizers skip loss-scale overflow steps in ways snr-dist's row shards are "
            "not tested against). Use bf16 (every ZeRO stage), or mode='diagonal' with "
            "estimator='temporal', which runs under fp16."
        )
    bf16 = (cfg.get("bf16") or {}).get("enabled")
    if needs_rows(snr) and snr.mode == "subspace" and snr.basis_side == "rows" and (stage or bf16):
        raise DeepSpeedConfigError(
            "snr_preconditioner.basis_side = 'rows' under "
            + (f"ZeRO stage {stage}" if stage else "bf16")
            + ": snr-dist runs there on row shards of each matrix (whole rows per rank), so a "
            "tracker's basis must live on the column side; allowed: 'auto' or 'cols'"
        )
    return stage


def needs_rows(snr: SNROptions) -> bool:
    """Estimators whose statistics are sums over whole rows (not elementwise): under ZeRO and
    DeepSpeed's bf16 optimizer they run on row shards (`snr_dist.optim.zero_view`)."""
    return snr.mode == "subspace" or snr.estimator == "cross_sample"


def take_blocks(cfg: dict) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """For a framework that builds the client optimizer itself and hands DeepSpeed the rest of
    the config (HF Trainer, Accelerate's DeepSpeed plugin, Lightning's DeepSpeed strategy):
    take the ``"optimizer"`` and ``"snr_preconditioner"`` blocks out of ``cfg`` (in place),
    validated. Returns ``(SNRAdamW's Adam options from the "optimizer" block, None without
    one; the SNR options the "snr_preconditioner" block names)``. Values a framework has not
    filled in yet stay ``"auto"``."""
    snr = _snr_block(cfg)
    adam = _adam_options(cfg) if "optimizer" in cfg else None
    return adam, snr.model_dump(exclude_unset=True)


def merge_options(code: dict[str, Any], block: dict[str, Any], code_name: str) -> dict[str, Any]:
    """The SNR options given in code (``code_name`` says where) and those the JSON's
    ``"snr_preconditioner"`` block names, together; a key both give with different values is
    refused, naming both."""
    for key, value in block.items():
        if key in code and code[key] != value:
            raise DeepSpeedConfigError(
                f"snr_preconditioner.{key} = {value!r} in the DeepSpeed config, but {code_name} "
                f"says {key}={code[key]!r}: set it in one place"
            )
    try:
        SNROptions.model_validate({**code, **block})
    except ValidationError as err:  # each part valid alone, not together
        lines = error_lines(err, prefix="")
        raise DeepSpeedConfigError(
            f"the SNR options of {code_name} with the snr_preconditioner block's on top do not "
            "go together:\n  " + "\n  ".join(lines)
        ) from None
    return {**code, **block}


def from_blocks(cfg: dict, params, adam: dict[str, Any], block: dict[str, Any]) -> Any:
    """SNRAdamW for ``params`` from the blocks `take_blocks` took out of ``cfg`` (Adam
    options still ``"auto"`` are left to SNRAdamW's defaults; a framework fills its own
    first), checked against the rest of ``cfg`` as `build` checks it."""
    from snr_dist.optim.snr_adamw import SNRAdamW

    snr = SNROptions.model_validate(block)
    check_support(cfg, snr)
    warn_clipping(cfg, snr, stacklevel=4)
    kw = {k: v for k, v in adam.items() if v != "auto"}
    return SNRAdamW(params, **kw, snr=snr, process_group=data_parallel_group(snr))


def check_agrees(cfg: dict, opt: Any, block: dict[str, Any], where: str, ways: str) -> None:
    """An SNR optimizer built in code (``where`` says how) under a config whose
    ``"snr_preconditioner"`` block names options: every param group must run them, and what it
    runs must be supported by the config (`check_support`); else refused, naming ``ways``."""
    for gi, group in enumerate(opt.param_groups):
        for key, value in block.items():
            if group.get(key) != value:
                raise DeepSpeedConfigError(
                    f"snr_preconditioner.{key} = {value!r} in the DeepSpeed config, but the "
                    f"optimizer {where} has {key}={group.get(key)!r} (param group {gi}): {ways}"
                )
        check_support(
            cfg, SNROptions.parse({k: group[k] for k in SNROptions.model_fields if k in group})
        )


def warn_clipping(cfg: dict, snr: SNROptions, stacklevel: int = 3) -> None:
    """The cross-sample estimator's statistics come from gradients before DeepSpeed clips
    them; say so when the config clips (DeepSpeed clips at 1.0 when the key is absent)."""
    clip = cfg.get("gradient_clipping", _DEEPSPEED_DEFAULT_CLIPPING)
    if snr.estimator == "cross_sample" and clip:
        warnings.warn(
            f"DeepSpeed clips gradients at {clip} (gradient_clipping"
            + ("" if "gradient_clipping" in cfg else "; DeepSpeed's default when the key is absent")
            + "): the cross-sample estimator's statistics come from the gradients before "
            "clipping, and under data parallelism it does not correct for the rescaling. Set "
            '"gradient_clipping": 0.0 for exact statistics.',
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )


def data_parallel_group(snr: SNROptions) -> Any:
    """The process group SNRAdamW runs over under DeepSpeed: none for the elementwise mode
    (diagonal temporal), which needs no communication; else DeepSpeed's ranks (stage 0 keeps
    whole, replicated parameters, as DDP does; ZeRO 1-3 move to row shards at attach)."""
    elementwise = snr.mode == "diagonal" and snr.estimator == "temporal"
    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return dist.group.WORLD if several and not elementwise else None


def build(config, model_parameters) -> tuple[Any, dict[str, Any]]:
    """``(SNRAdamW, the config to hand DeepSpeed)`` without starting DeepSpeed."""
    cfg = _load(config)
    snr = _snr_block(cfg)
    adam = _adam_options(cfg)
    opt = from_blocks(cfg, model_parameters, adam, snr.model_dump(exclude_unset=True))
    cfg["zero_allow_untested_optimizer"] = True
    return opt, cfg


def _given_config(args: Any, config: Any, config_params: Any) -> Any:
    """The config as `deepspeed.initialize` finds it: ``config``, its older name
    ``config_params``, or ``args.deepspeed_config`` (``--deepspeed_config``, from
    ``deepspeed.add_config_arguments``); exactly one of them."""
    given = {"config": config, "config_params": config_params}
    for name in ("deepspeed_config", "deepscale_config"):
        if getattr(args, name, None) is not None:
            given[f"args.{name}"] = getattr(args, name)
    named = [k for k, v in given.items() if v is not None]
    if len(named) != 1:
        raise DeepSpeedConfigError(
            "snr_dist.deepspeed.initialize needs the DeepSpeed config exactly once, as "
            "config=, config_params= or args.deepspeed_config (--deepspeed_config); got "
            + (", ".join(named) if named else "none")
        )
    return given[named[0]]


def initialize(
    model=None, config=None, model_parameters=None, *, args=None, config_params=None, **kwargs
):
    """`deepspeed.initialize` with SNRAdamW built from the JSON; see the module docstring.

    Takes what `deepspeed.initialize` takes, by keyword: ``args`` (with
    ``args.deepspeed_config``), ``config`` or ``config_params``, ``model_parameters``,
    ``training_data``, ``lr_scheduler``, ``mpu``, ... (not ``optimizer``: it is built here)."""
    import deepspeed

    if "optimizer" in kwargs:
        raise DeepSpeedConfigError(
            'pass the optimizer settings in the config\'s "optimizer" block, not optimizer='
        )
    if model is None:
        raise DeepSpeedConfigError("snr_dist.deepspeed.initialize needs a model (model=...)")
    config = _given_config(args, config, config_params)
    params = model_parameters if model_parameters is not None else model.parameters()
    if not dist.is_initialized():  # as deepspeed.initialize would, before the optimizer exists
        deepspeed.init_distributed()
    opt, cfg = build(config, params)
    # DeepSpeed's unfused bf16/fp16 wrapper (stage 0) "initialises optimizer states" by a step
    # with zero gradients; SNRAdamW allocates its state at the first real step, and that fake
    # step would count as one (decaying the weights, advancing the bias corrections).
    opt._defer_steps = True
    # ``args`` still reaches DeepSpeed (it sets ``args.local_rank``), without the config file it
    # names: DeepSpeed gets the config this function derived, and refuses to be given two
    hidden = {
        n: getattr(args, n) for n in ("deepspeed_config", "deepscale_config") if hasattr(args, n)
    }
    try:
        for n in hidden:
            setattr(args, n, None)
        if args is not None:
            kwargs["args"] = args
        out = deepspeed.initialize(model=model, optimizer=opt, config=cfg, **kwargs)
    finally:
        opt._defer_steps = False
        for n, v in hidden.items():
            setattr(args, n, v)
    engine, wrapper = out[0], out[1]
    if wrapper is not opt and needs_rows(_snr_block(_load(config))):
        # ZeRO 1-3 or the bf16 optimizer: it handed SNRAdamW flat partitions
        opt.attach_zero(wrapper, getattr(wrapper, "dp_process_group", None))
    # the engine's own load_checkpoint, which also loads ZeRO checkpoints of another world size
    engine.load_checkpoint = functools.partial(load_checkpoint, engine)
    return out


def load_checkpoint(engine, load_dir, tag=None, **kwargs):
    """``engine.load_checkpoint(load_dir, tag, ...)`` (the same keywords and return value) that
    also resumes a ZeRO 1-3 checkpoint written by another number of data-parallel ranks: the
    fp32 weights, elementwise optimizer state and snr-dist's row-shard state are resharded to
    this world (`snr_dist.zero_reshard`). Engines from `initialize` call it as their own
    ``load_checkpoint``; call it on an engine built another way. Every rank calls it."""
    from snr_dist.zero_reshard import load_checkpoint as reshard_load

    return reshard_load(engine, load_dir, tag, **kwargs)


def __getattr__(name: str) -> Any:
    """The rest of `deepspeed` (``add_config_arguments``, ``init_distributed``, ...), so that
    ``import snr_dist.deepspeed as deepspeed`` leaves the rest of a DeepSpeed script working."""
    if name.startswith("__"):
        raise AttributeError(name)
    import deepspeed

    return getattr(deepspeed, name)
