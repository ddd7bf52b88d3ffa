"""Experiment configs: YAML files validated by pydantic before any work starts.

Every error names the dotted key path, the offending value and what is allowed, e.g.
``train.epochs = 0: Input should be greater than or equal to 1``. ``--set a.b=c`` overrides
are applied to the raw YAML before validation, so they are checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from snr_dist.options import SNROptions, validate_adam


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimizerConfig(_Strict):
    name: str = Field(min_length=1)
    type: Literal["adamw", "snr_adamw"]
    lr: float = Field(default=1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(default=0.01, ge=0)
    snr: SNROptions | None = None

    @field_validator("name")
    @classmethod
    def _a_file_name(cls, value: str) -> str:
        # it names the run's checkpoint and TensorBoard folders, inside the output directory
        if any(c in value for c in "/\\\0") or value in (".", ".."):
            raise ValueError("must not contain '/', '\\' or be '.' or '..' (it names folders)")
        return value

    @model_validator(mode="after")
    def _snr_only_for_snr(self) -> OptimizerConfig:
        if self.type == "adamw" and self.snr is not None:
            raise ValueError("'snr' options apply only to type 'snr_adamw'")
        validate_adam(self.lr, self.betas, 1e-8, self.weight_decay)  # as the optimizers will
        if self.snr is not None and "snr_beta2" in self.snr.model_fields_set:
            raise ValueError(
                "snr.snr_beta2 applies to SNRPreconditioner; SNRAdamW's squared-gradient EMA "
                "is Adam's own: set betas[1]"
            )
        return self


class DataConfig(_Strict):
    dataset: Literal["digits"] = "digits"
    label_noise: float = Field(default=0.4, ge=0, lt=1)
    test_fraction: float = Field(default=0.25, gt=0, lt=1)


class ModelConfig(_Strict):
    hidden: list[int] = Field(default_factory=lambda: [512, 512], min_length=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError(f"every hidden width must be >= 1, got {value}")
        return value


class TrainConfig(_Strict):
    epochs: int = Field(default=150, ge=1)
    batch_size: int = Field(default=128, ge=1)
    microbatches: int = Field(default=1, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):  # a repeated seed would reuse the first one's run
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    eval_every: int = Field(default=1, ge=1)
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True
    checkpoint_every: int = Field(default=0, ge=0)  # epochs; 0: no checkpoints
    resume: bool = True  # continue from the run's checkpoints when they exist
    # The validation-free stop (`snr_dist.stopping.StopMonitor`) on every run, AdamW included:
    # "report" records it (a column and a marked step in the report), "stop" also ends a run at
    # the first evaluation after it fires, "none" attaches nothing (YAML reads a bare off as false).
    stop_monitor: Literal["report", "stop", "none"] = "report"


class DistributedConfig(_Strict):
    """Used when launched by torchrun with more than one process (WORLD_SIZE > 1)."""

    strategy: Literal["ddp", "fsdp2"] = "ddp"
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class ExperimentConfig(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    optimizers: list[OptimizerConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names_and_microbatches(self) -> ExperimentConfig:
        names = [o.name for o in self.optimizers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"optimizer names must be unique, repeated: {dup}")
        for o in self.optimizers:
            if o.snr and o.snr.estimator == "cross_sample" and self.train.microbatches < 2:
                raise ValueError(
                    f"optimizer {o.name!r} uses estimator 'cross_sample', which needs "
                    f"train.microbatches >= 2 (got {self.train.microbatches})"
                )
        if self.train.batch_size < self.train.microbatches:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be >= train.microbatches "
                f"({self.train.microbatches})"
            )
        return self


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The keys allowed at ``loc`` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part) if hasattr(current, "model_fields") else None
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) + (ann,):
            inner = getattr(cand, "__args__", ())
            for c in (cand, *inner):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    current = c
                    break
            else:
                continue
            break
    return list(current.model_fields) if hasattr(current, "model_fields") else None


def format_errors(err: ValidationError, source: str, schema: type[BaseModel] | None = None) -> str:
    """One line per problem; ``schema``: the root model (default `ExperimentConfig`)."""
    lines = [f"{source}: invalid config ({err.error_count()} problem(s))"]
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if x not in ("function-after",))
        path = ".".join(str(x) for x in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema or ExperimentConfig, loc)
            hint = f" (allowed keys: {', '.join(allowed)})" if allowed else ""
            lines.append(f"  - {path}: unknown key{hint}")
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"  - {path}: required key is missing")
        elif not loc or isinstance(e.get("input"), dict):  # a whole-section check
            lines.append(f"  - {path}: {msg}")
        else:
            lines.append(f"  - {path} = {e.get('input')!r}: {msg}")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (dotted key), got {item!r}")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise ConfigError(f"--set: invalid key {key!r} in {item!r}")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set dotted keys (list items by index: ``optimizers.1.lr=3e-3``) in the raw YAML dict."""
    for item in overrides:
        parts, value = _parse_override(item)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    where = ".".join(parts[: i + 1])
                    raise ConfigError(
                        f"--set {item}: {where} is not an index of a {len(node)}-item list"
                    )
                node = node[int(part)]
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    where = ".".join(parts[: i + 1])
                    raise ConfigError(f"--set {item}: {where} is a value, not a section")
                node = node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(
                    f"--set {item}: {last} is not an index of a {len(node)}-item list"
                )
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    raw: dict | None = None,
    schema: type[BaseModel] | None = None,
) -> ExperimentConfig:
    """Read, override and validate; raise `ConfigError` listing every problem. ``schema``:
    the root model to validate against (default `ExperimentConfig`)."""
    source = str(path) if path is not None else "<config>"
    if raw is None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    try:
        return (schema or ExperimentConfig).model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, source, schema)) from None
