r"""A validation-free stop: when what is left of the gradient is what single examples explain.

For a training set of ``n`` examples and batches of ``b``, let ``mu`` be the full-batch gradient
and ``Sigma`` the per-example gradient covariance. Gradient-statistics stopping rules (Mahsereci
et al. 2017, "Early Stopping without a Validation Set"; the gradient noise scale of McCandlish
et al. 2018) compare ``|mu|^2`` with the noise of one step's gradient, ``tr(Sigma) / b``. Their
usual threshold (stop when the signal is no larger than zero) fires only once the training loss
is at its minimum, after a network has memorised whatever noisy labels it holds: on a *finite*
training set the gradient never turns into pure noise while examples are still being fit.

What does turn is its kind. When the per-example gradients share no direction (each example
pulls its own way: memorising a flipped label, fitting residual noise), ``|mu|^2 ~ tr(Sigma) /
n``, so the step's signal-to-noise ratio falls to ``b / (n - b)`` (sampling without
replacement), the paper's finite-dataset threshold. Learning a pattern many examples share keeps
it far above that. The monitor therefore reads

``ratio = (|mu|^2 / (tr(Sigma) / b)) / (b / (n - b))``  (equivalently ``(n - b) / B_noise``),

from running statistics of the applied gradients, and signals a stop once it has stayed at or
below ``threshold`` for ``patience`` checks: the coherent part of the gradient is gone. The
estimates are those of the temporal SNR estimator (`snr_dist.snr`), summed over coordinates: an
EMA ``m`` of the gradient (one fp32 tensor per monitored parameter, or every ``stride``-th
coordinate of it) and the EMA of the scalar innovation energy ``sum (g_t - m_{t-1})^2``, with the
same bias corrections. A window of several epochs (``beta = 0.99``: ~100 steps) makes ``m`` close
to the time-averaged full-batch gradient, whatever the epoch structure of the sampling.

It observes any optimizer (a step pre-hook: AdamW as well as the SNR optimizers) and costs no
communication per step: every sum is linear in the coordinates, so a rank that holds a shard of
each parameter (FSDP2, ZeRO's partitions) keeps partial sums, and one all-reduce of three numbers
joins them when the statistic is read (every ``check_every`` steps). Replicated parameters
(DDP) hold identical gradients on every rank and need none.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from snr_dist import snr as rule
from snr_dist.distributors.dtensor import is_dtensor, local


def finite_dataset_snr(dataset_size: int, batch_size: int) -> float:
    """``b / (n - b)``: one step's SNR when the per-example gradients share no direction."""
    return rule.finite_dataset_a(dataset_size, batch_size)


class StopMonitor:
    """Watches an optimizer's gradients and says when further training stops helping.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SNRAdamW, SNRPreconditioner, AdamW, ...).
        dataset_size: training examples ``n`` (one epoch).
        batch_size: examples per optimizer step ``b`` (global: all ranks and micro-batches).
        beta: EMA factor of the gradient mean and the noise energy (the window, ~1/(1-beta)
            steps, should span several epochs).
        threshold: stop once ``ratio <= threshold`` (1: nothing left beyond what single
            examples explain).
        patience: consecutive checks at or below the threshold before the stop is signalled.
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
        threshold: float = 1.0,
        patience: int = 5,
        check_every: int = 10,
        min_steps: int | None = None,
        stride: int = 1,
        process_group=None,
    ) -> None:
        for name, value, lo in (
            ("dataset_size", dataset_size, 2),
            ("batch_size", batch_size, 1),
            ("patience", patience, 1),
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
        self.means: dict[Tensor, Tensor] = {}  # parameter -> EMA of its (strided) gradient
        self.noise: Tensor | None = None  # EMA of the innovation energy (this rank's part)
        self.below = 0  # consecutive checks at or below the threshold
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
        t, beta = self.step, self.beta
        energy = None
        for p, g in grads:
            x = self._view(g).float()
            m = self.means.get(p)
            if m is None:
                m = self.means[p] = torch.zeros_like(x)
            if t >= 2:
                r = x - m / (1.0 - beta ** (t - 1))
                e = torch.dot(r, r)
                energy = e if energy is None else energy + e
            m.lerp_(x, 1.0 - beta)
        if energy is not None:
            if self.noise is None:
                self.noise = torch.zeros_like(energy)
            self.noise.mul_(beta).add_(energy, alpha=1.0 - beta)
        if t % self.check_every == 0:
            self._check()

    def _partials(self) -> Tensor:
        t, beta = self.step, self.beta
        device = next(iter(self.means.values())).device if self.means else "cpu"
        sig = torch.zeros((), device=device)
        for m in self.means.values():
            sig = sig + m.square().sum() / (1.0 - beta**t) ** 2
        noise = self.noise if self.noise is not None else torch.zeros((), device=device)
        return torch.stack([sig, noise.to(device), torch.ones((), device=device)])

    def _group(self):
        if self.process_group is not None:
            return self.process_group
        for p in self.means:
            if is_dtensor(p):
                return p.device_mesh.get_group()
        return None

    def _statistics(self) -> dict[str, float]:
        t, beta = self.step, self.beta
        parts = self._partials()
        group = self._group()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(parts, group=group)
        sig, noise_energy, _ = (float(v) for v in parts.tolist())
        if t < 2 or noise_energy <= 0.0:
            return {"step": float(t)}
        # the innovation energy's expectation is var * (1 + kappa) (snr_dist.snr)
        kappa = rule.innovation_kappa(beta, beta, t)
        var = noise_energy / ((1.0 - beta ** (t - 1)) * (1.0 + kappa))
        signal = max(sig - rule.ema_noise_factor(beta, t) * var, 0.0)
        snr = signal / var
        return {
            "step": float(t),
            "snr": snr,
            "ratio": snr / self.a,
            "noise_scale": self.batch_size / snr if snr > 0 else math.inf,
        }

    def read(self) -> dict[str, float]:
        """The statistic now (``ratio``, ``snr``, ``noise_scale``), without counting it as a
        check: the stop decision sees only the regular checks. One host sync (and one
        all-reduce of three numbers with a process group)."""
        return self._statistics()

    def _check(self) -> None:
        stats = self._statistics()
        self.last = stats
        if "ratio" not in stats or self.stop_step is not None:
            return
        if self.step >= self.min_steps and stats["ratio"] <= self.threshold:
            self.below += 1
            if self.below >= self.patience:
                self.stop_step = self.step
        else:
            self.below = 0

    # ------------------------------------------------------------------ reading
    @property
    def should_stop(self) -> bool:
        """True from the check at which the stop was first signalled."""
        return self.stop_step is not None

    def metrics(self) -> dict[str, Any]:
        """``ratio`` (1: only what single examples explain), ``snr``, ``noise_scale`` (the
        per-example gradient noise scale, examples), ``should_stop``, ``stop_step``, as of the
        last check (reading them runs no collective)."""
        out: dict[str, Any] = {k: v for k, v in self.last.items() if k != "step"}
        out.update(
            step=self.step,
            checked_at=int(self.last.get("step", 0)),
            should_stop=self.should_stop,
            stop_step=self.stop_step,
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
            "below": self.below,
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
        self.below = int(state["below"])
        self.stop_step = state["stop_step"]
        self.last = dict(state.get("last", {}))

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]
