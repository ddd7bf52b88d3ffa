"""Per-step constants gathered on the device, so a step never reads its step count on the host.

A diagonal temporal step needs constants that depend on the step count ``t`` (Adam's bias
corrections, the SNR rule's ``k_t``, the innovation's ``kappa_t`` -- a recursion, with no
closed form -- and whether the gate is on yet). Where a parameter that met a non-finite
gradient keeps its old step without the host knowing (the device-side skip of the compiled
and Triton steps), its constants cannot be host floats: each parameter's ``step`` lives on
its device and its constants are rows of a table indexed by it.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

from snr_dist.kernels.reference import snr_adamw_scalars

#: Row layout (index ``t``, the step after the update). Constants that scale with the
#: learning rate are stored at ``lr = 1``.
FIELDS = (
    "gated",
    "step_size",  # 1 / (1 - beta1^t)
    "inv_bc2_sqrt",
    "inv_bc_s_sq",
    "inv_bc_v",
    "inv_one_k",
    "shift",
    "update_x",
    "inv_bc_prev",
    "var_scale",
)
FIELD = {name: i for i, name in enumerate(FIELDS)}


def row(t: int, betas, snr_beta, rule, gate_a, warmup, noise) -> list[float]:
    """The constants of step ``t`` (`snr_adamw_scalars`, the eager path's own host floats)."""
    sc = snr_adamw_scalars(t, 1.0, betas, 0.0, 0.0, snr_beta, rule, 1.0, gate_a, warmup, noise)
    sc = {k: float(v) for k, v in sc.items()}
    sc["inv_bc_s_sq"] = sc["inv_bc_s"] ** 2
    return [sc[name] for name in FIELDS]


class StepTable:
    """``rows[t]`` for ``t = 0..capacity-1`` of one configuration ``key = (betas, snr_beta,
    rule, gate_a, warmup_steps, noise)``, kept on one device and grown (doubling) on the host
    ahead of the steps it must cover."""

    def __init__(self, key: tuple, device: torch.device) -> None:
        self.key = key
        self.device = device
        self.rows = torch.zeros((0, len(FIELDS)), dtype=torch.float32, device=device)

    def covering(self, step_bound: int) -> Tensor:
        """The table with a row for every step up to ``step_bound`` (inclusive)."""
        need = step_bound + 1
        have = self.rows.shape[0]
        if have < need:
            size = max(need, 2 * have, 64)
            new = [[0.0] * len(FIELDS) if t == 0 else row(t, *self.key) for t in range(have, size)]
            # non_blocking: a host-to-device copy that does not wait for the device
            extra = torch.tensor(new, dtype=torch.float32).to(self.device, non_blocking=True)
            self.rows = torch.cat([self.rows, extra]) if have else extra
        return self.rows


_lock = threading.Lock()
_tables: dict[tuple, StepTable] = {}


def step_table(key: tuple, device: torch.device) -> StepTable:
    """The process-wide table of ``key`` on ``device``."""
    with _lock:
        table = _tables.get((key, device))
        if table is None:
            table = _tables[(key, device)] = StepTable(key, device)
    return table


def advance(steps: list[Tensor], skips: list[Tensor], ok: Tensor, table: Tensor) -> Tensor:
    """``steps += ok``, ``skips += !ok`` (0-dim fp32 tensors, in place, on the device) and each
    parameter's row of ``table`` at its new step (``[len(steps), len(FIELDS)]``). ``ok``: one
    bool per parameter. No host read."""
    okf = ok.to(torch.float32)
    torch._foreach_add_(steps, list(okf.unbind(0)))
    torch._foreach_add_(skips, list((1.0 - okf).unbind(0)))
    t = torch.stack(steps).clamp_(max=table.shape[0] - 1).long()
    return table.index_select(0, t)


def finite(grads: list[Tensor]) -> Tensor:
    """One bool per gradient, on the device, without a host read: free of NaN and Inf. The
    max-norm propagates NaN and never overflows (a 2-norm of finite values can)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf"))))
