r"""A validation-free stop: when what is left of the gradient is what single examples explain.

For a training set of ``n`` examples, per-example gradients ``g_i`` (at the current weights),
their mean ``mu`` and covariance ``Sigma``, gradient-statistics stopping rules (Mahsereci et al.
2017, "Early Stopping without a Validation Set"; the gradient noise scale of McCandlish et al.
2018) compare ``|mu|^2`` with the noise of one step's gradient, ``tr(Sigma) / b``. Their usual
threshold (stop when the signal is no larger than zero) fires only once the training loss is
at its minimum, after a network has memorised whatever noisy labels it holds: on a *finite*
training set the full-batch gradient is never zero while examples are still being fit.

What does vanish is the part of ``mu`` that *several* examples share. With ``N = n - 1``,
``|mu|^2 = tr(Sigma) / N + sum_{i != j} g_i . g_j / (n N)``: the first term is what each
example contributes on its own (memorising a flipped label, fitting residual noise), the second
the alignment between different examples (a pattern many of them share). The monitor estimates
the second directly, from two successive batches: batches drawn without replacement within an
epoch hold different examples, so ``E[g_t . g_{t-1}] = |mu|^2 - tr(Sigma) / N``, the cross
term alone, and ``E[|g_t - g_{t-1}|^2] / 2 ~ tr(Sigma) / b`` is one step's noise. Both use
neighbouring steps only, so a gradient that drifts as training goes on does not read as noise
(an EMA of the gradient over a long window does: it lags, and the lag looks like scatter).

It reports ``ratio = (n - b) / B_noise`` with ``B_noise = tr(Sigma) / |mu|^2`` rebuilt from
those estimates: 1 when the per-example gradients share nothing (one step's SNR is then the
paper's finite-dataset ``b / (n - b)``), far above 1 while shared patterns are being learned.
Sampling with replacement (independent batches) reads 2 instead of 1 at that point.

Two stop rules read it (`StopRule`): ``"below"`` stops once the ratio has stayed at or below a
threshold for ``patience`` steps (nothing shared is being learned any more); ``"rise"`` stops
once it has stayed above ``(1 + value)`` times its lowest reading so far for ``patience`` steps
(the gradient turned coherent again after the shared patterns were fit: with class-structured
label noise, every mislabelled example of a class pushes the same way, against its class, so
memorising such noise reads as a shared pattern, not as single examples). Which rule and value
hold up is measured in the horizon study (docs/stopping.md).

It observes any optimizer (a step pre-hook: AdamW as well as the SNR optimizers), keeps one
fp32 copy of the last gradient (of every ``stride``-th coordinate), and costs no communication
per step: its sums are linear in the coordinates, so a rank that holds a shard of each
parameter (FSDP2, ZeRO's partitions) keeps partial sums, and one all-reduce of three numbers
joins them when the statistic is read (every ``check_every`` steps). Replicated parameters
(DDP) hold identical gradients on every rank and need none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from snr_dist import snr as snr_rule
from snr_dist.distributors.dtensor import is_dtensor, local

RULES = ("below", "rise")


def finite_dataset_snr(dataset_size: int, batch_size: int) -> float:
    """``b / (n - b)``: one step's SNR when the per-example gradients share no direction."""
    return snr_rule.finite_dataset_a(dataset_size, batch_size)


class StopRule:
    """When a sequence of ``(step, ratio)`` readings says stop: ``"below"`` once the ratio has
    been at or below ``value`` for ``patience`` steps, ``"rise"`` once it has been above
    ``(1 + value)`` times its lowest reading (from ``min_steps`` on) for ``patience`` steps.
    The online monitor and the studies' off-line reading share it."""

    def __init__(self, rule: str, value: float, patience: int, min_steps: int) -> None:
        if rule not in RULES:
            raise ValueError(f"Invalid rule: {rule!r}; allowed values: {', '.join(RULES)}")
        self.rule, self.value, self.patience, self.min_steps = rule, value, patience, min_steps
        self.low: float | None = None  # lowest reading from min_steps on ("rise")
        self.since: int | None = None  # first step of the current run of true conditions

    def update(self, step: int, ratio: float | None) -> bool:
        """Feed one reading; True when the stop fires at it."""
        if ratio is None or step < self.min_steps:
            return False
        if self.rule == "below":
            holds = ratio <= self.value
        else:
            if self.low is None or ratio < self.low:
                self.low = ratio
            holds = ratio > (1.0 + self.value) * self.low
        if not holds:
            self.since = None
            return False
        if self.since is None:
            self.since = step
        return step - self.since >= self.patience

    def state(self) -> dict[str, Any]:
        return {"low": self.low, "since": self.since}

    def load(self, state: dict[str, Any]) -> None:
        self.low, self.since = state.get("low"), state.get("since")


class StopMonitor:
    """Watches an optimizer's gradients and says when further training stops helping.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SNRAdamW, SNRPreconditioner, AdamW, ...).
        dataset_size: training examples ``n`` (one epoch).
        batch_size: examples per optimizer step ``b`` (global: all ranks and micro-batches).
        beta: EMA factor over the successive-batch products (a window of ~1/(1-beta) steps;
            it averages, it does not lag: each term compares neighbouring steps).
        rule: ``"below"`` (stop once ``ratio <= threshold``) or ``"rise"`` (stop once the
            ratio is above ``(1 + threshold)`` times its lowest reading); see `StopRule`.
        threshold: the rule's value (``"below"``: 1 is nothing left beyond what single
            examples explain; ``"rise"``: the relative rise).
        patience: steps the rule's condition must hold before the stop is signalled.
        check_every: steps between reads of the statistic (each read is one host sync, and
            one all-reduce of three numbers with ``process_group``).
        min_steps: no stop before this step (default: three windows, ``3 / (1 - beta)``).
        stride: monitor every ``stride``-th coordinate of each parameter (memory:
            ``1 / stride`` of the parameters' size in fp32; the ratio is scale-free).
        process_group: where the parameters are sharded (ZeRO partitions), the group that holds
            the shards: partial sums are joined over it. DTensor parameters use their own mesh.
            None for replicated parameters (DDP, one process).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        dataset_size: int,
        batch_size: int,
        beta: float = 0.99,
        rule: str = "below",
        threshold: float = 1.0,
        patience: int = 50,
        check_every: int = 10,
        min_steps: int | None = None,
        stride: int = 1,
        process_group=None,
    ) -> None:
        for name, value, lo in (
            ("dataset_size", dataset_size, 2),
            ("batch_size", batch_size, 1),
            ("patience", patience, 0),
            ("check_every", check_every, 1),
            ("stride", stride, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"Invalid {name}: {value!r}; allowed: an integer >= {lo}")
        if batch_size >= dataset_size:
            raise ValueError(
                f"Invalid batch_size: {batch_size}; allowed: below dataset_size "
                f"({dataset_size}): a full-batch gradient has no noise to compare with"
            )
        if not (isinstance(beta, float) and 0.0 < beta < 1.0):
            raise ValueError(f"Invalid beta: {beta!r}; allowed range: (0.0, 1.0)")
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)):
            raise ValueError(f"Invalid threshold: {threshold!r}; allowed: a finite number")
        if min_steps is not None and (not isinstance(min_steps, int) or min_steps < 0):
            raise ValueError(f"Invalid min_steps: {min_steps!r}; allowed: an integer >= 0")
        self.optimizer = optimizer
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.beta, self.threshold, self.patience = beta, float(threshold), patience
        self.check_every, self.stride = check_every, stride
        self.min_steps = round(3 / (1 - beta)) if min_steps is None else min_steps
        self.process_group = process_group
        self.a = finite_dataset_snr(dataset_size, batch_size)
        self.step = 0
        self.means: dict[Tensor, Tensor] = {}  # parameter -> its last (strided) gradient
        # EMAs of g_t . g_{t-1}, |g_t - g_{t-1}|^2 and |g_t|^2 (this rank's part), and their
        # count
        self.noise: Tensor | None = None
        self.pairs = 0
        self.rule = StopRule(rule, float(threshold), patience, self.min_steps)
        self.stop_step: int | None = None
        self.last: dict[str, float] = {}
        self._handle = optimizer.register_step_pre_hook(self._observe)
        register = getattr(optimizer, "add_monitor", None)
        if callable(register):  # SNR optimizers report it in metrics()
            register(self)

    # ------------------------------------------------------------------ observing
    def _view(self, g: Tensor) -> Tensor:
        flat = local(g).detach().reshape(-1)
        return flat[:: self.stride] if self.stride > 1 else flat

    @torch.no_grad()
    def _observe(self, optimizer, args, kwargs) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grads = [(p, p.grad) for p in params if p.grad is not None]
        if not grads:
            return
        self.step += 1
        sums = None
        for p, g in grads:
            x = self._view(g).float()
            prev = self.means.get(p)
            if prev is None:
                self.means[p] = x.clone()
                continue
            d = x - prev
            # g_t . g_{t-1}, |g_t - g_{t-1}|^2, |g_t|^2
            s = torch.stack([torch.dot(x, prev), torch.dot(d, d), torch.dot(x, x)])
            sums = s if sums is None else sums + s
            prev.copy_(x)
        if sums is not None:
            if self.noise is None:
                self.noise = torch.zeros(3, device=sums.device)
            self.pairs += 1
            self.noise.mul_(self.beta).add_(sums, alpha=1.0 - self.beta)
        if self.step % self.check_every == 0:
            self._check()

    def _partials(self) -> Tensor:
        device = self.noise.device if self.noise is not None else "cpu"
        return self.noise if self.noise is not None else torch.zeros(3, device=device)

    def _group(self):
        if self.process_group is not None:
            return self.process_group
        for p in self.means:
            if is_dtensor(p):
                return p.device_mesh.get_group()
        return None

    def _statistics(self) -> dict[str, float]:
        parts = self._partials().clone()
        group = self._group()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(parts, group=group)
        cross, scatter, square = (float(v) for v in parts.tolist())
        if self.pairs < 1 or scatter <= 0.0:
            return {"step": float(self.step)}
        corr = 1.0 - self.beta**self.pairs  # the EMAs' bias correction (it cancels in ratios)
        # EMAs of the same pairs: their bias corrections cancel in every ratio below
        n, b = self.dataset_size, self.batch_size
        noise = scatter / 2.0  # ~ tr(Sigma) / b
        coherence = cross / noise  # b |mu|^2 / tr(Sigma) - b / (n - 1): 0 without shared signal
        snr = max(coherence + b / (n - 1), 0.0)  # b / B_noise: one step's SNR
        return {
            "step": float(self.step),
            "coherence": coherence,
            "snr": snr,
            "ratio": snr / self.a,
            "noise_scale": b / snr if snr > 0 else math.inf,
            # the raw averages (sums over coordinates), for other rules read off line
            "cross": cross / corr,
            "scatter": scatter / corr,
            "square": square / corr,
        }

    def read(self) -> dict[str, float]:
        """The statistic now (``ratio``, ``coherence``, ``snr``, ``noise_scale``), without
        counting it as a check: the stop decision sees only the regular checks. One host
        sync (and one all-reduce of four numbers with a process group)."""
        return self._statistics()

    def _check(self) -> None:
        stats = self._statistics()
        self.last = stats
        if "ratio" not in stats or self.stop_step is not None:
            return
        if self.rule.update(self.step, stats["ratio"]):
            self.stop_step = self.step

    # ------------------------------------------------------------------ reading
    @property
    def should_stop(self) -> bool:
        """True from the check at which the stop was first signalled."""
        return self.stop_step is not None

    def metrics(self) -> dict[str, Any]:
        """``ratio`` (1: only what single examples explain), ``coherence`` (0 there), ``snr``,
        ``noise_scale`` (the per-example gradient noise scale, examples), ``should_stop``,
        ``stop_step``, as of the last check (reading them runs no collective)."""
        out: dict[str, Any] = {k: v for k, v in self.last.items() if k != "step"}
        out.update(
            step=self.step,
            checked_at=int(self.last.get("step", 0)),
            should_stop=self.should_stop,
            stop_step=self.stop_step,
            rule=self.rule.rule,
            threshold=self.threshold,
        )
        return out

    def close(self) -> None:
        """Stop observing (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (means by parameter index)."""
        index = {p: i for i, p in enumerate(self._params())}
        return {
            "step": self.step,
            "means": {index[p]: m.clone() for p, m in self.means.items() if p in index},
            "noise": None if self.noise is None else self.noise.clone(),
            "pairs": self.pairs,
            "rule": self.rule.state(),
            "stop_step": self.stop_step,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self._params()
        self.step = int(state["step"])
        self.means = {}
        for i, m in state["means"].items():
            p = params[int(i)]
            self.means[p] = m.to(device=local(p).device, dtype=torch.float32).clone()
        noise = state["noise"]
        device = next(iter(self.means.values())).device if self.means else "cpu"
        self.noise = None if noise is None else noise.to(device).clone()
        self.pairs = int(state.get("pairs", 0))
        self.rule.load(state.get("rule", {}))
        self.stop_step = state["stop_step"]
        self.last = dict(state.get("last", {}))

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]
