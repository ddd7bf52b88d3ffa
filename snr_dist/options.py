"""Every SNR option, declared once: `SNROptions`.

The same typed object is behind SNRAdamW's and SNRPreconditioner's keyword arguments and
param-group keys, the YAML experiment configs, the DeepSpeed JSON block, Megatron's factory and
the checkpoint metadata, so an option's default, allowed values and error message exist in one
place. At run time the values live in the optimizer's param groups (as in ``torch.optim``: they
may differ per group, schedulers may change them, and they are saved in the state_dict);
`SNROptions` validates them on the way in.

A bad value raises ``ValueError`` naming the key, the value and what is allowed, e.g.
``Invalid tau: -1; allowed range: (0.0, inf)``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from snr_dist.snr import GATE_RULES

ESTIMATORS = ("temporal", "cross_sample")
NOISE_MODELS = ("innovation", "second_moment")
"""How the temporal estimator measures noise: ``innovation`` (default; each gradient's spread
around Adam's previous mean, right under drift) or ``second_moment`` (the 0.1 rule,
``v - s^2``: exact for stationary gradients, reads a shrinking gradient as noise)."""
MODES = ("diagonal", "subspace")
BASIS_SIDES = ("auto", "rows", "cols")
COMPLEMENTS = ("gated", "closed")
"""Subspace mode's complement (the reservoir outside the tracked directions): ``gated`` by its
own SNR (the rule), or ``closed`` (gate 0: updates confined to the rank-r span, a GaLore-like
low-rank optimizer with ``gate="none"``; the control that separates the gate from the rank)."""
KERNEL_CHOICES = ("auto", "torch", "triton", "compile")
"""Implementations of the hot loops: ``auto`` (Triton on CUDA when it imports, else torch, unless
``SNR_DIST_KERNELS`` says otherwise), one forced, or ``compile``: the diagonal temporal step as
one ``torch.compile``d pass per parameter (`snr_dist.kernels.compiled`; the other loops as
``auto``)."""

STATE_DTYPES = ("float32", "bfloat16")
"""How SNRAdamW stores Adam's first moment and the parameter-sized SNR statistics: ``float32``
(default) or ``bfloat16`` (stochastically rounded, reproducibly: `snr_dist.kernels.rounding`);
Adam's second moment stays float32 either way. With ``bfloat16`` the diagonal rule's state
takes AdamW's 8 bytes per parameter instead of 12."""

#: Options that decide which state tensors a parameter has; fixed once its state exists.
LAYOUT_KEYS = ("estimator", "noise", "mode", "rank", "basis_side", "state_dtype")


def _choice(name: str, value: Any, allowed: tuple[str, ...], quote: bool = False) -> None:
    if not isinstance(value, str) or value not in allowed:
        shown = ", ".join(repr(a) if quote else a for a in allowed)
        raise ValueError(f"Invalid {name}: {value!r}; allowed values: {shown}")


def _real(name: str, value: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"Invalid {name}: {value!r}; allowed range: {lb}{lo}, {hi}{rb}")


def _int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"Invalid {name}: {value!r}; allowed: an integer >= {lo}")


_UNIT = (0.0, 1.0, False, True)  # [0, 1)
_CHECKS = {
    "estimator": lambda n, v: _choice(n, v, ESTIMATORS, quote=True),
    "noise": lambda n, v: _choice(n, v, NOISE_MODELS, quote=True),
    "mode": lambda n, v: _choice(n, v, MODES, quote=True),
    "gate": lambda n, v: _choice(n, v, GATE_RULES, quote=True),
    "basis_side": lambda n, v: _choice(n, v, BASIS_SIDES, quote=True),
    "complement": lambda n, v: _choice(n, v, COMPLEMENTS, quote=True),
    "tau": lambda n, v: _real(n, v, 0.0, math.inf, True, True),
    "gate_a": lambda n, v: _real(n, v, 0.0, math.inf, False, True),
    "snr_beta": lambda n, v: _real(n, v, *_UNIT),
    "snr_beta2": lambda n, v: _real(n, v, *_UNIT),
    "sketch_beta": lambda n, v: _real(n, v, *_UNIT),
    "warmup_steps": lambda n, v: _int(n, v, 0),
    "rank": lambda n, v: _int(n, v, 1),
    "refresh_every": lambda n, v: _int(n, v, 1),
    "seed": lambda n, v: _int(n, v, 0),
    "state_dtype": lambda n, v: _choice(n, v, STATE_DTYPES, quote=True),
}


class SNROptions(BaseModel):
    """The SNR options of one param group (see docs/options.md for the guidance on each).

    Attributes:
        estimator: "temporal" (EMAs over steps, no communication) or "cross_sample" (spread
            across the micro-batches / data-parallel ranks of one step; needs >= 2 backward
            passes per step).
        noise: the temporal estimator's noise model: "innovation" (default: the spread of each
            gradient around Adam's previous mean, averaged over Adam's ``betas[0]`` window;
            right when gradients drift) or "second_moment" (the rule of snr-dist 0.1,
            ``v - s^2`` over ``snr_beta`` / ``betas[1]`` windows, kept so earlier results
            reproduce).
        mode: "diagonal" (per coordinate) or "subspace" (per eigen-direction of each matrix's
            gradient covariance, plus one complement direction); 1-D parameters are diagonal.
        gate: "wiener" (``SNR / (SNR + tau)``), "clamp", "hard", "paper" or "none".
        tau: gate threshold; the paper gate's lambda.
        gate_a: the paper gate's a (1 online, `snr_dist.finite_dataset_a` for a finite set).
        snr_beta: EMA factor of the cross-sample statistics, of the second-moment rule's mean,
            and of SNRPreconditioner's own mean (the innovation rule in SNRAdamW averages with
            Adam's ``betas[0]``).
        snr_beta2: EMA factor of the squared gradient where the base optimizer keeps none
            (SNRPreconditioner); SNRAdamW uses ``betas[1]``.
        warmup_steps: gates are 1 for the first ``warmup_steps`` steps.
        rank: subspace rank per matrix.
        refresh_every: steps between basis refreshes (plus refreshes at steps 1, 2, 4, ...).
        sketch_beta: EMA factor of the subspace sketch.
        basis_side: "auto" (the smaller side), "rows" or "cols".
        complement: subspace mode's orthogonal complement: "gated" by its own SNR, or
            "closed" (gate 0: the update stays in the tracked span; with ``gate="none"`` a
            low-rank Adam, the control for the gate's effect).
        seed: seed of the random initial bases (identical on every rank) and of the
            stochastic rounding of bfloat16 state.
        state_dtype: "float32" (default) or "bfloat16": the dtype of Adam's first moment and
            of the parameter-sized SNR statistics (SNRAdamW only). bfloat16 values are
            rounded stochastically (unbiased, reproducible from ``seed``: a hash of the step
            and the element, not the global RNG); Adam's second moment stays float32. The
            diagonal rule's state is then AdamW's 8 bytes per parameter (float32: 12).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    estimator: Literal[ESTIMATORS] = "temporal"
    noise: Literal[NOISE_MODELS] = "innovation"
    mode: Literal[MODES] = "diagonal"
    gate: Literal[GATE_RULES] = "wiener"
    tau: float = 1.0
    gate_a: float = 1.0
    snr_beta: float = 0.99
    snr_beta2: float = 0.999
    warmup_steps: int = 0
    rank: int = 32
    refresh_every: int = 50
    sketch_beta: float = 0.9
    basis_side: Literal[BASIS_SIDES] = "auto"
    complement: Literal[COMPLEMENTS] = "gated"
    seed: int = 0
    state_dtype: Literal[STATE_DTYPES] = "float32"

    @field_validator("*", mode="before")
    @classmethod
    def _check(cls, value: Any, info) -> Any:
        _CHECKS[info.field_name](info.field_name, value)
        return value

    @model_validator(mode="after")
    def _closed_needs_subspace(self) -> SNROptions:
        if self.complement == "closed" and self.mode != "subspace":
            raise ValueError(
                "Invalid complement: 'closed'; allowed with mode='subspace' only (diagonal "
                "mode has no tracked span)"
            )
        return self

    @model_validator(mode="after")
    def _temporal_needs_memory(self) -> SNROptions:
        if self.estimator == "temporal" and self.snr_beta == 0:
            # k_t = 1 at every step: one gradient carries no variance estimate.
            raise ValueError(
                "Invalid snr_beta: 0; allowed range with estimator='temporal': (0.0, 1.0)"
            )
        return self

    @classmethod
    def parse(cls, values: Mapping[str, Any] | SNROptions | None = None, **more: Any) -> SNROptions:
        """Validated options from a mapping (and keyword overrides); ``ValueError`` names the
        key, the value and what is allowed, and lists unknown keys with the allowed ones."""
        if isinstance(values, SNROptions):
            values = values.model_dump()
        raw = {**(values or {}), **more}
        unknown = sorted(set(raw) - set(cls.model_fields))
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, list(cls.model_fields), 1)
                if close:
                    hints.append(f"{k!r} -> {close[0]!r}")
            raise ValueError(
                f"Unknown SNR option(s): {', '.join(unknown)}; "
                f"allowed: {', '.join(cls.model_fields)}"
                + (f" (did you mean {', '.join(hints)}?)" if hints else "")
            )
        try:
            return cls(**raw)
        except ValidationError as err:
            raise ValueError(error_lines(err)[0]) from None

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> SNROptions:
        """The options a param group holds (keys it lacks take their defaults)."""
        return cls.parse({k: group[k] for k in cls.model_fields if k in group})


def error_lines(err: ValidationError, prefix: str = "") -> list[str]:
    """One readable line per problem: ``<prefix><key> = <value>: <what is allowed>``."""
    lines = []
    for e in err.errors(include_url=False):
        key = prefix + ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key (allowed: {', '.join(SNROptions.model_fields)})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(msg if not prefix else f"{key} = {e.get('input')!r}: {msg}")
    return lines


SNR_DEFAULTS: dict[str, Any] = SNROptions().model_dump()
"""The SNR options and their defaults (a plain dict view of `SNROptions`)."""


#: What a param group saved before an option existed meant: snr-dist 0.1's groups have no
#: ``noise``, and its rule was the second-moment one (whose state, ``snr_avg``, they hold).
SAVED_BEFORE: dict[str, Any] = {"noise": "second_moment"}


def complete_saved_group(group: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a saved param group with the keys of ``defaults`` (an optimizer's
    ``defaults``) that it predates filled in, as torch's optimizers load their older state
    dicts: the value that keeps the behaviour of the release that saved it (`SAVED_BEFORE`),
    else the option's default, else ``defaults``' value."""
    missing = {k: v for k, v in defaults.items() if k not in group}
    for k in missing:
        missing[k] = SAVED_BEFORE.get(k, SNR_DEFAULTS.get(k, missing[k]))
    return {**missing, **group}


def validate_options(opts: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key, the value and what is allowed."""
    SNROptions.parse(opts)


def validate_kernels(value: Any, name: str = "kernels") -> None:
    """The ``kernels`` choice of an optimizer (or the ``SNR_DIST_KERNELS`` variable)."""
    _choice(name, value, KERNEL_CHOICES)


def gives_snr_beta2(snr: Any, extra: Mapping[str, Any] | None = None) -> bool:
    """Whether ``snr`` (options, a mapping or None) or ``extra`` set ``snr_beta2``: an
    SNRPreconditioner option that every SNRAdamW front end refuses (Adam keeps its own EMA)."""
    if isinstance(snr, SNROptions):
        return snr.snr_beta2 != SNROptions().snr_beta2 or "snr_beta2" in (extra or {})
    return "snr_beta2" in (extra or {}) or (isinstance(snr, Mapping) and "snr_beta2" in snr)


def validate_adam(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Adam's own hyper-parameters, with the same style of message."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr!r}; allowed: a float >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r}; allowed: a pair (beta1, beta2)")
    _real("betas[0]", betas[0], *_UNIT)
    _real("betas[1]", betas[1], *_UNIT)
    _real("eps", eps, 0.0, math.inf, False, True)
    _real("weight_decay", weight_decay, 0.0, math.inf, False, True)


def param_mode(shape: tuple[int, ...], mode: str) -> str:
    """Subspace mode applies to matrices (and conv kernels viewed as matrices); 1-D params such
    as biases and norm scales have no matrix structure and use the diagonal estimator."""
    if mode == "subspace" and len(shape) >= 2 and min(shape[0], math.prod(shape[1:])) >= 2:
        return "subspace"
    return "diagonal"
