"""SNRPreconditioner: the SNR gate on top of *any* torch optimizer (SGD, Adam, Lion, ...).

The base optimizer computes its update as usual; the wrapper measures it (parameters after minus
before) and scales it by the gates. The SNR statistics are the wrapper's own (it cannot assume
the base keeps a second moment), so the temporal estimator costs two state vectors here,
versus one in `snr_dist.optim.snr_adamw.SNRAdamW`.

The wrapper gates the base's *whole* update, including any weight decay the base applies. For
ungated decoupled decay, use SNRAdamW, or set the base's ``weight_decay=0`` and decay yourself.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from snr_dist.distributed.context import local
from snr_dist.optim.gating import MomentSource, SNRGating, collect_gradients
from snr_dist.options import SNR_DEFAULTS, validate_options


class SNRPreconditioner(torch.optim.Optimizer):
    """Gate the updates of ``base_optimizer`` by their signal-to-noise ratio.

    The SNR options (see `snr_dist.optim.snr_adamw.SNRAdamW`; here also ``snr_beta2``,
    the EMA factor of the squared gradient) become defaults of every base param group; keys
    already present in a base group (e.g. ``SGD([{"params": w, "mode": "subspace"}])``) win.
    ``param_groups`` is the base optimizer's list, so LR schedulers act on the base directly.
    The state_dict holds the base's state_dict and the SNR statistics.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        foreach: bool = True,
        skip_nonfinite: bool = True,
        process_group="auto",
        **snr_options: Any,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)!r}"
            )
        if isinstance(base_optimizer, torch.optim.LBFGS):
            raise TypeError(
                "SNRPreconditioner cannot wrap LBFGS: it re-evaluates the closure inside its "
                "step, so a single gradient (and SNR) per step does not exist"
            )
        validate_options(snr_options)
        self.base = base_optimizer
        self.foreach = foreach
        self.skip_nonfinite = skip_nonfinite
        self._snr_defaults = {**SNR_DEFAULTS, **snr_options}
        for group in base_optimizer.param_groups:
            self._apply_defaults(group)
        super().__init__(base_optimizer.param_groups, {**base_optimizer.defaults, **snr_options})
        self.param_groups = base_optimizer.param_groups  # one list, shared with the base
        self.process_group = process_group
        self._gating = SNRGating(self, self._moment_source, process_group)
        self._gating.check_consistent()

    def _apply_defaults(self, group: dict) -> None:
        for k, v in self._snr_defaults.items():
            group.setdefault(k, v)
        validate_options({k: group[k] for k in SNR_DEFAULTS})

    @staticmethod
    def _moment_source(group: dict) -> MomentSource:
        return MomentSource(
            mean_key="snr_avg",
            beta_s=group["snr_beta"],
            owns_mean=True,
            sq_key="snr_sq",
            beta_v=group["snr_beta2"],
            owns_sq=True,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "_gating"):  # called from Optimizer.__init__ for the base's groups
            super().add_param_group(param_group)
            return
        self.base.add_param_group(param_group)
        self._apply_defaults(self.base.param_groups[-1])
        self._gating.refresh_groups()

    def __repr__(self) -> str:
        return f"SNRPreconditioner({self.base!r})"

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{"base": base.state_dict(), "snr": {"state": {param index: SNR state}}}``."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        snr_state = {
            index[p]: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for p, st in self.state.items()
        }
        return {"base": self.base.state_dict(), "snr": {"state": snr_state}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what `state_dict` wrote (the base's state and groups, then the SNR state)."""
        if set(state_dict) != {"base", "snr"}:
            raise ValueError(
                "not an SNRPreconditioner state_dict: expected keys 'base' and 'snr', got "
                f"{sorted(state_dict)}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        snr_state = state_dict["snr"]["state"]
        bad = [i for i in snr_state if not 0 <= int(i) < len(params)]
        if bad:
            raise ValueError(f"SNR state refers to parameter indices {bad} that do not exist")
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.state = defaultdict(dict)
        for i, st in snr_state.items():
            p = params[int(i)]
            self.state[p] = {
                k: (v.to(p.device).clone() if torch.is_tensor(v) and k != "step" else v)
                for k, v in st.items()
            }
        self._gating.refresh_groups()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._gating = SNRGating(self, self._moment_source, getattr(self, "process_group", None))

    # ------------------------------------------------------------------ public extras
    def microbatch(self, weight: float = 1.0):
        """See `snr_dist.optim.snr_adamw.SNRAdamW.microbatch`."""
        return self._gating.microbatch(weight)

    def metrics(self, names: dict[Tensor, str] | None = None) -> dict[str, Any]:
        """See `snr_dist.optim.snr_adamw.SNRAdamW.metrics`."""
        from snr_dist.metrics import collect_metrics

        return collect_metrics(self, self._gating, names)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's zero_grad; also forgets micro-batch gradients recorded since the last step."""
        self.base.zero_grad(set_to_none=set_to_none)
        self._gating.discard_microbatches()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """Record statistics, let the base step, then gate what it changed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hidden: list[tuple[Tensor, Tensor]] = []  # non-finite grads hidden from the base
        try:
            collected = []
            for group in self.param_groups:
                params, grads, skipped = collect_gradients(
                    group, self._gating, self.skip_nonfinite, "SNRPreconditioner"
                )
                for p in skipped:
                    hidden.append((p, p.grad))
                    p.grad = None
                self._gating.check_ready(group, params)
                collected.append((group, params, grads))
            self._gating.discard_microbatches([p for p, _ in hidden])
            work = []
            for group, params, grads in collected:
                if not params:
                    continue
                steps = []
                for p in params:
                    st = self.state[p]
                    if "step" not in st:
                        st["step"] = torch.zeros((), dtype=torch.float32)
                        self._gating.init_state(p, group, st)
                    st["step"] += 1
                    steps.append(int(st["step"].item()))
                grads32 = [g if g.dtype == torch.float32 else g.float() for g in grads]
                self._gating.update_statistics(group, params, grads32, steps)
                work.append((group, params, grads32, steps))
            self._gating.exchange(work)
            snapshots = []
            for group, params, _, steps in work:
                active = any(self._gating.gate_active(group, t) for t in steps)
                before = torch._foreach_mul([local(p) for p in params], 1.0) if active else None
                snapshots.append(before)
            self.base.step()
        finally:
            for p, g in hidden:
                p.grad = g
        for (group, params, _, steps), before in zip(work, snapshots):
            if before is None:
                continue
            now = [local(p) for p in params]
            delta = [d.float() for d in torch._foreach_sub(now, before)]
            self._gating.gate_(group, params, delta, steps, self.foreach)
            torch._foreach_add_(before, [d.to(b.dtype) for d, b in zip(delta, before)])
            torch._foreach_copy_(now, before)
        self._gating.refresh(work)
        return loss
