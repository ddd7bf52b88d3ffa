"""The estimator interface: one SNR estimator for one kind of parameter.

An estimator owns its state keys (and their `Kind`, for the checkpoint view), its update from
a step's gradient, the moments its gates come from and, for eigen-trackers, its refreshes. A
step calls, for the parameters ("slots") of one param group that it serves:

1. `update` -- fold this step's local gradient into the local statistics (before the
   optimizer folds it into its own moments, so an estimator sees the previous mean);
2. `partial_sums` -- vectors that may be partial on this rank (the engine all-reduces the
   ones that are, for the whole step at once), then `finish` with the summed vectors;
3. `gate_` -- multiply the base optimizer's update directions by the gates;
4. `refresh_jobs` -- tracker refreshes due this step, sequenced by the distributor.

Estimators never talk to other ranks and never read the optimizer; the maths they run lives
in `snr_dist.snr`, `snr_dist.subspace` and `snr_dist.cross_sample`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from snr_dist import kernels as kernel_dispatch
from snr_dist import snr as rule
from snr_dist.cross_sample import MicrobatchStats
from snr_dist.distributors.base import RefreshJob
from snr_dist.layout import Kind


@dataclass
class Slot:
    """One parameter in one step."""

    param: Tensor
    """The optimizer's key (a DTensor under FSDP2)."""
    state: dict
    grad: Tensor
    """This rank's gradient, fp32, sign-flipped for ``maximize``."""
    step: int
    micro: MicrobatchStats | None = None
    """The cross-sample sums of this step's micro-batches."""
    key: Any = None
    """What per-parameter caches key on when ``param`` is a flat piece of a parameter (the
    chunked CPU step's ``(parameter, offset)``); None: ``param`` itself."""
    low: list[tuple[str, Tensor]] | None = None
    """``state_dtype="bfloat16"``: the state entries stored in bfloat16, as ``(key, stored
    tensor)``; during the step ``state[key]`` holds a float32 working copy, rounded back into
    the stored tensor at its end."""

    @property
    def cache_key(self) -> Any:
        return self.param if self.key is None else self.key


@dataclass(frozen=True)
class Moments:
    """Where the temporal estimators read ``EMA(g)`` (the mean) and ``EMA(g^2)``.

    ``adam=True`` (SNRAdamW): ``EMA(g^2)`` is Adam's ``exp_avg_sq`` (``betas[1]``); the mean is
    Adam's ``exp_avg`` for the innovation rule, and for the second-moment rule too if
    ``snr_beta == betas[0]`` when the state is created (no extra memory), else an own
    ``snr_avg`` (``snr_beta``). That choice is made once: a scheduler that later cycles
    ``betas[0]`` changes the shared mean's EMA factor, not the layout.
    ``adam=False`` (SNRPreconditioner): own ``snr_avg`` (``snr_beta``) and ``snr_sq``
    (``snr_beta2``), the base optimizer's state being opaque.
    """

    adam: bool

    def own_mean(self, group: dict) -> bool:
        """Whether new state gets its own ``snr_avg``."""
        return not self.adam or group["snr_beta"] != group["betas"][0]

    def mean(self, state: dict, group: dict) -> tuple[Tensor, float]:
        if "snr_avg" in state:
            return state["snr_avg"], group["snr_beta"]
        return state["exp_avg"], group["betas"][0]

    def sq(self, state: dict, group: dict) -> tuple[Tensor, float]:
        return state["exp_avg_sq" if self.adam else "snr_sq"], self.beta_v(group)

    def beta_s(self, state: dict, group: dict) -> float:
        return group["snr_beta"] if "snr_avg" in state else group["betas"][0]

    def beta_v(self, group: dict) -> float:
        return group["betas"][1] if self.adam else group["snr_beta2"]


def stat_dtype(group: dict) -> torch.dtype:
    """The dtype of the parameter-sized statistics (and SNRAdamW's first moment) of
    ``group``: its ``state_dtype``."""
    return torch.bfloat16 if group.get("state_dtype") == "bfloat16" else torch.float32


def gate_active(group: dict, step: int) -> bool:
    """Gates are 1 with ``gate="none"``, during warm-up, and (temporal) at the first step,
    where one gradient carries no variance estimate."""
    if group["gate"] == "none" or step <= group["warmup_steps"]:
        return False
    return group["estimator"] == "cross_sample" or step >= 2


def complement_closed(group: dict) -> bool:
    """``complement="closed"``: a tracked parameter's update is projected onto its span at
    every step, warm-up and ``gate="none"`` included."""
    return group.get("complement", "gated") == "closed"


def gate_values(
    group: dict, raw: Tensor, var: Tensor, k: float, step: int, subspace: bool = False
) -> Tensor:
    """The gates; ``subspace``: the last entry of each row is the complement direction, 0 at
    every step with ``complement="closed"``."""
    if not gate_active(group, step):
        g = torch.ones_like(raw)
    else:
        g = rule.gate(raw, var, k, group["gate"], group["tau"], group["gate_a"])
    if subspace and complement_closed(group):
        g[..., -1] = 0.0
    return g


def impl(group: dict, device) -> str:
    """``"torch"`` or ``"triton"`` for this group's hot loops on ``device``."""
    return kernel_dispatch.resolve(group.get("kernels", "auto"), device)


class Estimator(ABC):
    """One estimator x mode. Subclasses set the class variables and the abstract methods."""

    name: ClassVar[str]
    pools_ranks: ClassVar[bool] = False
    """Its statistics pool every rank's own gradients (summed over ranks whenever the
    optimizer has a data-parallel group)."""
    tracks: ClassVar[bool] = False
    """It keeps an eigen-tracker: refreshes, and an owner rank for them."""
    elementwise: ClassVar[bool] = False
    """A parameter's whole step reads and writes only that parameter's own tensors (nothing
    to exchange, nothing to refresh), so the optimizer may finish it in cache-sized chunks as
    soon as the gradients are checked."""

    def __init__(self, moments: Moments) -> None:
        self.moments_of = moments

    # ------------------------------------------------------------------ state
    @abstractmethod
    def init_state(self, p: Tensor, local_p: Tensor, state: dict, group: dict, key: int) -> None:
        """Allocate this estimator's state of ``p`` (``key``: a stable per-parameter integer)."""

    @abstractmethod
    def state_kinds(self, state: dict) -> dict[str, Kind]:
        """The layout of each state tensor this estimator allocated."""

    @abstractmethod
    def made(self, p: Tensor, state: dict, group: dict) -> bool:
        """Whether ``state`` has this estimator's layout for ``group``'s options."""

    def cost(self, p: Tensor, group: dict) -> float:
        """Per-step work of a tracker (for ownership); 0 for elementwise estimators."""
        return 0.0

    # ------------------------------------------------------------------ step
    def update(self, group: dict, slots: list[Slot]) -> None:  # noqa: B027 - optional
        """Fold this step's local gradients into the local statistics; runs before the
        optimizer updates its own moments."""

    def partial_sums(self, group: dict, slots: list[Slot]) -> list[Tensor]:
        """One vector per slot that `finish` needs summed over the ranks holding parts of it
        (empty: nothing to exchange)."""
        return []

    def finish(  # noqa: B027 - optional
        self, group: dict, slots: list[Slot], sums: list[Tensor], world: int
    ) -> None:
        """This step's statistics from the summed vectors (``world``: ranks summed over)."""

    @abstractmethod
    def moments(
        self, p: Tensor, state: dict, group: dict, step: int, index: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """``(raw, var, k)`` at ``step`` (optionally only at the flat ``index``)."""

    def gates(self, p: Tensor, state: dict, group: dict, step: int, index=None) -> Tensor:
        raw, var, k = self.moments(p, state, group, step, index)
        return gate_values(group, raw, var, k, step)

    def gate_(
        self,
        group: dict,
        slots: list[Slot],
        directions: list[Tensor],
        out: list[Tensor] | None = None,
        alphas: list[float] | None = None,
        foreach: bool = True,
    ) -> None:
        """Multiply ``directions`` by the gates in place, or, with ``out`` (fp32) and
        ``alphas``, add ``alpha * gated direction`` into ``out``. Only slots whose gate is
        active are passed; ``foreach=False`` asks for the readable per-tensor path."""
        for i, (s, d) in enumerate(zip(slots, directions)):
            g = self.gates(s.param, s.state, group, s.step)
            if out is None:
                d.mul_(g)
            else:
                out[i].addcmul_(d, g, value=alphas[i])

    def refresh_jobs(self, group: dict, slots: list[Slot]) -> list[RefreshJob]:
        return []

    def info(self, p: Tensor, state: dict, group: dict) -> dict | None:
        """The last step's gates and statistics of a tracked parameter (metrics)."""
        return None
