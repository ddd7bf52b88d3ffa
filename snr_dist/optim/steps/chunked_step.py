"""The CPU step of the elementwise estimators, a cache-sized chunk of parameters at a time.

The torch step runs ~17 elementwise passes over the parameters' bytes where AdamW's runs ~8.
Over the whole model each pass streams from memory and its temporaries are model-sized (freed
and faulted back in by the allocator every step); over `CPU_CHUNK_ELEMENTS` at a time the
passes after the first read from cache and the temporaries live in buffers reused from step to
step (`snr_dist.kernels.scratch`). Every element goes through the same kernels as in one
multi-tensor call: the result is bit-identical to the torch step over all of them.
"""

from __future__ import annotations

from torch import Tensor

from snr_dist.distributors.dtensor import local
from snr_dist.estimators import Slot
from snr_dist.estimators import estimator_key as est_key
from snr_dist.optim.base import advance_steps
from snr_dist.optim.steps.base import StepContext, StepKernel
from snr_dist.optim.steps.torch_step import TorchStep, fp32_grads, low_precision, widen

#: Elements per chunk of the elementwise step on the CPU (1 MB per fp32 vector: the step's
#: ~8 live vectors of a chunk stay in the last-level cache; `benchmarks/step_floor.py`).
CPU_CHUNK_ELEMENTS = 1 << 18
#: Chunks from this size on (up to `CPU_CHUNK_ELEMENTS`) keep their temporaries in reused
#: buffers (`snr_dist.kernels.scratch`): the C library's heap faults large fresh blocks in
#: page by page; below it the buffers save less than their bookkeeping costs.
SCRATCH_MIN_ELEMENTS = 1 << 17


class ChunkedStep(StepKernel):
    name = "chunked"

    def __init__(self, ctx: StepContext, torch_step: TorchStep) -> None:
        super().__init__(ctx)
        self.torch = torch_step

    def step(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        scratch = self.ctx.engine.scratch
        for idx, size in _chunks(list(range(len(params))), [g.numel() for g in grads]):
            if size > CPU_CHUNK_ELEMENTS:  # one large tensor: a chunk-sized piece at a time
                self.pieces(group, params[idx[0]], grads[idx[0]])
                continue
            if len(idx) == len(params):
                ps, gs = params, grads
            else:
                ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
            self.torch.step(group, ps, gs, scratch if size >= SCRATCH_MIN_ELEMENTS else None)

    def pieces(self, group: dict, p: Tensor, g: Tensor) -> None:
        """The step of one parameter larger than a chunk, on flat pieces of
        `CPU_CHUNK_ELEMENTS` of it and of its gradient and state (views: nothing is copied);
        its step count advances once. Bit-identical to the whole tensor's step for fp32
        parameters; for bf16 at one thread (with more, ATen's split of a tensor across threads
        already moves bf16 roundings, whole or in pieces). The pieces' slots key per-parameter
        caches on ``(p, offset)``."""
        lp = local(p)
        state = self.ctx.state(p, group)
        (step,) = advance_steps([state])
        (g32,) = fp32_grads(group, [g])
        key = est_key(p, group)
        low = low_precision(group)
        if not (lp.is_contiguous() and g32.is_contiguous()):  # no flat views: whole, as before
            by_est = {key: [Slot(p, state, g32, step)]}
            if low:
                widen(by_est[key])
            self.torch.fold(group, by_est)
            self.torch.update(group, by_est)
            return
        # pieces start at multiples of 64 elements: every element then sits where it sits in
        # the whole tensor's vectorised loops (a loop's scalar tail rounds bf16 differently)
        n, limit = lp.numel(), max(64, CPU_CHUNK_ELEMENTS // 64 * 64)
        whole = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == lp.shape]
        for at in range(0, n, limit):
            end = min(at + limit, n)
            piece = dict(state)
            for k in whole:
                piece[k] = state[k].view(-1)[at:end]
            slot = Slot(lp.view(-1)[at:end], piece, g32.view(-1)[at:end], step, key=(p, at))
            by_est = {key: [slot]}
            scratch = self.ctx.engine.scratch if end - at >= SCRATCH_MIN_ELEMENTS else None
            if low:
                widen([slot], scratch)
            self.torch.fold(group, by_est, scratch)
            self.torch.update(group, by_est, scratch)


def _chunks(items: list[int], sizes: list[int]) -> list[tuple[list[int], int]]:
    """``items`` in chunks whose sizes add up to at most `CPU_CHUNK_ELEMENTS` (a larger one
    alone), each with its total size. First fit, largest first: a bias or a norm scale joins
    a matrix's chunk instead of making one of its own (a chunk costs ~20 multi-tensor calls
    whatever its size); within a chunk the items keep their order."""
    limit = CPU_CHUNK_ELEMENTS
    total = sum(sizes)
    if total <= limit:
        return [(items, total)]
    chunks: list[list] = []  # [size, positions]
    for k in sorted(range(len(items)), key=lambda k: -sizes[k]):
        n = sizes[k]
        for chunk in chunks:
            if chunk[0] + n <= limit:
                chunk[0] += n
                chunk[1].append(k)
                break
        else:
            chunks.append([n, [k]])
    return [([items[k] for k in sorted(ks)], n) for n, ks in chunks]
