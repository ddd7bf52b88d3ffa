"""Hugging Face Transformers: `SNRAdamW` in ``transformers.Trainer``, and its SNR telemetry in
the Trainer's own loggers (``report_to``).

Trainer needs nothing from snr-dist to *run* SNRAdamW: it is a torch optimizer whose
``state_dict`` round-trips, so Trainer's gradient accumulation, gradient clipping, LR
schedulers, bf16 autocast and ``train(resume_from_checkpoint=...)`` work as with AdamW (each
backward pass of an accumulation step is one micro-batch of the cross-sample estimator). This
module exists for two details that are easy to get wrong:

- ``Trainer(optimizer_cls_and_kwargs=(cls, kwargs))`` builds ``cls(param_groups, **kwargs)``
  and takes nothing from ``TrainingArguments`` but the weight decay of each param group: not
  ``learning_rate``, ``adam_beta1/2`` or ``adam_epsilon``. `snr_adamw` returns the pair with
  them filled in.
- Callbacks passed as ``Trainer(callbacks=[...])`` run *after* the ``report_to`` integrations,
  which are callbacks too and write ``logs`` in their own ``on_log``; a callback that adds
  scalars to ``logs`` there adds them too late. `add_snr_metrics` puts `SNRMetricsCallback`
  first, so its scalars reach every logger.

Needs the ``transformers`` package (``pip install 'snr-dist[hf]'``), imported by this module
only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snr_dist.integrations.transformers needs the transformers package: "
        "pip install 'snr-dist[hf]'"
    ) from None

from snr_dist.integrations import telemetry
from snr_dist.integrations.wrappers import unwrap
from snr_dist.optim.snr_adamw import SNRAdamW

__all__ = ["SNRMetricsCallback", "add_snr_metrics", "snr_adamw", "unwrap"]

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
    ``process_group``, ...)."""
    clash = sorted(set(options) & set(_FROM_ARGS))
    if clash:
        raise ValueError(
            f"snr_adamw: {clash[0]!r} comes from TrainingArguments "
            f"({_FROM_ARGS[clash[0]]}); set it there, not as an SNRAdamW option"
        )
    return SNRAdamW, _ArgsKwargs(args, options)


class _ArgsKwargs(Mapping):
    """SNRAdamW's keyword arguments, ``lr``, ``betas`` and ``eps`` read from ``args`` whenever
    they are read: Trainer builds the optimizer from them in ``create_optimizer``, and
    ``Trainer.hyperparameter_search`` sets each trial's values on the same ``args`` before
    building the trial's optimizer (values copied at call time would train every trial
    alike)."""

    def __init__(self, args: TrainingArguments, options: dict[str, Any]) -> None:
        self.args = args
        self.options = dict(options)

    def _now(self) -> dict[str, Any]:
        a = self.args
        return {
            "lr": a.learning_rate,
            "betas": (a.adam_beta1, a.adam_beta2),
            "eps": a.adam_epsilon,
            **self.options,
        }

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
            raise TypeError(
                "SNRMetricsCallback: the Trainer's optimizer is "
                f"{type(optimizer).__name__}, with no SNRAdamW / SNRPreconditioner inside; "
                "pass optimizer_cls_and_kwargs=snr_adamw(args) or optimizers=(SNRAdamW(...), "
                "None) to the Trainer"
            )
        if self._groups is None or self._model_id != id(model):
            self._groups = telemetry.layer_groups(model)
            self._model_id = id(model)
        out = telemetry.scalars(opt, self._groups, prefix=self.prefix)
        if not self.per_layer:
            out = {k: v for k, v in out.items() if k.startswith(self.prefix + "all/")}
        return out

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
