r"""Kernel dispatch: which implementation of the three hot loops runs.

The torch references live in `snr_dist.kernels.reference`; the Triton kernels in
`snr_dist.triton_kernels` (the repository's top-level ``kernels/`` folder, installed under the
``snr_dist`` namespace). `resolve` decides: an explicit ``"torch"`` or ``"triton"`` wins;
``"auto"`` reads ``SNR_DIST_KERNELS`` and otherwise picks Triton only for CUDA tensors when it
imports, and says once, with the import error, when it cannot.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from snr_dist.kernels.reference import (
    FLOAT_DTYPES,
    check_orthonormal,
    check_projection,
    check_reconstruct,
    check_step,
    fused_snr_adamw_step_torch,
    gate_reconstruct_torch,
    project_with_stats_torch,
    snr_adamw_scalars,
)
from snr_dist.options import validate_kernels

ENV_VAR = "SNR_DIST_KERNELS"

_triton_error: str | None = None  # why the Triton kernels failed to import, once known
_warned_fallback = False

__all__ = [
    "AUTO_COMPILE_ELEMENTS",
    "ENV_VAR",
    "FLOAT_DTYPES",
    "auto_compiles",
    "check_orthonormal",
    "check_projection",
    "check_reconstruct",
    "check_step",
    "effective",
    "fused_snr_adamw_step",
    "fused_snr_adamw_step_torch",
    "gate_reconstruct",
    "gate_reconstruct_torch",
    "interpreting",
    "project_with_stats",
    "project_with_stats_torch",
    "resolve",
    "snr_adamw_scalars",
    "step_kernels",
    "triton_available",
    "warn_no_compile",
]


# ------------------------------------------------------------------ dispatch
def validate_choice(value, name: str = "kernels") -> str:
    validate_kernels(value, name)
    return value


def triton_available() -> bool:
    """Whether the Triton kernels import (Triton installed, a driver or the interpreter)."""
    global _triton_error
    if _triton_error is not None:
        return False
    try:
        import snr_dist.triton_kernels  # noqa: F401
    except Exception as e:  # ImportError, or a Triton that cannot find a backend
        _triton_error = f"{type(e).__name__}: {e}"
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(choice: str, device: torch.device | str | None) -> str:
    """``"torch"`` or ``"triton"`` for tensors on ``device``.

    ``"auto"`` defers to ``SNR_DIST_KERNELS`` when set, else uses Triton for CUDA tensors when
    it imports. A forced ``"triton"`` that cannot run raises instead of silently falling back,
    so a benchmark or a test never measures the wrong path.
    """
    choice = effective(choice)
    if choice == "compile":  # compiles the diagonal step only (`step_kernels`)
        choice = "auto"
    if choice == "torch":
        return "torch"
    cuda = device is not None and torch.device(device).type == "cuda"
    if choice == "auto":
        if not cuda:
            return "torch"
        if triton_available():
            return "triton"
        _warn_fallback()
        return "torch"
    if not triton_available():
        raise RuntimeError(
            f"snr-dist: kernels='triton' was requested but the Triton kernels do not import "
            f"({_triton_error}); install the extra (pip install 'snr-dist[triton]') or use "
            "kernels='torch'"
        )
    if not cuda and not interpreting():
        raise RuntimeError(
            f"snr-dist: kernels='triton' on {device} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported, or use CUDA tensors"
        )
    return "triton"


def effective(choice: str) -> str:
    """``choice``, or under ``"auto"`` what ``SNR_DIST_KERNELS`` says when it is set."""
    validate_choice(choice)
    if choice == "auto":
        env = os.environ.get(ENV_VAR, "").strip()
        if env:
            choice = validate_choice(env, ENV_VAR)
    return choice


def step_kernels(choice: str, device: torch.device | str | None) -> str:
    """``"compile"``, ``"triton"`` or ``"torch"`` for the diagonal temporal step on ``device``.

    ``"compile"`` (the option, or ``SNR_DIST_KERNELS=compile``) runs
    `snr_dist.kernels.compiled`; where torch.compile cannot run (no C++ compiler, say), it
    says why once and the step runs as ``"auto"`` would."""
    if effective(choice) == "compile":
        from snr_dist.kernels.compiled import compile_available

        why = compile_available()
        if why is None:
            return "compile"
        warn_no_compile(why)
    return resolve(choice, device)


#: From this many elements (global) of diagonal temporal parameters in a param group on the
#: CPU, ``kernels="auto"`` compiles their step: the compile (13 s with a warm Inductor cache, 48
#: s cold, on a 2-core Xeon beside another job) then pays back within about 700 (warm) or 2,600
#: (cold) steps at the ~2.2 ns per element per step it saves (docs/kernels.md, "The compiled
#: step"). The digits MLP (83K) and the 3.3M GPT of the benchmarks stay uncompiled.
AUTO_COMPILE_ELEMENTS = 1 << 23

_warned_compile = False
_said_auto_compile = False


def auto_compiles(elements: int, group_index: int) -> bool:
    """Whether ``kernels="auto"`` (``SNR_DIST_KERNELS`` unset) compiles the diagonal temporal
    step of a CPU param group with ``elements`` elements of such parameters: from
    `AUTO_COMPILE_ELEMENTS` on, where torch.compile runs. Says so once per process."""
    global _said_auto_compile
    if elements < AUTO_COMPILE_ELEMENTS:
        return False
    from snr_dist.kernels.compiled import compile_available

    if compile_available() is not None:  # not asked for: no word, the uncompiled step runs
        return False
    if not _said_auto_compile:
        _said_auto_compile = True
        warnings.warn(
            f"snr-dist: kernels='auto' compiles the diagonal step of param group {group_index} "
            f"({elements / 1e6:.1f}M elements on the CPU, at least "
            f"{AUTO_COMPILE_ELEMENTS / 1e6:.1f}M): its first step compiles (about 15 s, 50 s "
            "with a cold Inductor cache) and a faster step pays that back within about a "
            "thousand steps. kernels='torch' keeps it uncompiled (results differ in the last "
            "bits). Said once.",
            UserWarning,
            stacklevel=4,
        )
    return True


def warn_no_compile(why: str) -> None:
    """Once per process: why the compiled step does not run."""
    global _warned_compile
    if not _warned_compile:
        _warned_compile = True
        warnings.warn(
            f"snr-dist: kernels='compile' cannot compile here ({why}); the diagonal step runs "
            "uncompiled (same results, slower).",
            RuntimeWarning,
            stacklevel=3,
        )


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"snr-dist: the Triton kernels do not import ({_triton_error}); kernels='auto' "
            "runs the torch path on CUDA tensors instead (slower). Install the extra (pip "
            "install 'snr-dist[triton]'), or set SNR_DIST_KERNELS=torch to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )


# ------------------------------------------------------------------ dispatching entry points
def project_with_stats(X: Tensor, Q: Tensor, *, kernels: str = "auto") -> tuple[Tensor, Tensor]:
    """``(R, col_sq)``: ``R = X Q`` (fp32) and the per-column sums of squares of ``R``."""
    if resolve(kernels, getattr(X, "device", None)) == "triton":
        from snr_dist import triton_kernels as _k

        return _k.project_with_stats(X, Q)
    return project_with_stats_torch(X, Q)


def gate_reconstruct(
    X: Tensor,
    R: Tensor,
    Q: Tensor,
    c: Tensor,
    a: float | Tensor,
    *,
    out: Tensor | None = None,
    inplace: bool = False,
    accumulate: bool = False,
    check_orthonormal: bool = True,
    kernels: str = "auto",
) -> Tensor:
    """``Y = a X + (R * c) Q^T`` in ``X``'s dtype; see `gate_reconstruct_torch`."""
    kw = dict(out=out, inplace=inplace, accumulate=accumulate, check_orthonormal=check_orthonormal)
    if resolve(kernels, getattr(X, "device", None)) == "triton":
        from snr_dist import triton_kernels as _k

        return _k.gate_reconstruct(X, R, Q, c, a, **kw)
    return gate_reconstruct_torch(X, R, Q, c, a, **kw)


def fused_snr_adamw_step(*args, kernels: str = "auto", **kwargs) -> None:
    """One diagonal temporal SNR-AdamW step; see `fused_snr_adamw_step_torch`."""
    params = args[0] if args else kwargs["params"]
    device = params[0].device if len(params) else None
    if resolve(kernels, device) == "triton":
        from snr_dist import triton_kernels as _k

        return _k.fused_snr_adamw_step(*args, **kwargs)
    return fused_snr_adamw_step_torch(*args, **kwargs)
