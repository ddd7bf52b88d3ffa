"""Lightning: what `SNRAdamW` needs there, and a callback that logs its telemetry.

`SNRAdamW` and `SNRPreconditioner` are torch optimizers, so a ``LightningModule`` returns them
from ``configure_optimizers`` like any other, and Lightning's automatic optimization works
unchanged: ``optimizer.step(closure)``, gradient accumulation (each backward is one
micro-batch of the cross-sample estimator), gradient clipping (inside the closure, before the
step), LR scheduler dicts and checkpoints (``optimizer.state_dict()``). The one thing Lightning
cannot do by itself is read the SNR statistics out of the optimizer: `SNRMetricsCallback`
finds the SNR optimizer behind Lightning's and strategies' wrappers and sends the scalars of
`snr_dist.integrations.telemetry` to every logger of the Trainer.

Under Lightning's DeepSpeed strategy, ``deepspeed.initialize`` is called by the strategy,
without what `snr_dist.deepspeed.initialize` adds around it; `SNRDeepSpeedStrategy` adds it:
the JSON's ``"snr_preconditioner"`` block (with its ``"optimizer"`` block, SNRAdamW is built
from the config, as Lightning builds DeepSpeed's optimizer from it), no step while DeepSpeed
builds its engine, and the row shards subspace mode and the cross-sample estimator need on
ZeRO 1-3 and bf16 partitions, before Lightning restores a checkpoint.

Needs the ``lightning`` package (``pip install 'snr-dist[lightning]'``), imported by this
module only.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.strategies import DeepSpeedStrategy
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError(
        "snr_dist.integrations.lightning needs Lightning 2.x (the `lightning` package): "
        "pip install 'snr-dist[lightning]'"
    ) from None

from snr_dist import deepspeed as snr_ds
from snr_dist.integrations import telemetry
from snr_dist.integrations.wiring import attach_deepspeed, deferred_steps
from snr_dist.integrations.wrappers import unwrap
from snr_dist.optim.base import SNROptimizerMixin

__all__ = [
    "SNRDeepSpeedStrategy",
    "SNRMetricsCallback",
    "StopMonitorCallback",
    "snr_optimizers",
    "unwrap",
]


def snr_optimizers(trainer: Trainer) -> list[SNROptimizerMixin]:
    """The SNR optimizers among ``trainer.optimizers``, in their order, unwrapped."""
    found = (unwrap(opt) for opt in trainer.optimizers)
    return [opt for opt in found if opt is not None]


class SNRMetricsCallback(Callback):
    """Log the SNR telemetry of the Trainer's SNR optimizer(s) every ``every_n_steps``
    optimizer steps.

    The scalars are those of `snr_dist.integrations.telemetry.scalars` (per layer group of the
    ``LightningModule``, e.g. ``snr/model.transformer.h.0.attn.c_attn/gate_mean``, and
    ``snr/all/...``), logged with ``step=trainer.global_step`` to every logger of the Trainer,
    from global rank 0 only. With several SNR optimizers each one's keys carry its index
    (``snr/opt1/...``). The statistics are this rank's: the same on every rank under DDP.

    Args:
        every_n_steps: log after every this many optimizer steps (an int >= 1). Gradient
            accumulation counts once per step, not per micro-batch.
        prefix: the prefix of every key.
    """

    def __init__(self, every_n_steps: int = 50, prefix: str = "snr/") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._last_step = -1

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail at once, naming what was found, if the Trainer has no SNR optimizer."""
        if not snr_optimizers(trainer):
            kinds = [type(o).__name__ for o in trainer.optimizers]
            raise ValueError(
                "SNRMetricsCallback: no SNRAdamW or SNRPreconditioner among trainer.optimizers "
                f"(found {kinds}); return one from configure_optimizers, or drop the callback"
            )
        self._last_step = -1

    def metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """The scalars as they are now (also usable outside the logging schedule)."""
        groups = telemetry.layer_groups(pl_module)
        opts = snr_optimizers(trainer)
        out: dict[str, float] = {}
        for i, opt in enumerate(opts):
            prefix = self.prefix if len(opts) == 1 else f"{self.prefix}opt{i}/"
            out.update(telemetry.scalars(opt, groups, prefix=prefix))
        return out

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """After an optimizer step whose count is a multiple of ``every_n_steps``: log."""
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps != 0:
            return  # before the first step, a micro-batch of accumulation, or not due
        self._last_step = step
        if not trainer.is_global_zero or not trainer.loggers:
            return
        values = self.metrics(trainer, pl_module)
        if not values:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)


class StopMonitorCallback(Callback):
    """Stop a Lightning run with the validation-free stop (`snr_dist.stopping.StopMonitor`),
    on whatever optimizer ``configure_optimizers`` returned (AdamW too): it sets
    ``trainer.should_stop`` once the monitor's rule fires, logs ``stop/ratio`` every
    ``every_n_steps`` steps, and keeps the monitor's state in Lightning's checkpoints (this
    rank's: a sharded run's partial sums differ between ranks).

    ``monitor_options``: `StopMonitor`'s keyword arguments; ``dataset_size`` and
    ``batch_size`` default to the training set's length and the global batch (loader batch x
    accumulation x processes). ``stop=False`` only reports.
    """

    def __init__(self, stop: bool = True, every_n_steps: int = 50, **monitor_options: Any) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
            raise TypeError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        self.stop = bool(stop)
        self.every_n_steps = every_n_steps
        self.options = monitor_options
        self.monitor = None
        self._pending: dict | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from snr_dist.integrations import early_stop

        if len(trainer.optimizers) != 1:
            raise ValueError(
                "StopMonitorCallback watches one optimizer; this Trainer has "
                f"{len(trainer.optimizers)}"
            )
        options = dict(self.options)
        loader = trainer.train_dataloader
        if "dataset_size" not in options:
            dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                raise ValueError(
                    "StopMonitorCallback: the training set has no length; pass "
                    "dataset_size=... (examples per epoch)"
                )
            options["dataset_size"] = len(dataset)
        if "batch_size" not in options:
            per_rank = getattr(loader, "batch_size", None)
            if per_rank is None:
                raise ValueError("StopMonitorCallback: pass batch_size=... (the global batch)")
            options["batch_size"] = per_rank * trainer.accumulate_grad_batches * trainer.world_size
        self.monitor = early_stop.build(trainer.optimizers[0], **options)
        if self._pending is not None:
            self.monitor.load_state_dict(self._pending)
            self._pending = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None:
            return
        if self.stop and self.monitor.should_stop:
            trainer.should_stop = True
        step = trainer.global_step
        if step and step % self.every_n_steps == 0 and trainer.is_global_zero:
            ratio = self.monitor.metrics().get("ratio")
            if ratio is not None:
                for logger in trainer.loggers:
                    logger.log_metrics({"stop/ratio": ratio}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.monitor is None else {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "monitor" in state_dict:  # restored at on_train_start, once the optimizer exists
            self._pending = state_dict["monitor"]


class SNRDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` (same arguments) for an snr-dist optimizer.

    Lightning's own strategy hands the optimizer of ``configure_optimizers`` to
    ``deepspeed.initialize`` as it is: under ZeRO 1-3 and bf16 subspace mode and the
    cross-sample estimator then get flat partitions and no per-rank gradients (refused at the
    first step), and a ``"snr_preconditioner"`` block in the config is never read. This
    strategy:

    - with an ``"optimizer"`` block in the config (Lightning then skips
      ``configure_optimizers``), builds SNRAdamW from it and the ``"snr_preconditioner"``
      block, as `snr_dist.deepspeed.initialize` does;
    - with an SNR optimizer from ``configure_optimizers``, checks that it runs what the
      ``"snr_preconditioner"`` block (if any) names, and refuses otherwise;
    - skips the step DeepSpeed's unfused bf16/fp16 optimizer takes while it is built, and
      attaches the row shards (`SNRAdamW.attach_zero`) once DeepSpeed has built its optimizer,
      before Lightning restores a checkpoint.

    Lightning's DeepSpeed strategy runs on CUDA devices only."""

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        cfg = self.config
        if "snr_preconditioner" in cfg:
            adam, block = snr_ds.take_blocks(cfg)
            if optimizer is None and adam is not None:
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = snr_ds.from_blocks(cfg, params, adam, block)
            elif unwrap(optimizer) is not None:
                snr_ds.check_agrees(
                    cfg,
                    unwrap(optimizer),
                    block,
                    "from configure_optimizers",
                    'build it with those options, or give the config an "optimizer" block to '
                    "build SNRAdamW from the config",
                )
        snr = unwrap(optimizer)
        if snr is not None:
            cfg["zero_allow_untested_optimizer"] = True  # a client optimizer, as DeepSpeed says
        with deferred_steps([snr] if snr is not None else []):
            engine, ds_optimizer = super()._setup_model_and_optimizer(
                model, optimizer, lr_scheduler
            )
        if snr is not None:
            attach_deepspeed(ds_optimizer)
        return engine, ds_optimizer
