"""The exact empirical NTK of a model, and products with it that never form the Jacobian.

For a model ``f(theta, x)`` with ``C`` outputs and inputs ``x_1..x_n``, let ``J`` be the
``(n*C) x P`` Jacobian of all outputs with respect to the trainable parameters (row ``i*C + c``
is ``d f_c(x_i) / d theta``). The empirical NTK is ``K = J J^T``. Three views of it:

- ``"full"``: ``K[i, j, c, d] = <J_ic, J_jd>``, shape ``(n, n, C, C)``
  (`full_to_matrix` gives the ``(n*C, n*C)`` matrix);
- ``"trace"``: ``K[i, j] = sum_c <J_ic, J_jc>``, shape ``(n, n)``: the kernel whose spectrum
  is usually reported, and the one the signal-channel / reservoir picture is drawn on;
- ``"diagonal"``: ``K[i, c] = |J_ic|^2``, shape ``(n, C)``: per-example self-kernels only.

Jacobians are built per example (``vmap`` of ``jacrev`` over ``functional_call``), a chunk
of ``chunk_size`` examples at a time, so memory is ``O(chunk_size * C * P)`` instead of
``O(n * C * P)``. The parameters are the model's own tensors, detached (no copy): the caller's
autograd graph and ``.grad`` are untouched. Per-example evaluation assumes that examples do
not interact in the forward pass: put BatchNorm models in eval mode first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

MODES = ("full", "trace", "diagonal")


def trainable_params(model: nn.Module) -> dict[str, Tensor]:
    """The parameters the kernel differentiates: trainable ones, detached views (no copy)."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return params


def _check_inputs(model: nn.Module, x: Tensor, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty tensor of inputs (batch first)")
    params = list(trainable_params(model).values())  # fails clearly for a parameter-less model
    device = params[0].device
    if device.type == "meta" or x.device.type == "meta":
        raise ValueError(
            "the model's parameters (or the inputs) are on the meta device: they hold no "
            "values, so there is no kernel to compute; materialise them first "
            "(model.to_empty(device=...) and load the weights)"
        )
    return x.to(device)


def _chunks(n: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    size = n if chunk_size is None else chunk_size
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def jacobian(model: nn.Module, x: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
    """Per-example Jacobians of the flattened outputs: shape ``(n, C, P)``.

    Parameters are concatenated in ``named_parameters`` order. This is the one place the
    Jacobian is materialised; callers chunk ``x`` to bound its size.
    """
    params = trainable_params(model) if params is None else params

    def f(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    b = len(x)
    first = next(iter(jac.values()))
    return torch.cat([j.reshape(b, first.shape[1], -1) for j in jac.values()], dim=2)


def _contract(ja: Tensor, jb: Tensor, mode: str) -> Tensor:
    if mode == "trace":  # sum_c <J_ic, J_jc>: one matmul over the (C*P) axis
        return ja.reshape(len(ja), -1) @ jb.reshape(len(jb), -1).T
    return torch.einsum("icp,jdp->ijcd", ja, jb)


def entk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    mode: str = "trace",
    chunk_size: int | None = None,
) -> Tensor:
    """The exact empirical NTK on ``x`` (or the cross-kernel between ``x`` and ``x2``).

    Args:
        model: any module whose outputs for one example depend only on that example.
        x: ``n`` inputs, batch first.
        x2: optional second set of inputs; the result is then ``K(x, x2)`` (``"full"`` or
            ``"trace"`` only). Nystrom needs these cross-kernels.
        mode: ``"full"`` ``(n, n2, C, C)``, ``"trace"`` ``(n, n2)`` or ``"diagonal"``
            ``(n, C)``.
        chunk_size: examples whose Jacobians are held at once (two chunks live at a time);
            ``None``: all. Smaller chunks trade recomputation for memory.

    Returns:
        The kernel, in the dtype and on the device of the model's parameters.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    x = _check_inputs(model, x)
    params = trainable_params(model)
    rows = _chunks(len(x), chunk_size)
    if mode == "diagonal":
        if x2 is not None:
            raise ValueError("mode='diagonal' is a per-example self-kernel; x2 must be None")
        out = []
        for r in rows:
            j = jacobian(model, x[r], params)
            out.append((j * j).sum(-1))
        return torch.cat(out)
    sym = x2 is None
    xb = x if sym else _check_inputs(model, x2, "x2")
    cols = rows if sym else _chunks(len(xb), chunk_size)
    kernel: Tensor | None = None
    cached = None  # the Jacobian of the only column chunk, when there is just one
    for a, ra in enumerate(rows):
        ja = jacobian(model, x[ra], params)
        for b, rb in enumerate(cols):
            if sym and b < a:
                continue
            if sym and a == b:
                jb = ja
            elif len(cols) == 1:
                cached = jacobian(model, xb[rb], params) if cached is None else cached
                jb = cached
            else:
                jb = jacobian(model, xb[rb], params)
            block = _contract(ja, jb, mode)
            if kernel is None:
                shape = (len(x), len(xb), *block.shape[2:])
                kernel = block.new_zeros(shape)
            kernel[ra, rb] = block
            if sym and b != a:
                kernel[rb, ra] = (
                    block.transpose(0, 1) if mode == "trace" else block.permute(1, 0, 3, 2)
                )
    assert kernel is not None
    return kernel


def full_to_matrix(kernel: Tensor) -> Tensor:
    """``(n, n2, C, C)`` -> ``(n*C, n2*C)`` with row ``i*C + c``, the layout of `jacobian`."""
    if kernel.ndim != 4:
        raise ValueError(
            f"expected a full kernel of shape (n, n2, C, C), got {tuple(kernel.shape)}"
        )
    n, n2, c, d = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * c, n2 * d)


def eigh_desc(kernel: Tensor, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric kernel.

    The kernel is symmetrised first, since a float kernel built blockwise is symmetric only
    up to rounding, and decomposed in ``dtype`` (float64 by default: small eigenvalues of an
    ENTK span many decades). A full ``(n, n, C, C)`` kernel is flattened with `full_to_matrix`.
    """
    if kernel.ndim == 4:
        kernel = full_to_matrix(kernel)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"expected a square kernel, got shape {tuple(kernel.shape)}")
    k = kernel.to(dtype)
    vals, vecs = torch.linalg.eigh((k + k.T) / 2)
    return vals.flip(0), vecs.flip(1)


def entk_matvec(
    model: nn.Module, x: Tensor, mode: str = "full", chunk_size: int | None = None
) -> Callable[[Tensor], Tensor]:
    """``V -> K V`` through vector-Jacobian and Jacobian-vector products: ``J (J^T V)``.

    ``mode="full"``: ``V`` has ``n*C`` rows (layout of `jacobian`); ``mode="trace"``: ``n``
    rows, ``K_tr v = sum_c J_c (J_c^T v)`` at ``C`` times the cost. ``V`` may be one vector or
    a matrix of column vectors. Cost per column: one backward and one forward-mode pass over
    the ``n`` inputs (per output class for ``"trace"``); memory: the activations of
    ``chunk_size`` inputs, never ``J``.
    """
    if mode not in ("full", "trace"):
        raise ValueError(f"entk_matvec mode must be 'full' or 'trace', got {mode!r}")
    x = _check_inputs(model, x)
    params = trainable_params(model)
    parts = _chunks(len(x), chunk_size)
    n = len(x)
    with torch.no_grad():
        c_out = functional_call(model, params, (x[:1],)).numel()

    def f_on(xs: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: functional_call(model, p, (xs,)).reshape(-1)

    def full_mv(v: Tensor) -> Tensor:  # (n*C, k) -> (n*C, k)
        vt = v.T.reshape(v.shape[1], n, c_out)
        grads = None
        for s in parts:  # J^T v, summed over chunks of examples
            _, pull = vjp(f_on(x[s]), params)
            g = vmap(pull)(vt[:, s].reshape(v.shape[1], -1))[0]
            grads = g if grads is None else {k: grads[k] + g[k] for k in g}
        outs = []
        for s in parts:  # J g, chunk by chunk
            push = lambda t, s=s: jvp(f_on(x[s]), (params,), (t,))[1]  # noqa: E731
            outs.append(vmap(push)(grads).reshape(v.shape[1], -1, c_out))
        return torch.cat(outs, dim=1).reshape(v.shape[1], -1).T

    def matvec(v: Tensor) -> Tensor:
        single = v.ndim == 1
        v = v.reshape(len(v), -1).to(next(iter(params.values())))
        rows = n * c_out if mode == "full" else n
        if len(v) != rows:
            raise ValueError(f"expected {rows} rows for mode={mode!r}, got {len(v)}")
        if mode == "full":
            out = full_mv(v)
        else:  # stack v (x) e_c for every class, apply the full kernel, keep column c
            k = v.shape[1]
            lifted = v.new_zeros(n, c_out, k, c_out)
            idx = torch.arange(c_out)
            lifted[:, idx, :, idx] = v.unsqueeze(0).expand(c_out, n, k)
            kv = full_mv(lifted.reshape(n * c_out, k * c_out)).reshape(n, c_out, k, c_out)
            out = kv[:, idx, :, idx].sum(0)
        return out[:, 0] if single else out

    return matvec
