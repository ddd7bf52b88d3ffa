"""Hugging Face Transformers: `SNRAdamW` in ``transformers.Trainer``, and its SNR telemetry in
the Trainer's own loggers (``report_to``).

In one process and under DDP, Trainer needs nothing from snr-dist to *run* SNRAdamW: it is a
torch optimizer whose ``state_dict`` round-trips, so Trainer's gradient accumulation, gradient
clipping, LR schedulers, bf16 autocast and ``train(resume_from_checkpoint=...)`` work as with
AdamW (each backward pass of an accumulation step is one micro-batch of the cross-sample
estimator). This module exists for what is easy to get wrong:

- ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` builds ``cls(param_groups, **kwargs)``
  and takes nothing from ``TrainingArguments`` but the weight decay of each param group: not
  ``learning_rate``, ``adam_beta1/2`` or ``adam_epsilon``. `snr_adamw` returns the pair with
  them filled in, and with the data-parallel group the cross-sample estimator needs, resolved
  when Trainer builds the optimizer (after ``torch.distributed`` has started).
- With ``TrainingArguments(deepspeed=...)`` Trainer drops ``optimizer_cls_and_kwargs`` and
  ``optimizers`` when the JSON has an ``"optimizer"`` block (DeepSpeed's own Adam runs), never
  reads a ``"snr_preconditioner"`` block, and hands the optimizer to DeepSpeed without what
  `snr_dist.deepspeed.initialize` adds around that call (row shards for subspace mode and the
  cross-sample estimator under ZeRO 1-3 and bf16, no step while the engine is built).
  `snr_adamw` takes the two blocks' place (their options become SNRAdamW's), and `SNRTrainer`
  (Trainer's own ``create_optimizer`` / ``create_scheduler`` hooks) adds the rest, before the
  first step and before a checkpoint is loaded. A configuration plain Trainer cannot run is
  refused before the first step, naming `SNRTrainer`.
- Under FSDP2 Trainer builds the optimizer on plain tensors and shards the model afterwards:
  `SNRTrainer` hooks the cross-sample estimator on FSDP2's unsharded parameters.
- Callbacks passed as ``Trainer(callbacks=[...])`` run *after* the ``report_to`` integrations,
  which are callbacks too and write ``logs`` in their own ``on_log``; a callback that adds
  scalars to ``logs`` there adds them too late. `add_snr_metrics` puts `SNRMetricsCallback`
  first, so its scalars reach every logger.

Needs the ``transformers`` package (``pip install 'snr-dist[hf]'``), imported by this module
only.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snr_dist.integrations.transformers needs the transformers package: "
        "pip install 'snr-dist[hf]'"
    ) from None

import torch.distributed as dist

from snr_dist import deepspeed as snr_ds
from snr_dist.distributors.dtensor import is_dtensor
from snr_dist.integrations import telemetry
from snr_dist.integrations.wiring import adopt_fsdp2, attach_deepspeed
from snr_dist.integrations.wrappers import unwrap
from snr_dist.optim.snr_adamw import SNRAdamW
from snr_dist.options import SNROptions

__all__ = [
    "SNRMetricsCallback",
    "SNRTrainer",
    "StopMonitorCallback",
    "add_snr_metrics",
    "add_stop_monitor",
    "snr_adamw",
    "unwrap",
]

# SNRAdamW arguments that TrainingArguments owns (and where it keeps them).
_FROM_ARGS = {
    "lr": "learning_rate",
    "betas": "adam_beta1, adam_beta2",
    "eps": "adam_epsilon",
    "weight_decay": "weight_decay, applied per param group by the Trainer",
}


def snr_adamw(args: TrainingArguments, **options: Any) -> tuple[type[SNRAdamW], dict[str, Any]]:
    """``(SNRAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: ``lr``, ``betas``
    and ``eps`` from ``args``, read when Trainer builds the optimizer (so a
    ``hyperparameter_search`` trial's values reach it; Trainer sets ``args.weight_decay`` per
    param group itself), plus SNRAdamW's ``options`` (``estimator``, ``mode``, ``tau``,
    ``process_group``, ...).

    Without ``process_group`` (or with a ``None`` given before ``torch.distributed`` started,
    which is what ``dist.group.WORLD`` is then), the group is chosen when Trainer builds the
    optimizer: under DDP the world for the cross-sample estimator, under DeepSpeed DeepSpeed's
    ranks for the modes that exchange statistics.

    With ``args.deepspeed``, the JSON's ``"optimizer"`` block (its values are the ones
    ``TrainingArguments`` matched to it) and ``"snr_preconditioner"`` block leave the config
    Trainer hands DeepSpeed, so that Trainer builds SNRAdamW with the block's options (a key
    given both here and in the block with different values is refused). What plain Trainer
    cannot run under DeepSpeed (subspace mode or the cross-sample estimator on ZeRO 1-3 or
    bf16 partitions, any mode under fp16/bf16 at stage 0) is refused when it builds the
    optimizer, naming `SNRTrainer`, which runs it."""
    clash = sorted(set(options) & set(_FROM_ARGS))
    if clash:
        raise ValueError(
            f"snr_adamw: {clash[0]!r} comes from TrainingArguments "
            f"({_FROM_ARGS[clash[0]]}); set it there, not as an SNRAdamW option"
        )
    return SNRAdamW, _ArgsKwargs(args, options)


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def _deepspeed_config(args: TrainingArguments) -> dict | None:
    """The DeepSpeed config dict Trainer (and its Accelerator) will hand DeepSpeed."""
    hf = getattr(args, "hf_deepspeed_config", None) if args.deepspeed else None
    return None if hf is None else hf.config


def _take_blocks(args: TrainingArguments) -> dict[str, Any]:
    """The ``"snr_preconditioner"`` block's options, the ``"optimizer"`` and
    ``"snr_preconditioner"`` blocks taken out of the DeepSpeed config (once per config: the
    options stay with it for every later call)."""
    hf = args.hf_deepspeed_config
    taken = getattr(hf, "_snr_dist_block", None)
    if taken is None:
        _, taken = snr_ds.take_blocks(hf.config)
        hf._snr_dist_block = taken
    return taken


class _ArgsKwargs(Mapping):
    """SNRAdamW's keyword arguments, ``lr``, ``betas`` and ``eps`` read from ``args`` whenever
    they are read: Trainer builds the optimizer from them in ``create_optimizer``, and
    ``Trainer.hyperparameter_search`` sets each trial's values on the same ``args`` before
    building the trial's optimizer (values copied at call time would train every trial
    alike). The data-parallel group is resolved then too (see `snr_adamw`)."""

    def __init__(self, args: TrainingArguments, options: dict[str, Any]) -> None:
        self.args = args
        options = dict(options)
        if "process_group" in options and options["process_group"] is None and not _initialised():
            del options["process_group"]  # dist.group.WORLD before init_process_group
        self.options = options
        self.wired = False  # set by SNRTrainer, which wires DeepSpeed and FSDP2
        self.deepspeed = _deepspeed_config(args)
        if self.deepspeed is not None:
            block = _take_blocks(args)
            code = {k: v for k, v in options.items() if k in SNROptions.model_fields}
            merged = snr_ds.merge_options(code, block, "snr_adamw(args, ...)")
            snr_ds.check_support(self.deepspeed, SNROptions.model_validate(merged))
            self.options.update(merged)

    def _refusal(self) -> str | None:
        """Why plain Trainer cannot run this under its DeepSpeed config (None: it can)."""
        cfg = self.deepspeed
        if cfg is None or self.wired:
            return None
        snr = SNROptions.model_validate(
            {k: v for k, v in self.options.items() if k in SNROptions.model_fields}
        )
        stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
        low = [k for k in ("bf16", "fp16") if (cfg.get(k) or {}).get("enabled") is True]
        if snr_ds.needs_rows(snr) and (stage or low):
            where = f"ZeRO stage {stage}" if stage else f"{low[0]} at ZeRO stage 0"
            what = f"mode={snr.mode!r}" if snr.mode == "subspace" else "estimator='cross_sample'"
            return (
                f"{what} under DeepSpeed {where}: DeepSpeed hands the optimizer flat partitions "
                "that cut across the model's tensors, and SNRAdamW runs such a mode on row "
                "shards that must be attached after DeepSpeed has built its optimizer and "
                "before a checkpoint is loaded, which plain Trainer does not do"
            )
        if low and not stage:
            return (
                f"{low[0]} at ZeRO stage 0: DeepSpeed's unfused {low[0]} optimizer steps the "
                "client optimizer once on zero gradients while it is built (decaying the "
                "weights and counting a step), which plain Trainer does not prevent"
            )
        return None

    def _group(self, options: dict[str, Any]) -> Any:
        """The data-parallel group for an optimizer Trainer builds now."""
        snr = SNROptions.model_validate(
            {k: v for k, v in options.items() if k in SNROptions.model_fields}
        )
        if self.deepspeed is not None:
            return snr_ds.data_parallel_group(snr)
        several = _initialised() and dist.get_world_size() > 1
        if snr.estimator == "cross_sample" and several:
            return dist.group.WORLD  # Trainer's DDP spans the world
        return "auto"

    def _now(self) -> dict[str, Any]:
        why = self._refusal()
        if why is not None:
            raise RuntimeError(
                f"snr-dist: {why}. Use snr_dist.integrations.transformers.SNRTrainer in place "
                "of transformers.Trainer (same arguments); it runs this configuration"
            )
        a = self.args
        out = {
            "lr": a.learning_rate,
            "betas": (a.adam_beta1, a.adam_beta2),
            "eps": a.adam_epsilon,
            **self.options,
        }
        if "process_group" not in out:
            group = self._group(out)
            if group != "auto":  # SNRAdamW's default
                out["process_group"] = group
        return out

    def __getitem__(self, key: str) -> Any:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())

    def __repr__(self) -> str:
        return repr(self._now())


class SNRMetricsCallback(TrainerCallback):
    """Adds the SNR telemetry (`snr_dist.integrations.telemetry.scalars`: gate mean, share of
    closed gates, SNR quantiles, per layer group and over ``all``) to the Trainer's logs at every
    logging step, and to ``trainer.state.log_history``.

    Install it with `add_snr_metrics` (first in the callback list, so that the ``report_to``
    loggers see the scalars); TensorBoard shows them under ``train/snr/...`` (Trainer's
    TensorBoard callback prefixes training logs with ``train/``).

    Args:
        prefix: prepended to every key (``"snr/"``: ``snr/transformer.h.0.mlp.c_fc/gate_mean``).
        per_layer: also log each layer group (False: only ``<prefix>all/...``).
    """

    def __init__(self, prefix: str = "snr/", per_layer: bool = True) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        self.prefix = prefix
        self.per_layer = bool(per_layer)
        self.placed = False  # set by add_snr_metrics: runs before the report_to loggers
        self._groups: dict | None = None
        self._model_id: int | None = None
        self._last_step: int | None = None
        self._warned = False

    def values(self, optimizer: Any, model: Any) -> dict[str, float]:
        """The scalars for ``optimizer`` (an SNR optimizer, possibly wrapped) and ``model``;
        empty before the first step."""
        opt = unwrap(optimizer)
        if opt is None:
            inner = getattr(optimizer, "optimizer", None)
            found = type(optimizer).__name__
            if inner is not None:
                found += f" around {type(inner).__name__}"
            if "deepspeed" in type(optimizer).__module__ + type(inner).__module__:
                why = (
                    "; under TrainingArguments(deepspeed=...) Trainer builds the optimizer "
                    "itself and drops optimizers=(...) and optimizer_cls_and_kwargs: with an "
                    '"optimizer" block in the JSON DeepSpeed\'s own optimizer runs. Use '
                    "snr_dist.integrations.transformers.SNRTrainer (or "
                    "optimizer_cls_and_kwargs=snr_adamw(args)), which builds SNRAdamW from the "
                    'JSON\'s "optimizer" and "snr_preconditioner" blocks'
                )
            else:
                why = (
                    "; pass optimizer_cls_and_kwargs=snr_adamw(args) or "
                    "optimizers=(SNRAdamW(...), None) to the Trainer"
                )
            raise TypeError(
                f"SNRMetricsCallback: the Trainer's optimizer is {found}, with no SNRAdamW / "
                f"SNRPreconditioner inside{why}"
            )
        if self._groups is None or self._model_id != id(model):
            self._groups = telemetry.layer_groups(model)
            self._model_id = id(model)
        out = telemetry.scalars(opt, self._groups, prefix=self.prefix)
        if not self.per_layer:
            out = {k: v for k, v in out.items() if k.startswith(self.prefix + "all/")}
        return out

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        """Before the first step: the Trainer's optimizer must be an SNR optimizer (under
        DeepSpeed Trainer may have built another one)."""
        if optimizer is not None and unwrap(optimizer) is None:
            self.values(optimizer, None)  # raises, naming what was found

    def on_log(self, args, state, control, logs=None, model=None, optimizer=None, **kwargs):
        """Add the scalars to ``logs`` once per optimizer step (evaluation logs and the final
        summary at the same step do not repeat them)."""
        if logs is None or model is None or optimizer is None:
            return
        if state.global_step == self._last_step:
            return
        values = self.values(optimizer, model)
        if not values:  # before the first optimizer step
            return
        self._last_step = state.global_step
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)  # Trainer.log stored a copy of logs just before
        report_to = args.report_to or []
        report_to = [report_to] if isinstance(report_to, str) else report_to
        reporters = [r for r in report_to if r != "none"]
        if not self.placed and reporters and not self._warned:
            self._warned = True
            warnings.warn(
                "SNRMetricsCallback was not installed with "
                "snr_dist.integrations.transformers.add_snr_metrics(trainer): callbacks passed "
                f"as Trainer(callbacks=[...]) run after the report_to loggers ({reporters}), so "
                "the SNR scalars reach trainer.state.log_history but not those loggers",
                stacklevel=2,
            )


def add_snr_metrics(trainer: Trainer, **kwargs: Any) -> SNRMetricsCallback:
    """Install an `SNRMetricsCallback` (``kwargs``: its arguments) first among ``trainer``'s
    callbacks, ahead of the ``report_to`` loggers; returns it."""
    handler = trainer.callback_handler
    if any(isinstance(cb, SNRMetricsCallback) for cb in handler.callbacks):
        raise ValueError("this Trainer already has an SNRMetricsCallback")
    callback = SNRMetricsCallback(**kwargs)
    callback.placed = True
    handler.callbacks.insert(0, callback)
    return callback


class StopMonitorCallback(TrainerCallback):
    """Stop a Trainer run with the validation-free stop (`snr_dist.stopping.StopMonitor`): it
    watches the gradients the optimizer steps (any optimizer: AdamW, SNRAdamW, DeepSpeed's
    and Accelerate's wrappers included) and sets ``control.should_training_stop`` once its
    rule fires; its reading goes into the logs as ``stop/ratio`` (and ``stop/step`` when it
    fires). The monitor's state is saved in every checkpoint folder (one file per rank) and
    restored when training resumes: from ``resume_from`` if given, else from
    ``args.resume_from_checkpoint`` or ``<output_dir>/checkpoint-<step>`` (a callback cannot
    see the path given to ``train(resume_from_checkpoint=...)``: pass it as ``resume_from``
    when it lies elsewhere; without its state the monitor starts afresh, with a warning).

    Install it with `add_stop_monitor` (first among the callbacks, so that the ``report_to``
    loggers see its keys). ``monitor_options``: `StopMonitor`'s keyword arguments (``rule``,
    ``threshold``, ``patience``, ...); ``dataset_size`` and ``batch_size`` default to the
    training set's length and the global batch (per-device batch x accumulation x processes).
    ``stop=False`` only reports.
    """

    def __init__(
        self, stop: bool = True, resume_from: str | Path | None = None, **monitor_options: Any
    ) -> None:
        self.stop = bool(stop)
        self.resume_from = resume_from
        self.options = monitor_options
        self.monitor = None
        self.placed = False

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from snr_dist.integrations import early_stop

        if optimizer is None:
            raise ValueError("StopMonitorCallback: the Trainer passed no optimizer")
        options = dict(self.options)
        loader = kwargs.get("train_dataloader")
        if "dataset_size" not in options:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError(
                    "StopMonitorCallback: the training set has no length (an iterable "
                    "dataset); pass dataset_size=... (examples per epoch)"
                )
            options["dataset_size"] = len(dataset)
        options.setdefault(
            "batch_size",
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        )
        self.monitor = early_stop.build(optimizer, **options)
        if state.global_step > 0:  # resumed: the state saved beside that checkpoint
            candidates = [self.resume_from, args.resume_from_checkpoint]
            candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
            folder = next(
                (
                    Path(c)
                    for c in candidates
                    if isinstance(c, (str, Path)) and (Path(c) / early_stop.file_name()).is_file()
                ),
                None,
            )
            early_stop.load(self.monitor, folder, state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop and self.monitor is not None and self.monitor.should_stop:
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        from snr_dist.integrations import early_stop

        if self.monitor is not None:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            early_stop.save(self.monitor, folder, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self.monitor is None:
            return
        m = self.monitor.metrics()
        values = {}
        if m.get("ratio") is not None:
            values["stop/ratio"] = m["ratio"]
        if m["stop_step"] is not None:
            values["stop/step"] = m["stop_step"]
        logs.update(values)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(values)  # Trainer.log stored a copy of logs just before

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()


def add_stop_monitor(trainer: Trainer, **kwargs: Any) -> StopMonitorCallback:
    """Install a `StopMonitorCallback` (``kwargs``: its arguments) first among ``trainer``'s
    callbacks; returns it."""
    handler = trainer.callback_handler
    if any(isinstance(cb, StopMonitorCallback) for cb in handler.callbacks):
        raise ValueError("this Trainer already has a StopMonitorCallback")
    callback = StopMonitorCallback(**kwargs)
    callback.placed = True
    handler.callbacks.insert(0, callback)
    return callback


class SNRTrainer(Trainer):
    """``transformers.Trainer`` that trains with SNRAdamW under every parallelism Trainer
    offers: one process, DDP, DeepSpeed (``TrainingArguments(deepspeed=...)``, ZeRO 0-3, the
    JSON's ``"optimizer"`` and ``"snr_preconditioner"`` blocks) and FSDP2. Takes Trainer's
    arguments; the optimizer comes from ``optimizer_cls_and_kwargs=snr_adamw(args, **options)``
    (``snr_adamw(args)`` when not given) with the DeepSpeed JSON's blocks on top.

    What it adds to Trainer, through Trainer's own hooks: ``create_optimizer`` builds
    SNRAdamW (no step while DeepSpeed builds its engine); ``create_scheduler``, which Trainer
    calls once ``accelerator.prepare`` has built the DeepSpeed engine or sharded the model and
    before it loads a checkpoint, attaches the row shards that subspace mode and the
    cross-sample estimator need on ZeRO's partitions (`SNRAdamW.attach_zero`), or moves the
    optimizer to FSDP2's DTensors and hooks the cross-sample estimator there. Training refuses
    to start if that did not happen. Works as a base class next to other Trainer subclasses
    (``class MyTrainer(SNRTrainer, SFTTrainer)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pair = self.optimizer_cls_and_kwargs
        if self.optimizer is not None:
            if self.is_deepspeed_enabled:
                raise ValueError(
                    "SNRTrainer under DeepSpeed: Trainer builds the optimizer itself and would "
                    "drop the one passed as optimizers=(...); pass its SNR options as "
                    "optimizer_cls_and_kwargs=snr_adamw(args, **options) or in the JSON's "
                    '"snr_preconditioner" block'
                )
        elif pair is None:
            self.optimizer_cls_and_kwargs = snr_adamw(self.args)
        elif pair[0] is not SNRAdamW or not isinstance(pair[1], _ArgsKwargs):
            raise ValueError(
                "SNRTrainer builds SNRAdamW: pass optimizer_cls_and_kwargs=snr_adamw(args, "
                f"**options) or nothing, not ({getattr(pair[0], '__name__', pair[0])}, ...)"
            )
        if self.optimizer_cls_and_kwargs is not None:
            self.optimizer_cls_and_kwargs[1].wired = True
        self._snr_wired = False
        self.add_callback(_WiringCheck(self))

    def create_optimizer(self, model=None):
        fresh = self.optimizer is None  # Trainer's DeepSpeed setup builds one per train()
        opt = super().create_optimizer(model)
        if fresh:
            self._snr_wired = False
            snr = unwrap(opt)
            if self.is_deepspeed_enabled and isinstance(snr, SNRAdamW):
                snr._defer_steps = True  # accelerator.prepare builds the engine: see _wire
        return opt

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        self._wire()
        return super().create_scheduler(num_training_steps, optimizer)

    def _wire(self) -> None:
        """Once ``accelerator.prepare`` has run (Trainer creates the scheduler then, before
        it loads a checkpoint): what `snr_dist.deepspeed.initialize` adds around
        ``deepspeed.initialize``, or the FSDP2 side of `snr_dist.integrations.wiring`."""
        if self._snr_wired or self.optimizer is None:
            return
        snr = unwrap(self.optimizer)
        if snr is None:
            return
        if self.is_deepspeed_enabled:
            if snr is self.optimizer:
                return  # not prepared yet (Trainer.create_optimizer_and_scheduler)
            snr._defer_steps = False
            attach_deepspeed(self.optimizer)
        elif self.is_fsdp_enabled:
            params = [p for g in snr.param_groups for p in g["params"]]
            if not any(is_dtensor(p) for p in params):
                return  # not sharded yet (FSDP1 is refused by SNRAdamW itself)
            adopt_fsdp2(self.model_wrapped, self.optimizer)
        self._snr_wired = True


class _WiringCheck(TrainerCallback):
    """Refuses to train an `SNRTrainer` whose optimizer was not wired before the first step
    (a transformers release that calls its hooks in another order)."""

    def __init__(self, trainer: SNRTrainer) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        trainer = self._trainer()
        if trainer is None or optimizer is None:
            return
        snr = unwrap(optimizer)
        if snr is None:
            return
        if trainer.is_deepspeed_enabled and not trainer._snr_wired:
            raise RuntimeError(
                "snr-dist: SNRTrainer did not get to wire SNRAdamW into DeepSpeed before "
                "training (Trainer.create_scheduler was not called after accelerator.prepare in "
                "this transformers release); train with snr_dist.integrations.accelerate.prepare "
                "or snr_dist.deepspeed.initialize"
            )
