"""The claim studies: what each sweeps, when a run stops, how a run is summarised and scored.

Scores pick each method's grid point on validation data only (higher is better); see
`snr_dist.experiments.study` for the runner and the selection rule.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from snr_dist.experiments.tasks import DigitsTask, ModularTask


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _steps_to(history: list[dict], stopped: int | None) -> float | None:
    return float(stopped) if stopped is not None else None


def _wall_at(history: list[dict], step: int | None) -> float | None:
    if step is None:
        return None
    return next(h["wall_s"] for h in history if h["step"] >= step)


# ---------------------------------------------------------------------- label noise
class LabelNoiseTask(_Strict):
    noise_levels: list[float] = Field(default_factory=lambda: [0.0, 0.2, 0.4], min_length=1)
    hidden: list[int] = Field(default_factory=lambda: [256, 256], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


def _digits_summary(history: list[dict]) -> dict[str, float]:
    last = history[-1]
    min_val = min(h["val_loss"] for h in history)
    return {
        "best_test_acc": max(h["test_acc"] for h in history),
        "final_test_acc": last["test_acc"],
        "final_val_acc": last["val_acc"],
        "final_memorised": last["memorised"],
        "final_train_acc": last.get("train_acc"),
        "val_loss_rise": last["val_loss"] - min_val,
        "final_test_err": 1.0 - last["test_acc"],
        "wall_s": last["wall_s"],
        "steps": last["step"],
    }


# ---------------------------------------------------------------------- horizons
class HorizonTask(_Strict):
    """`label_noise_horizon`: one run per configuration, read at every training length."""

    # a fraction is symmetric noise; "pairflip:0.3" flips k -> k + 1 (data.parse_noise)
    noise: list[float | str] = Field(
        default_factory=lambda: [0.0, 0.2, 0.4, "pairflip:0.3"], min_length=1
    )
    hidden: list[int] = Field(default_factory=lambda: [256, 256], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    # the training lengths the report reads (steps; each an evaluation step)
    horizons: list[int] = Field(default_factory=lambda: [1500, 4500, 15000, 45000], min_length=1)
    # clean labels only measure speed: their runs stop here (0: the budget's steps)
    clean_steps: int = Field(default=0, ge=0)
    test_targets: list[float] = Field(default_factory=lambda: [0.95, 0.97], min_length=1)

    @model_validator(mode="after")
    def _valid(self) -> HorizonTask:
        from snr_dist.experiments.data import parse_noise

        for spec in self.noise:
            parse_noise(spec)
        if sorted(set(self.horizons)) != list(self.horizons):
            raise ValueError(f"horizons must be increasing and distinct, got {self.horizons}")
        return self


def is_clean(setting: float | str) -> bool:
    from snr_dist.experiments.data import parse_noise

    return parse_noise(setting)[1] == 0.0


def _horizon_summary(cfg: HorizonTask, history: list[dict], stopped: int | None) -> dict:
    out = _digits_summary(history)
    for a in cfg.test_targets:
        step = _first(history, "test_acc", lambda v, a=a: v >= a)
        out[f"steps_to_{_test_target(a)}"] = None if step is None else float(step)
    return out


class DoubleDescentTask(_Strict):
    label_noise: float = Field(default=0.2, ge=0, lt=1)
    widths: list[int] = Field(default_factory=lambda: [4, 8, 16, 32, 64, 128, 512], min_length=2)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


# ---------------------------------------------------------------------- grokking
class GrokkingTask(_Strict):
    p: int = Field(default=97, ge=3)
    ops: list[Literal["add", "div"]] = Field(default_factory=lambda: ["div", "add"], min_length=1)
    train_fraction: float = Field(default=0.25, gt=0, lt=1)
    embed: int = Field(default=128, ge=1)  # the transformer's width
    hidden: int = Field(default=512, ge=1)  # the MLP's hidden layer
    model: Literal["mlp", "transformer"] = "mlp"
    layers: int = Field(default=2, ge=1)  # transformer only
    heads: int = Field(default=4, ge=1)  # transformer only
    target_acc: float = Field(default=0.95, gt=0, le=1)


def _grok_summary(cfg: GrokkingTask, history: list[dict], stopped: int | None) -> dict:
    last = history[-1]
    return {
        "steps_to_target": _steps_to(history, stopped),
        "wall_to_target": _wall_at(history, stopped),
        "reached": 1.0 if stopped is not None else 0.0,
        "final_val_acc": last["val_acc"],
        "final_train_acc": last.get("train_acc"),
        "steps_to_train_99": next(
            (float(h["step"]) for h in history if h["train_acc"] >= 0.99), None
        ),
        "last_step": float(last["step"]),
    }


# ---------------------------------------------------------------------- convergence
class ConvergenceTask(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [256, 256], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    target_loss: float = Field(default=0.05, gt=0)
    # Generalisation speed: steps to these clean test accuracies (reported only) and to the
    # validation accuracy that selects each method's grid point (fewest steps wins).
    test_targets: list[float] = Field(default_factory=lambda: [0.95, 0.97], min_length=1)
    val_target: float = Field(default=0.94, gt=0, le=1)


def _first(history: list[dict], key: str, ok) -> int | None:
    return next((h["step"] for h in history if ok(h[key])), None)


def _test_target(a: float) -> str:
    """The name of test-accuracy target ``a`` in summary keys (``test_95`` for 0.95)."""
    return f"test_{round(100 * a)}"


def _conv_reached(cfg: ConvergenceTask, history: list[dict]) -> dict:
    return {
        "target": _first(history, "train_loss", lambda v: v <= cfg.target_loss),
        "val": _first(history, "val_acc", lambda v: v >= cfg.val_target),
        **{
            _test_target(a): _first(history, "test_acc", lambda v, a=a: v >= a)
            for a in cfg.test_targets
        },
    }


def _conv_stop(cfg: ConvergenceTask, rec: dict, history: list[dict]) -> bool:
    """Run until every target was reached (train loss, validation and test accuracies)."""
    return all(step is not None for step in _conv_reached(cfg, history).values())


def _conv_summary(cfg: ConvergenceTask, history: list[dict], stopped: int | None) -> dict:
    last = history[-1]
    reached = _conv_reached(cfg, history)
    out = {
        "reached": 1.0 if reached["target"] is not None else 0.0,
        "final_test_acc": last["test_acc"],
        "final_train_acc": last.get("train_acc"),
        "final_val_acc": last["val_acc"],
        "final_train_loss": last["train_loss"],
        "last_step": float(last["step"]),
    }
    for name, step in reached.items():
        out[f"steps_to_{name}"] = None if step is None else float(step)
        out[f"wall_to_{name}"] = _wall_at(history, step)
    return out


def conv_test_keys(cfg: ConvergenceTask) -> list[str]:
    """The summary keys of the steps to each test target (``steps_to_test_95`` for 0.95)."""
    return [f"steps_to_{_test_target(a)}" for a in cfg.test_targets]


def _conv_columns(cfg: ConvergenceTask) -> list[tuple[str, str, str]]:
    per_target = [
        column
        for a in cfg.test_targets
        for column in (
            (f"steps_to_{_test_target(a)}", f"steps to {a:g} test acc", "{:.0f}"),
            (f"wall_to_{_test_target(a)}", f"s to {a:g}", "{:.2f}"),
        )
    ]
    return per_target + [
        ("steps_to_target", "steps to target train loss", "{:.0f}"),
        ("wall_to_target", "s to target", "{:.2f}"),
        ("steps_to_val", "steps to val target", "{:.0f}"),
        ("final_test_acc", "test acc at stop", "{:.3f}"),
        # a run that stalls below a test target with every training example fitted is
        # slow to generalise after the fit, not slow to fit
        ("final_train_acc", "train acc at stop", "{:.3f}"),
    ]


def _val_speed_score(s: dict) -> float:
    """Fewest steps to the validation target; runs that never reach it count as twice their
    length."""
    steps = s["steps_to_val"]
    return -(steps if steps is not None else 2.0 * s["last_step"])


def _speed_score(s: dict) -> float:
    """Fewest steps to the target; runs that never reach it count as twice their length."""
    steps = s["steps_to_target"]
    return -(steps if steps is not None else 2.0 * s["last_step"])


# ---------------------------------------------------------------------- ENTK partition
class ENTKPartitionTask(_Strict):
    noise_levels: list[float] = Field(default_factory=lambda: [0.0, 0.4], min_length=1)
    hidden: list[int] = Field(default_factory=lambda: [128, 128], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    n_points: int = Field(default=200, ge=10)  # training points the kernel is computed on
    record_every: int = Field(default=300, ge=1)  # steps; a multiple of budget.eval_every
    kernel: Literal["exact", "nystrom"] = "exact"
    landmarks: int = Field(default=64, ge=2)
    chunk_size: int | None = Field(default=None, ge=1)  # None: all Jacobians at once (fastest)


_SPECTRUM_KEYS = ("k90", "reservoir_share", "random_share", "clean_outside", "trace")


def _entk_callback(cfg: ENTKPartitionTask, task: DigitsTask, job) -> Callable:
    """Record the target spectrum (on a fixed subset) at init and every ``record_every``
    steps into the evaluation history (the last record, or a step-0 record at init)."""
    from snr_dist.entk import ENTKCallback

    cb = ENTKCallback(
        task.train.x,
        task.train_clean,
        task.train.y,
        num_classes=10,
        n_points=cfg.n_points,
        seed=job.seed,
        kernel=cfg.kernel,
        landmarks=cfg.landmarks,
        chunk_size=cfg.chunk_size,
    )

    def callback(model, step: int, history: list[dict]) -> None:
        if step == 0:
            history.append({"step": 0, "wall_s": 0.0, **task.evaluate(model)})
        elif step % cfg.record_every:
            return
        rec = cb.record(model)
        history[-1].update({k: rec.get(k) for k in _SPECTRUM_KEYS})
        history[-1]["noise_in_top_k90"] = (
            None if rec.get("reservoir_share") is None else 1.0 - rec["reservoir_share"]
        )

    return callback


def _entk_summary(cfg: ENTKPartitionTask, history: list[dict], stopped: int | None) -> dict:
    recs = [h for h in history if "k90" in h]
    first, last = recs[0], recs[-1]
    out = _digits_summary(history)
    for name, rec in (("init", first), ("final", last)):
        for key in ("k90", "reservoir_share", "random_share"):
            out[f"{key}_{name}"] = rec.get(key)
    return out


# ---------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Study:
    task_model: type[BaseModel]
    settings: Callable[[Any], list]
    make_task: Callable[[Any, Any, int], Any]
    stop: Callable[[Any, dict, list[dict]], bool]
    summarise: Callable[[Any, list[dict], int | None], dict]
    score: Callable[[dict], float]
    # (summary key, header, format) per table column, or a function of the task config that
    # returns them (the convergence study's columns follow its test targets)
    columns: list[tuple[str, str, str]] | Callable[[Any], list[tuple[str, str, str]]]
    setting_label: str
    callback: Callable | None = None
    # a setting's own run length (0: the budget's)
    steps_for: Callable[[Any, Any], int] | None = None

    def columns_for(self, task: dict | BaseModel) -> list[tuple[str, str, str]]:
        """The report's columns for a study config's ``task`` section."""
        if callable(self.columns):
            if not isinstance(task, BaseModel):
                task = self.task_model.model_validate(task)
            return self.columns(task)
        return self.columns


_DIGITS_COLUMNS = [
    ("best_test_acc", "best test acc", "{:.3f}"),
    ("final_test_acc", "final test acc", "{:.3f}"),
    ("final_val_acc", "final val acc (selects)", "{:.3f}"),
    ("final_memorised", "noisy labels memorised", "{:.1%}"),
    ("val_loss_rise", "val-loss rise after min", "{:.3f}"),
    ("wall_s", "train s", "{:.1f}"),
]

STUDIES: dict[str, Study] = {
    "label_noise": Study(
        task_model=LabelNoiseTask,
        settings=lambda c: list(c.noise_levels),
        make_task=lambda c, noise, seed: DigitsTask(noise, c.hidden, seed, c.activation),
        stop=lambda c, rec, h: False,
        summarise=lambda c, h, stopped: _digits_summary(h),
        score=lambda s: s["final_val_acc"],
        columns=_DIGITS_COLUMNS,
        setting_label="label noise",
    ),
    "label_noise_horizon": Study(
        task_model=HorizonTask,
        settings=lambda c: list(c.noise),
        make_task=lambda c, noise, seed: DigitsTask(noise, c.hidden, seed, c.activation),
        stop=lambda c, rec, h: False,
        summarise=_horizon_summary,
        score=lambda s: s["final_val_acc"],
        columns=_DIGITS_COLUMNS,
        setting_label="label noise",
        steps_for=lambda c, setting: c.clean_steps if is_clean(setting) and c.clean_steps else 0,
    ),
    "double_descent": Study(
        task_model=DoubleDescentTask,
        settings=lambda c: list(c.widths),
        make_task=lambda c, width, seed: DigitsTask(c.label_noise, [width], seed, c.activation),
        stop=lambda c, rec, h: False,
        summarise=lambda c, h, stopped: _digits_summary(h),
        score=lambda s: s["final_val_acc"],
        columns=[
            ("final_test_err", "final test error", "{:.3f}"),
            ("best_test_acc", "best test acc", "{:.3f}"),
            ("final_train_acc", "final train acc", "{:.3f}"),
            ("final_memorised", "noisy labels memorised", "{:.1%}"),
        ],
        setting_label="hidden width",
    ),
    "grokking": Study(
        task_model=GrokkingTask,
        settings=lambda c: list(c.ops),
        make_task=lambda c, op, seed: ModularTask(
            c.p, op, c.train_fraction, c.embed, c.hidden, seed, c.model, c.layers, c.heads
        ),
        stop=lambda c, rec, h: rec["val_acc"] >= c.target_acc,
        summarise=_grok_summary,
        score=_speed_score,
        columns=[
            ("steps_to_target", "steps to target val acc", "{:.0f}"),
            ("wall_to_target", "train s to target", "{:.1f}"),
            ("steps_to_train_99", "steps to 99% train acc", "{:.0f}"),
            ("final_val_acc", "final val acc", "{:.3f}"),
        ],
        setting_label="operation",
    ),
    "entk_partition": Study(
        task_model=ENTKPartitionTask,
        settings=lambda c: list(c.noise_levels),
        make_task=lambda c, noise, seed: DigitsTask(noise, c.hidden, seed, c.activation),
        stop=lambda c, rec, h: False,
        summarise=_entk_summary,
        score=lambda s: s["final_val_acc"],
        columns=[
            ("k90_init", "k90 at init", "{:.0f}"),
            ("k90_final", "k90 final", "{:.0f}"),
            ("reservoir_share_init", "noise outside top-k90, init", "{:.3f}"),
            ("reservoir_share_final", "noise outside top-k90, final", "{:.3f}"),
            ("random_share_final", "random direction outside, final", "{:.3f}"),
            ("final_test_acc", "final test acc", "{:.3f}"),
            ("final_memorised", "noisy labels memorised", "{:.1%}"),
        ],
        setting_label="label noise",
        callback=_entk_callback,
    ),
    "convergence": Study(
        task_model=ConvergenceTask,
        settings=lambda c: ["clean digits"],
        make_task=lambda c, _, seed: DigitsTask(0.0, c.hidden, seed, c.activation),
        stop=_conv_stop,
        summarise=_conv_summary,
        score=_val_speed_score,
        columns=_conv_columns,
        setting_label="task",
    ),
}


def mean_or_none(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None
