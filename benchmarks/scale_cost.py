"""Cost at scale, on paper: optimizer state, bytes communicated, refresh work and time per step
of SNRAdamW against AdamW for Llama-style 1B, 8B and 70B decoders under DDP, FSDP2, DeepSpeed
ZeRO-1/2/3 and Megatron TP x DP, from 8 to 1,024 ranks.

The model is code, not a spreadsheet: every byte count is a function of the parameter shapes,
the rank, the world size, the parallelism and the SNR options, written from what the optimizer
allocates (`snr_dist/estimators/`, `SNRAdamW._init_state`) and what its distributors send
(`snr_dist/distributors/`, `snr_dist/optim/zero_view.py`), including the 25 MiB buckets and
DeepSpeed 0.19's partition layout. ``--check`` runs the small cases for real (gloo processes on
127.0.0.1, real FSDP2 and real DeepSpeed ZeRO on the CPU accelerator) and prints the model's
prediction beside each measured number; any difference makes it exit non-zero.

    python benchmarks/scale_cost.py                 # the tables (markdown) of docs/scale.md
    python benchmarks/scale_cost.py --check         # model vs measured, 2 and 4 gloo ranks
    python benchmarks/scale_cost.py --world 8,64 --models 8B --hbm-tbs 4.8

Times are a model too, at stated (assumed, not measured) rates: the options below.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from snr_dist.distributors.assignment import assign_owners, balance_ratio, rank_loads
from snr_dist.subspace import refresh_due

F32 = 4  # every SNR statistic and every optimizer moment is fp32

# ---------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Llama:
    """A Llama-style decoder: GQA attention, SwiGLU MLP, RMSNorm, no biases."""

    label: str
    d_model: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


MODELS = {
    "1B": Llama("1B", 2048, 16, 8192, 32, 8, 128256, tied=True),
    "8B": Llama("8B", 4096, 32, 14336, 32, 8, 128256),
    "70B": Llama("70B", 8192, 80, 28672, 64, 8, 128256),
}
"""Shapes as Meta published them for Llama 3.2 1B and Llama 3.1 8B and 70B (the
``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``vocab_size`` and ``tie_word_embeddings`` of their configs)."""


def llama_shapes(m: Llama) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter, in the order a Hugging Face Llama registers them
    (the order ZeRO flattens them in and the optimizer assigns trackers in)."""
    d, hd = m.d_model, m.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("embed", (m.vocab, d))]
    for i in range(m.layers):
        out += [
            (f"{i}.q", (m.heads * hd, d)),
            (f"{i}.k", (m.kv_heads * hd, d)),
            (f"{i}.v", (m.kv_heads * hd, d)),
            (f"{i}.o", (d, m.heads * hd)),
            (f"{i}.gate", (m.ffn, d)),
            (f"{i}.up", (m.ffn, d)),
            (f"{i}.down", (d, m.ffn)),
            (f"{i}.attn_norm", (d,)),
            (f"{i}.mlp_norm", (d,)),
        ]
    out.append(("norm", (d,)))
    if not m.tied:
        out.append(("lm_head", (m.vocab, d)))
    return out


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def megatron_vocab(vocab: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp``."""
    step = divisible_by * tp
    return -(-vocab // step) * step


def megatron_shapes(m: Llama, tp: int) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape on one TP rank, role)`` of a megatron-core GPTModel with Llama's sizes
    (fused QKV and gate/up, separate norms, untied output layer unless ``m.tied``). Roles are
    `snr_dist.megatron.param_role`'s: ``diagonal`` (norms, embedding, output layer), ``cols``
    (column-parallel: rows split, basis on the input side), ``rows`` (row-parallel)."""
    d, hd = m.d_model, m.head_dim
    v = megatron_vocab(m.vocab, tp)
    out = [("embed", (v // tp, d), "diagonal")]
    for i in range(m.layers):
        out += [
            (f"{i}.input_norm", (d,), "diagonal"),
            (f"{i}.proj", (d, m.heads * hd // tp), "rows"),
            (f"{i}.qkv", ((m.heads + 2 * m.kv_heads) * hd // tp, d), "cols"),
            (f"{i}.pre_mlp_norm", (d,), "diagonal"),
            (f"{i}.fc1", (2 * m.ffn // tp, d), "cols"),
            (f"{i}.fc2", (d, m.ffn // tp), "rows"),
        ]
    out.append(("final_norm", (d,), "diagonal"))
    if not m.tied:
        out.append(("output", (v // tp, d), "diagonal"))
    return out


def megatron_order(shapes: list[tuple[str, tuple[int, ...], str]]) -> list:
    """The optimizer's parameter order under `snr_dist.megatron.build_param_groups`: Megatron's
    weight-decay group first (its first parameter, the embedding, decays), then the no-decay
    group (1-D parameters), each split by role in the order diagonal, cols, rows."""
    out = []
    for decay in (True, False):
        for role in ("diagonal", "cols", "rows"):
            out += [x for x in shapes if (len(x[1]) > 1) == decay and x[2] == role]
    return out


# ---------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class Opt:
    """The optimizer and the SNR options that decide its state and its traffic."""

    name: str = "snr"  # "adamw" (torch.optim.AdamW) or "snr" (SNRAdamW)
    mode: str = "diagonal"
    estimator: str = "temporal"
    noise: str = "innovation"
    rank: int = 32
    refresh_every: int = 50
    basis_side: str = "auto"
    snr_beta: float = 0.99
    beta1: float = 0.9
    skip_nonfinite: bool = True
    micro_batches: int = 1
    """Backward passes per rank per step (each one a cross-sample hook call)."""

    @property
    def needs_rows(self) -> bool:
        """Under ZeRO 1-3 it runs on row shards (`snr_dist.deepspeed.needs_rows`)."""
        return self.name == "snr" and (self.mode == "subspace" or self.estimator == "cross_sample")

    @property
    def label(self) -> str:
        if self.name == "adamw":
            return "AdamW"
        what = "diagonal" if self.mode == "diagonal" else f"subspace r={self.rank}"
        stats = "cross-sample" if self.estimator == "cross_sample" else self.noise
        return f"SNRAdamW {what} {stats}"


@dataclass(frozen=True)
class Setup:
    """A parallelism on ``world`` ranks."""

    strategy: str  # "ddp", "fsdp2", "zero1", "zero2", "zero3", "megatron"
    world: int
    tp: int = 1
    """Megatron's tensor-parallel size (data-parallel size ``world // tp``)."""
    group: bool = True
    """DDP: the optimizer is given the data-parallel group (refreshes shared out)."""
    parameter_alignment: bool = False
    """DeepSpeed ZeRO 1/2's ``zero_optimization.parameter_alignment``."""
    sub_group_size: int = 10**9
    """DeepSpeed ZeRO 3's ``zero_optimization.sub_group_size`` (its default)."""
    bucket_mb: float = 25.0
    """`snr_dist.distributors.comm.GroupComm`'s bucket size."""

    @property
    def dp(self) -> int:
        return self.world // self.tp if self.strategy == "megatron" else self.world

    @property
    def label(self) -> str:
        if self.strategy == "megatron":
            return f"Megatron TP{self.tp} x DP{self.dp}"
        out = {"ddp": "DDP", "fsdp2": "FSDP2"}.get(self.strategy, f"ZeRO-{self.strategy[-1]}")
        if self.strategy == "zero3" and self.sub_group_size != Setup.sub_group_size:
            out += f" (sub-groups of {self.sub_group_size:,})"
        return out


@dataclass
class Piece:
    """One parameter as this rank's optimizer holds it."""

    name: str
    shape: tuple[int, ...]
    """The shape its estimator sees (global under FSDP2 and ZeRO; the TP slice under Megatron)."""
    local: int
    """Elements this rank steps (Adam's moments are this big)."""
    row_sharded: bool = False
    """An FSDP2 or ZeRO row shard: the basis lives on the column side."""
    side: str | None = None
    """Megatron's routed basis side ("cols", "rows"); None: the ``basis_side`` option."""
    diagonal_role: bool = False
    """Megatron's embedding and output layer: diagonal in subspace mode."""
    call: int = 0
    """Which of the optimizer's calls per step steps it (ZeRO-3 asks once per sub-group)."""


@dataclass
class RankView:
    """What one rank's optimizer holds and which distributor it runs."""

    pieces: list[Piece]
    distributor: str  # "local", "replicated", "sharded" (FSDP2), "zero" (ZeRO row shards)
    group_world: int
    cut_elems: list[int] = field(default_factory=list)
    """Per optimizer call: elements of the rows cut by ZeRO partition boundaries."""
    shard_copies: int = 0
    """Elements of the fp32 row-shard copies a ZeRO row-shard view keeps between steps."""
    cut_rows: int = 0
    """Rows cut by ZeRO partition boundaries (all parameters)."""

    @property
    def calls(self) -> int:
        return 1 + max((p.call for p in self.pieces), default=0)


# ---------------------------------------------------------------------------- layouts


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _row_len(shape: tuple[int, ...]) -> int:
    return numel(shape[1:]) if len(shape) > 1 else 1


def _zero_offsets(numels: tuple[int, ...], world: int, setup: Setup) -> tuple[list[int], int]:
    """Where each parameter starts in DeepSpeed 0.19's flat ZeRO 1/2 buffer (with
    ``parameter_alignment``, each parameter padded to 16 bytes) and the partition size: the
    buffer padded to a multiple of ``2 * world``, cut into ``world`` equal partitions."""
    align = 16 // math.gcd(16, F32) if setup.parameter_alignment else 1
    offsets, cur = [], 0
    for i, n in enumerate(numels):
        offsets.append(cur)
        cur += n
        if i < len(numels) - 1:
            cur += (-cur) % align
    return offsets, _ceil_div(cur, 2 * world) * 2


def zero_fragments(
    numels: tuple[int, ...], world: int, rank: int, stage: int, setup: Setup
) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """DeepSpeed 0.19's ZeRO partition of one param group on ``rank``: each parameter's
    ``(start, count)`` (elements of the flattened parameter held), its sub-group (the
    optimizer call that steps it) and the sizes of this rank's flat fp32 partitions.

    Stages 1/2 cut the flat buffer (`_zero_offsets`) into equal partitions. Stage 3 partitions
    every parameter alone (``ceil(numel / world)`` elements per rank) and groups parameters
    into sub-groups of ``sub_group_size`` partition elements."""
    if stage in (1, 2):
        offsets, size = _zero_offsets(numels, world, setup)
        lo, hi = rank * size, (rank + 1) * size
        frags = []
        for off, n in zip(offsets, numels):
            a, b = max(lo, off), min(hi, off + n)
            frags.append((a - off, b - a) if b > a else (0, 0))
        return frags, [0] * len(numels), [size]
    sizes = [_ceil_div(n, world) for n in numels]
    frags = []
    for n, size in zip(numels, sizes):
        start = rank * size
        frags.append((min(start, n), max(0, min(size, n - start))))
    total = sum(sizes)
    if setup.sub_group_size >= total:
        return frags, [0] * len(sizes), [total]
    calls, flats, acc = [], [], 0
    for i, size in enumerate(sizes):
        calls.append(len(flats))
        acc += size
        if acc >= setup.sub_group_size or i == len(sizes) - 1:
            flats.append(acc)
            acc = 0
    return frags, calls, flats


@functools.lru_cache(maxsize=64)
def zero_cuts(shapes: tuple[tuple[int, ...], ...], world: int, stage: int, setup: Setup) -> list:
    """Rows of each parameter cut by a partition boundary (`ZeroView`: a rank whose fragment
    starts inside a row), the same list on every rank."""
    numels = tuple(numel(s) for s in shapes)
    out = []
    if stage in (1, 2):
        offsets, size = _zero_offsets(numels, world, setup)
        for off, n, sh in zip(offsets, numels, shapes):
            row = _row_len(sh)
            first, last = off // size + 1, (off + n - 1) // size  # boundaries inside the param
            out.append(sum(1 for k in range(first, last + 1) if (k * size - off) % row))
        return out
    for n, sh in zip(numels, shapes):
        size, row = _ceil_div(n, world), _row_len(sh)
        starts = min(_ceil_div(n, size) - 1, world - 1)  # ranks k >= 1 whose start k * size < n
        period = row // math.gcd(size, row)  # k * size falls on a row start every `period` ranks
        out.append(starts - starts // period)
    return out


def row_piece(name: str, shape: tuple[int, ...], start: int, count: int, call: int = 0) -> Piece:
    """The row shard `ZeroView` gives a rank holding elements ``[start, start + count)`` of a
    parameter: the rows whose first element it holds."""
    row = _row_len(shape)
    first = _ceil_div(start, row) if count else 0
    last = _ceil_div(start + count, row) if count else 0
    return Piece(name, shape, (last - first) * row, row_sharded=True, call=call)


def rank_view(
    shapes: list[tuple[str, tuple[int, ...]]], setup: Setup, rank: int, opt: Opt
) -> RankView:
    """What ``rank``'s optimizer holds under ``setup`` (``shapes``: the model's parameters, or
    for Megatron `megatron_shapes`' triples)."""
    w = setup.world
    s = setup.strategy
    if s == "ddp":
        pieces = [Piece(n, sh, numel(sh)) for n, sh in shapes]
        dist = "replicated" if setup.group and w > 1 else "local"
        return RankView(pieces, dist, w if dist != "local" else 1)
    if s == "megatron":
        pieces = [
            Piece(n, sh, numel(sh), side=None if role == "diagonal" else role)
            for n, sh, role in megatron_order(shapes)
        ]
        for p in pieces:
            p.diagonal_role = p.side is None and len(p.shape) > 1
        dp = setup.dp
        return RankView(pieces, "replicated" if dp > 1 else "local", dp)
    if s == "fsdp2":
        pieces = []
        for n, sh in shapes:
            size = _ceil_div(sh[0], w)
            start = min(rank * size, sh[0])
            stop = min(start + size, sh[0])
            pieces.append(Piece(n, sh, (stop - start) * _row_len(sh), row_sharded=True))
        return RankView(pieces, "sharded" if w > 1 else "local", w)
    stage = int(s[-1])
    numels = tuple(numel(sh) for _, sh in shapes)
    frags, calls, flats = zero_fragments(numels, w, rank, stage, setup)
    if not opt.needs_rows:  # elementwise: the optimizer steps ZeRO's flat partitions
        flat = [Piece(f"flat{i}", (size,), size, call=i) for i, size in enumerate(flats)]
        return RankView(flat, "local", 1, cut_elems=[0] * len(flats))
    all_cuts = zero_cuts(tuple(sh for _, sh in shapes), w, stage, setup)
    pieces, cut, n_cut = [], [0] * len(flats), 0
    for i, ((n, sh), (start, count), cuts) in enumerate(zip(shapes, frags, all_cuts)):
        cut[calls[i]] += cuts * _row_len(sh)
        n_cut += cuts
        pieces.append(row_piece(n, sh, start, count, calls[i]))
    copies = sum(p.local for p in pieces)
    return RankView(pieces, "zero" if w > 1 else "local", w, cut, copies, n_cut)


# ---------------------------------------------------------------------------- estimators


def estimator_key(p: Piece, opt: Opt) -> tuple[str, str]:
    """``(statistics, mode)`` as `snr_dist.estimators.estimator_key` picks them."""
    stats = "cross_sample" if opt.estimator == "cross_sample" else opt.noise
    sh = p.shape
    sub = (
        opt.mode == "subspace"
        and not p.diagonal_role
        and len(sh) >= 2
        and min(sh[0], numel(sh[1:])) >= 2
    )
    return stats, "subspace" if sub else "diagonal"


def tracker_dims(p: Piece, opt: Opt) -> tuple[int, int, int]:
    """``(d, r, o)`` of a tracked parameter: basis ``d x r``, this rank's ``o`` columns of its
    matrix view (`snr_dist.subspace.init_tracker`)."""
    m, n = p.shape[0], numel(p.shape[1:])
    if p.row_sharded:
        on_rows = False
    else:
        side = p.side or opt.basis_side
        on_rows = side == "rows" or (side == "auto" and m <= n)
    d = m if on_rows else n
    return d, min(opt.rank, d), p.local // d


def tracks(p: Piece, opt: Opt) -> bool:
    return opt.name == "snr" and estimator_key(p, opt)[1] == "subspace"


def state_bytes(view: RankView, opt: Opt) -> dict[str, int]:
    """Bytes of each state key on this rank, summed over parameters."""
    out: dict[str, int] = defaultdict(int)
    for p in view.pieces:
        out["step"] += F32
        out["exp_avg"] += p.local * F32
        out["exp_avg_sq"] += p.local * F32
        if opt.name == "adamw":
            continue
        stats, mode = estimator_key(p, opt)
        own_mean = opt.snr_beta != opt.beta1
        if mode == "diagonal":
            if stats == "innovation":
                out["noise_avg"] += p.local * F32
            elif stats == "second_moment" and own_mean:
                out["snr_avg"] += p.local * F32
            elif stats == "cross_sample":
                out["raw_avg"] += p.local * F32
                out["var_avg"] += p.local * F32
            continue
        d, r, o = tracker_dims(p, opt)
        out["basis_rows"] += 1  # a bool scalar
        out["basis"] += d * r * F32
        out["sketch"] += d * r * F32
        out["sketch_weight"] += F32
        out["eigvals"] += r * F32
        if stats == "cross_sample":
            for k in ("raw_dir", "noise_dir"):
                out[k] += r * F32
            for k in ("raw_energy", "noise_energy"):
                out[k] += F32
            continue
        out["proj_avg"] += r * o * F32
        if stats == "second_moment":
            out["proj_cov"] += r * r * F32
            out["energy"] += F32
            if own_mean:
                out["snr_avg"] += p.local * F32
        else:
            out["noise_dir"] += r * F32
            out["noise_energy"] += F32
    return dict(out)


def max_state(shapes: list, setup: Setup, opt: Opt) -> tuple[int, dict[str, int]]:
    """``(rank, its state_bytes)`` of the rank that holds the most state. Rank 0 does, except
    for ZeRO 1/2 row shards (FSDP2 and ZeRO-3 give the first ranks the rounded-up share, flat
    partitions and replicas are equal); there every rank is computed, from the few
    parameters its partition touches."""
    w = setup.world
    if not (setup.strategy in ("zero1", "zero2") and opt.needs_rows):
        return 0, state_bytes(rank_view(shapes, setup, 0, opt), opt)

    def total(pieces: list[Piece]) -> dict[str, int]:
        return state_bytes(RankView(pieces, "zero", w), opt)

    numels = tuple(numel(sh) for _, sh in shapes)
    offsets, size = _zero_offsets(numels, w, setup)
    base = total([Piece(n, sh, 0, row_sharded=True) for n, sh in shapes])
    best: tuple[int, int, dict[str, int]] | None = None
    for r in range(w):
        lo, hi = r * size, (r + 1) * size
        out = dict(base)
        i = max(bisect.bisect_right(offsets, lo) - 1, 0)
        while i < len(shapes) and offsets[i] < hi:
            name, sh = shapes[i]
            a, b = max(lo, offsets[i]), min(hi, offsets[i] + numels[i])
            if b > a:
                held = total([row_piece(name, sh, a - offsets[i], b - a)])
                empty = total([Piece(name, sh, 0, row_sharded=True)])
                for k in held:
                    out[k] += held[k] - empty.get(k, 0)
            i += 1
        t = sum(out.values())
        if best is None or t > best[1]:
            best = (r, t, out)
    return best[0], best[2]


REPLICATED_KEYS = ("basis", "sketch", "eigvals", "basis_rows", "sketch_weight")
"""Tracker state every rank keeps whole, whatever rows it holds."""


# ---------------------------------------------------------------------------- collectives


def _buckets(sizes: Iterable[int], limit: int) -> list[int]:
    """Payload bytes of each call `GroupComm` makes for tensors of ``sizes`` bytes (empty
    tensors dropped, greedy buckets of at most ``limit`` bytes unless one tensor is larger)."""
    out: list[int] = []
    cur, open_ = 0, False
    for s in sizes:
        if s == 0:
            continue
        if open_ and cur + s > limit:
            out.append(cur)
            cur, open_ = 0, False
        cur += s
        open_ = True
    if open_:
        out.append(cur)
    return out


def _by_estimator(pieces: list[Piece], opt: Opt) -> list[Piece]:
    """Pieces in the order a step visits them: grouped by estimator, in order of first
    appearance (`SNREngine.slots`), parameter order within."""
    keys: dict[tuple[str, str], list[Piece]] = {}
    for p in pieces:
        keys.setdefault(estimator_key(p, opt), []).append(p)
    return [p for ps in keys.values() for p in ps]


def tracker_costs(view: RankView, opt: Opt) -> list[float]:
    """The cost of each tracker in optimizer order (`snr_dist.estimators.tracker.tracker_cost`:
    global elements times effective rank), which longest-job-first ownership balances."""
    return [float(numel(p.shape) * tracker_dims(p, opt)[1]) for p in view.pieces if tracks(p, opt)]


def owners(view: RankView, opt: Opt) -> list[int]:
    return list(_owners(tuple(tracker_costs(view, opt)), view.group_world))


@functools.lru_cache(maxsize=256)
def _owners(costs: tuple[float, ...], world: int) -> tuple[int, ...]:
    return tuple(assign_owners(costs, world))


def exchange_floats(p: Piece, opt: Opt, partial_rows: bool) -> int:
    """Floats ``p`` adds to the step's all-reduce (0 if none): `Estimator.partial_sums`."""
    stats, mode = estimator_key(p, opt)
    if stats == "cross_sample":
        if mode == "diagonal":
            return 2 + numel(p.shape)  # [M, W, sum of squares over the whole parameter]
        r = tracker_dims(p, opt)[1]
        return r + 3 + (r + 1 if p.row_sharded else 0)
    if mode == "subspace" and partial_rows:
        return 2 * tracker_dims(p, opt)[1] + 2
    return 0


def refresh_floats(p: Piece, opt: Opt) -> tuple[int, int]:
    """``(partials summed to the owner, solution broadcast)`` floats of one refresh."""
    d, r, _ = tracker_dims(p, opt)
    cov = opt.estimator != "cross_sample" and opt.noise == "second_moment"
    return d * r + (2 * r * r if cov else 0), d * r + r + (r * r if cov else 0)


def step_collectives(view: RankView, opt: Opt, setup: Setup, step: int) -> dict[str, list[int]]:
    """Payload bytes of each collective call snr-dist makes on a rank at ``step`` (1-based), by
    operation, as `GroupComm` counts them (every rank counts every call it joins)."""
    out: dict[str, list[int]] = defaultdict(list)
    w = view.group_world
    if opt.name != "snr" or w == 1 or view.distributor == "local":
        return {}
    limit = int(setup.bucket_mb * 2**20)
    partial_rows = view.distributor in ("sharded", "zero")
    own = owners(view, opt)
    owner_of = {id(p): o for p, o in zip([p for p in view.pieces if tracks(p, opt)], own)}
    for call in range(view.calls):
        pieces = [p for p in view.pieces if p.call == call]
        if not pieces:
            continue
        cut = view.cut_elems[call] if view.cut_elems else 0
        if cut:
            out["all_reduce"] += _buckets([2 * cut * F32], limit)
        if partial_rows and opt.skip_nonfinite:  # the NaN/Inf agreement, one float each
            out["all_reduce"] += _buckets([len(pieces) * F32], limit)
        order = _by_estimator(pieces, opt)
        vecs = [exchange_floats(p, opt, partial_rows) * F32 for p in order]
        out["all_reduce"] += _buckets(vecs, limit)
        jobs = [p for p in order if tracks(p, opt) and refresh_due(step, opt.refresh_every)]
        by_owner: dict[int, list[Piece]] = defaultdict(list)  # each owner's jobs, in job order
        for p in jobs:
            by_owner[owner_of[id(p)]].append(p)
        for o in sorted(by_owner) if partial_rows else ():  # owners 0, 1, ... in turn
            out["reduce"] += _buckets([refresh_floats(p, opt)[0] * F32 for p in by_owner[o]], limit)
        for o in sorted(by_owner):
            out["broadcast"] += _buckets(
                [refresh_floats(p, opt)[1] * F32 for p in by_owner[o]], limit
            )
        if cut:
            out["all_reduce"] += _buckets([cut * F32], limit)
    return dict(out)


# ---------------------------------------------------------------------------- work and time


@dataclass(frozen=True)
class Rates:
    """Assumed hardware rates (an H100 SXM node; none of them measured here)."""

    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0
    """NVLink, GB/s each way per GPU (the 900 GB/s usually quoted counts both directions)."""
    net_gbits: float = 400.0
    """Inter-node network, Gb/s each way per GPU (one 400G NIC per GPU)."""
    latency_us: float = 20.0
    """Fixed cost of one collective call."""
    hbm_tbs: float = 3.35
    fp32_tflops: float = 67.0
    """fp32 without tensor cores: the statistics' matmuls (torch's default, no TF32)."""
    fp64_tflops: float = 34.0
    """The refresh's Nystrom solve runs in float64."""
    bf16_tflops: float = 989.0
    mfu: float = 0.4
    """Model flops utilisation of the forward and backward passes (for the context column)."""
    tokens: int = 8192
    """Tokens per data-parallel replica per step (for the context column)."""
    grad_bytes: int = 2
    """Bytes per gradient element on the wire (bf16)."""
    param_bytes: int = 2
    """Bytes per parameter element all-gathered by FSDP2 and ZeRO (bf16)."""

    def link(self, setup: Setup) -> float:
        """Bytes per second each way for the data-parallel group: NVLink inside one node, the
        network once the job spans nodes (Megatron's TP groups stay inside a node)."""
        if setup.world <= self.gpus_per_node:
            return self.nvlink_gbs * 1e9
        return self.net_gbits / 8 * 1e9


PASSES = {"adamw": 7, "snr": 9}
"""Passes over the fp32 elements a step must read or write (`benchmarks/step_floor.py`'s
floors): AdamW reads p, g, m, v and writes p, m, v; SNRAdamW adds two (diagonal: its state
vector read and written; subspace: the gradient and the update direction read once more)."""
ROW_SHARD_PASSES = 7
"""A ZeRO row-shard step's copies (`ZeroView._fill`, `_write_back`): values read and written,
a gradient buffer zeroed, the gradient read and written, the new values read and written."""


def wire_factor(op: str, g: int) -> float:
    """Bytes each rank sends per payload byte: a ring all-reduce sends ``2 (g - 1) / g``;
    a pipelined reduce or broadcast passes the payload on once."""
    if g <= 1:
        return 0.0
    return 2 * (g - 1) / g if op == "all_reduce" else 1.0


def amortised(view: RankView, opt: Opt, setup: Setup) -> dict[str, tuple[float, float]]:
    """Steady-state ``{op: (payload bytes, calls)}`` per step: a step without refresh plus the
    refresh step's extra divided by ``refresh_every``."""
    k = opt.refresh_every
    plain = step_collectives(view, opt, setup, 2 * k + 1)
    full = step_collectives(view, opt, setup, 2 * k)
    out = {}
    for op in OPS:
        a, b = plain.get(op, []), full.get(op, [])
        out[op] = (
            sum(a) + (sum(b) - sum(a)) / k,
            len(a) + (len(b) - len(a)) / k,
        )
    return out


def comm_seconds(per_op: dict[str, tuple[float, float]], setup: Setup, rates: Rates) -> float:
    g = setup.dp
    t = 0.0
    for op, (nbytes, calls) in per_op.items():
        t += nbytes * wire_factor(op, g) / rates.link(setup) + calls * rates.latency_us * 1e-6
    return t


def wire_bytes(per_op: dict[str, tuple[float, float]], setup: Setup) -> float:
    return sum(b * wire_factor(op, setup.dp) for op, (b, _) in per_op.items())


def parallelism_wire(setup: Setup, n_global: int, n_rank: int, rates: Rates) -> float:
    """Bytes each rank sends per step for the parallelism itself, whatever the optimizer:
    DDP all-reduces the gradient; ZeRO 1/2 reduce-scatter it and all-gather the new
    parameters; FSDP2 and ZeRO-3 also gather the parameters for the forward and again for the
    backward; Megatron all-reduces each TP slice's gradient over its data-parallel group (its
    TP traffic moves activations and is left out)."""
    g = setup.dp
    if g <= 1:
        return 0.0
    part = (g - 1) / g
    gb, pb = rates.grad_bytes, rates.param_bytes
    return {
        "ddp": 2 * part * n_global * gb,
        "fsdp2": part * n_global * (gb + 2 * pb),
        "zero1": part * n_global * (gb + pb),
        "zero2": part * n_global * (gb + pb),
        "zero3": part * n_global * (gb + 2 * pb),
        "megatron": 2 * part * n_rank * gb,
    }[setup.strategy]


def step_flops(view: RankView, opt: Opt) -> float:
    """The trackers' matmuls per step on this rank: the projection and sketch of the gradient
    and the gate's projection and reconstruction, ``2 r`` flops per element each
    (`snr_dist.subspace`); cross-sample also projects each backward pass's whole gradient in
    its hook, and on row shards the applied gradient once more."""
    f = 0.0
    for p in view.pieces:
        if not tracks(p, opt):
            continue
        r = tracker_dims(p, opt)[1]
        f += 8 * r * p.local
        if opt.estimator == "cross_sample":
            f += 2 * r * numel(p.shape) * opt.micro_batches + (
                2 * r * p.local if p.row_sharded else 0
            )
    return f


def refresh_flops(p: Piece, opt: Opt) -> tuple[float, float]:
    """``(owner's solve, every holder's apply)`` flops of one refresh. The solve
    (`snr_dist.subspace._nystrom_basis`, float64): ``Q^T Y``, a QR of ``Y`` with its ``Q``,
    ``Q1^T Y``, ``Q1 V``: ``10 d r^2``, and two ``r x r`` eigendecompositions with their
    products, counted as ``25 r^3``. The apply: the rotation ``Q_new^T Q_old`` (``2 d r^2``)
    and, for the temporal rules, the mean re-projected on the new basis (``2 r`` per
    element held); the second-moment rule's ``r x r`` products on top."""
    d, r, o = tracker_dims(p, opt)
    solve = 10 * d * r * r + 25 * r**3
    apply = 2 * d * r * r
    if opt.estimator != "cross_sample":
        apply += 2 * r * p.local
        if opt.noise == "second_moment":
            apply += 4 * r * r * o
    return float(solve), float(apply)


def refresh_seconds(view: RankView, opt: Opt, rates: Rates) -> tuple[float, float]:
    """``(seconds of one refresh's compute on the critical path, max/mean of the owners'
    solve work)``: the busiest owner's solves (the others wait at its broadcast) plus this
    rank's applies."""
    tracked = [p for p in view.pieces if tracks(p, opt)]
    if not tracked:
        return 0.0, 1.0
    flops = [refresh_flops(p, opt) for p in tracked]
    solves = [s for s, _ in flops]
    own = owners(view, opt)
    loads = rank_loads(solves, own, view.group_world)
    busiest = max(loads)
    t = busiest / (rates.fp64_tflops * 1e12) + sum(a for _, a in flops) / (rates.fp32_tflops * 1e12)
    return t, balance_ratio(solves, own, view.group_world)


@dataclass
class Cost:
    """One optimizer under one setup: per-rank numbers (state: the rank holding the most)."""

    state: dict[str, int]
    shard_copies: int
    elements: int
    per_op: dict[str, tuple[float, float]]
    wire: float
    comm_s: float
    hbm_s: float
    flops_s: float
    refresh_s: float
    solve_balance: float

    @property
    def state_total(self) -> int:
        return sum(self.state.values())

    @property
    def replicated(self) -> int:
        return sum(v for k, v in self.state.items() if k in REPLICATED_KEYS)

    @property
    def time_s(self) -> float:
        return self.hbm_s + self.flops_s + self.comm_s + self.refresh_s


def cost(shapes: list, setup: Setup, opt: Opt, rates: Rates) -> Cost:
    rank, state = max_state(shapes, setup, opt)
    view = rank_view(shapes, setup, rank, opt)
    per_op = amortised(view, opt, setup)
    elements = sum(p.local for p in view.pieces)
    hbm = PASSES[opt.name] * F32 * elements
    copies = view.shard_copies if opt.needs_rows else 0
    hbm += ROW_SHARD_PASSES * F32 * copies
    refresh_s, balance = refresh_seconds(view, opt, rates) if opt.name == "snr" else (0.0, 1.0)
    return Cost(
        state=state,
        shard_copies=copies * F32,
        elements=elements,
        per_op=per_op,
        wire=wire_bytes(per_op, setup),
        comm_s=comm_seconds(per_op, setup, rates),
        hbm_s=hbm / (rates.hbm_tbs * 1e12),
        flops_s=step_flops(view, opt) / (rates.fp32_tflops * 1e12),
        refresh_s=refresh_s / opt.refresh_every,
        solve_balance=balance,
    )


def setup_shapes(model: Llama, setup: Setup) -> list:
    if setup.strategy == "megatron":
        return megatron_shapes(model, setup.tp)
    return llama_shapes(model)


# ---------------------------------------------------------------------------- measured


CHECK_MODEL = Llama("check", d_model=40, layers=2, ffn=99, heads=4, kv_heads=2, vocab=251)
"""The measured model: Llama's structure at sizes whose ZeRO partitions cut rows (odd row
counts) and whose narrow k/v matrices hold fewer rows than the rank asked for."""
CHECK_TP_MODEL = replace(CHECK_MODEL, label="check-tp", ffn=98)
"""The Megatron check: an even MLP width, which tensor parallelism needs."""
CHECK_SUB_GROUP = 6000
"""A ZeRO-3 ``sub_group_size`` that splits the check model into sub-groups (one optimizer
call each), as the default 1e9 splits the 70B model once its partitions pass 1e9 elements."""
CHECK_RANK = 24
CHECK_STEPS = 5
CHECK_REFRESH = 4  # refreshes at steps 1, 2 and 4 of 5: both kinds of step are measured
CHECK_SEQ, CHECK_BATCH = 8, 2


def llama_module(m: Llama):
    """A trainable torch module with exactly `llama_shapes` (m) as its parameters."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, hd = m.d_model, m.head_dim
            self.q = nn.Linear(d, m.heads * hd, bias=False)
            self.k = nn.Linear(d, m.kv_heads * hd, bias=False)
            self.v = nn.Linear(d, m.kv_heads * hd, bias=False)
            self.o = nn.Linear(m.heads * hd, d, bias=False)
            self.gate = nn.Linear(d, m.ffn, bias=False)
            self.up = nn.Linear(d, m.ffn, bias=False)
            self.down = nn.Linear(m.ffn, d, bias=False)
            self.attn_norm = nn.RMSNorm(d)
            self.mlp_norm = nn.RMSNorm(d)

        def forward(self, x):
            b, t, _ = x.shape
            h = self.attn_norm(x)
            q = self.q(h).view(b, t, m.heads, -1).transpose(1, 2)
            k, v = (f(h).view(b, t, m.kv_heads, -1).transpose(1, 2) for f in (self.k, self.v))
            rep = m.heads // m.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
            h = self.mlp_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(m.vocab, m.d_model)
            self.layers = nn.ModuleList(Block() for _ in range(m.layers))
            self.norm = nn.RMSNorm(m.d_model)
            if not m.tied:
                self.lm_head = nn.Linear(m.d_model, m.vocab, bias=False)

        def forward(self, idx):
            x = self.embed(idx)
            for layer in self.layers:
                x = layer(x)
            x = self.norm(x)
            return x @ self.embed.weight.T if m.tied else self.lm_head(x)

    torch.manual_seed(0)
    return Decoder(), Block


CHECK_CASES: dict[int, list[tuple[str, Opt]]] = {}
"""World size -> the ``(strategy, optimizer)`` cases measured with that many ranks."""


def _check_opts() -> dict[str, Opt]:
    sub = Opt(mode="subspace", rank=CHECK_RANK, refresh_every=CHECK_REFRESH)
    return {
        "adamw": Opt(name="adamw"),
        "diag": Opt(),
        "sub": sub,
        "sub2": replace(sub, noise="second_moment"),
        "xsub": replace(sub, estimator="cross_sample"),
        "xdiag": Opt(estimator="cross_sample"),
    }


def _cases() -> dict[int, list[tuple[str, Opt]]]:
    o = _check_opts()
    two = [("ddp", o[k]) for k in ("adamw", "diag", "sub", "sub2", "xsub", "xdiag")]
    two += [("fsdp2", o[k]) for k in ("adamw", "diag", "sub", "xsub", "xdiag")]
    two += [("zero1", o[k]) for k in ("diag", "sub")]
    two += [("zero2", o[k]) for k in ("adamw", "sub", "sub2", "xsub", "xdiag")]
    two += [("zero3", o[k]) for k in ("adamw", "diag", "sub", "xsub")]
    two += [(f"zero3-sub{CHECK_SUB_GROUP}", o[k]) for k in ("diag", "sub")]
    two += [("megatron-tp1", o[k]) for k in ("diag", "sub")]
    four = [("ddp", o["sub"]), ("fsdp2", o["sub"]), ("fsdp2", o["xsub"])]
    four += [("zero2", o["diag"]), ("zero2", o["sub"]), ("zero3", o["sub"]), ("zero3", o["xsub"])]
    four += [("megatron-tp2", o["sub"])]
    return {2: two, 4: four}


def check_setup(strategy: str, world: int) -> tuple[Setup, list]:
    """The `Setup` and the model shapes of a measured case."""
    if strategy.startswith("megatron"):
        tp = int(strategy.removeprefix("megatron-tp"))
        return Setup("megatron", world, tp=tp), megatron_shapes(CHECK_TP_MODEL, tp)
    if "-sub" in strategy:
        stage, size = strategy.split("-sub")
        return Setup(stage, world, sub_group_size=int(size)), llama_shapes(CHECK_MODEL)
    return Setup(strategy, world), llama_shapes(CHECK_MODEL)


def _snr_kwargs(opt: Opt) -> dict:
    return dict(
        mode=opt.mode,
        estimator=opt.estimator,
        noise=opt.noise,
        rank=opt.rank,
        refresh_every=opt.refresh_every,
        basis_side=opt.basis_side,
        snr_beta=opt.snr_beta,
    )


def _measure(rank: int, world: int, strategy: str, opt: Opt) -> dict:
    """Train the check model ``CHECK_STEPS`` steps on this rank; return what was counted."""
    import os

    import torch
    import torch.distributed as dist

    from snr_dist import SNRAdamW

    if strategy.startswith("megatron"):
        return _measure_megatron(rank, world, strategy, opt)
    model, block = llama_module(CHECK_MODEL)
    grad_counter = {"bytes": 0}
    engine = None
    if strategy == "ddp":
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:  # comm_bytes, the sibling benchmark
            sys.path.insert(0, here)
        from comm_bytes import _counting_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model)
        net.register_comm_hook(None, _counting_hook(grad_counter))
        if opt.name == "adamw":
            optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            optim = SNRAdamW(
                model.parameters(), lr=1e-3, process_group=dist.group.WORLD, **_snr_kwargs(opt)
            )
    elif strategy == "fsdp2":
        from snr_dist import fsdp

        if opt.name == "adamw":
            from torch.distributed.fsdp import fully_shard

            for m in model.modules():
                if isinstance(m, block):
                    fully_shard(m)
            net = fully_shard(model)
            optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            net, optim = fsdp.wrap(model, modules=block, lr=1e-3, **_snr_kwargs(opt))
    else:
        os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank))
        os.environ["WORLD_SIZE"] = str(world)
        setup = check_setup(strategy, world)[0]
        zero = {"stage": int(setup.strategy[-1])}
        if setup.strategy == "zero3":
            zero["sub_group_size"] = setup.sub_group_size
        cfg = {
            "train_micro_batch_size_per_gpu": CHECK_BATCH,
            "gradient_accumulation_steps": 1,
            "train_batch_size": CHECK_BATCH * world,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": zero,
            "gradient_clipping": 0.0,
            "steps_per_print": 10**9,
        }
        import logging

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)  # its per-engine warnings
        if opt.name == "adamw":
            import deepspeed

            del cfg["optimizer"]
            cfg["zero_allow_untested_optimizer"] = True
            client = torch.optim.AdamW(model.parameters(), lr=1e-3)
            engine, optim, _, _ = deepspeed.initialize(model=model, optimizer=client, config=cfg)
        else:
            from snr_dist import deepspeed as snr_ds

            cfg["snr_preconditioner"] = _snr_kwargs(opt)
            engine, optim, _, _ = snr_ds.initialize(model=model, config=cfg)
        net = engine
    base = getattr(optim, "optimizer", optim)  # DeepSpeed's wrapper holds the client optimizer
    view = getattr(base, "zero_view", None)
    comm = base.distributor.comm if isinstance(base, SNRAdamW) else None
    gen = torch.Generator().manual_seed(1 + rank)
    steps = []
    for _ in range(CHECK_STEPS):
        idx = torch.randint(0, CHECK_MODEL.vocab, (CHECK_BATCH, CHECK_SEQ + 1), generator=gen)
        logits = net(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, CHECK_MODEL.vocab), idx[:, 1:].reshape(-1)
        )
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            optim.zero_grad()
            loss.backward()
            optim.step()
        steps.append(
            {op: (comm.bytes.get(op, 0), comm.calls.get(op, 0)) for op in OPS} if comm else {}
        )
    holder = view.inner if view is not None else base
    out = _counted(holder, steps, base.distributor if comm else None)
    out["grad_bytes"] = grad_counter["bytes"] / CHECK_STEPS
    if view is not None:
        pieces = [p for b in view.buckets for p in b.pieces]
        out["cut_rows"] = sum(len(p.cuts) for p in pieces)
        out["shard_copies"] = sum(p.shard.numel() for p in pieces)
    if engine is not None:
        engine.destroy()
    return out


OPS = ("all_reduce", "reduce", "broadcast")


def _counted(optim, steps: list[dict], distributor) -> dict:
    """State bytes by key (this rank's part of DTensors), the comm snapshots, the trackers'
    costs and owners in the optimizer's order."""
    import torch

    from snr_dist.distributors.dtensor import local

    by_key: dict[str, int] = defaultdict(int)
    for st in optim.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                t = local(v)
                by_key[k] += t.numel() * t.element_size()
    return {
        "steps": steps,
        "state": dict(by_key),
        "grad_bytes": 0.0,
        "costs": list(distributor.costs.values()) if distributor else [],
        "owners": list(distributor.owners.values()) if distributor else [],
        "cut_rows": None,
        "shard_copies": None,
    }


def _measure_megatron(rank: int, world: int, strategy: str, opt: Opt) -> dict:
    """megatron-core's GPTModel with the check model's sizes, its param groups and optimizer
    wrapper (`snr_dist.megatron`); gradients are random TP slices (its forward needs CUDA)."""
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    from snr_dist.megatron import get_megatron_snr_optimizer

    tp = int(strategy.removeprefix("megatron-tp"))
    m = CHECK_TP_MODEL
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=m.layers,
        hidden_size=m.d_model,
        num_attention_heads=m.heads,
        num_query_groups=m.kv_heads,
        ffn_hidden_size=m.ffn,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        normalization="RMSNorm",
        use_cpu_initialization=True,
    )
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=megatron_vocab(m.vocab, tp),  # Megatron's training script pads it
        max_sequence_length=CHECK_SEQ,
        position_embedding_type="rope",
        share_embeddings_and_output_weights=m.tied,
    )
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.01, clip_grad=0.0)
    snr = {k: v for k, v in _snr_kwargs(opt).items() if k != "basis_side"}
    wrapper = get_megatron_snr_optimizer(config, [model], snr=snr).chained_optimizers[0]
    inner = wrapper.optimizer
    comm = inner.distributor.comm
    gen = torch.Generator().manual_seed(1 + rank)
    steps = []
    for _ in range(CHECK_STEPS):
        for p in model.parameters():
            p.main_grad = torch.randn(p.shape, generator=gen)
        wrapper.prepare_grads()
        wrapper.step_with_ready_grads()
        steps.append({op: (comm.bytes.get(op, 0), comm.calls.get(op, 0)) for op in OPS})
    out = _counted(inner, steps, inner.distributor)
    ps.destroy_model_parallel()
    return out


def _check_worker(rank: int, world: int, cases: list[tuple[str, Opt]]) -> list[dict]:
    return [_measure(rank, world, s, o) for s, o in cases]


def predict(world: int, rank: int, strategy: str, opt: Opt, steps: int = CHECK_STEPS) -> dict:
    """The model's numbers for one measured case, in `_measure`'s format."""
    setup, shapes = check_setup(strategy, world)
    view = rank_view(shapes, setup, rank, opt)
    cum: dict[str, list[int]] = {op: [0, 0] for op in OPS}
    out_steps = []
    for t in range(1, steps + 1):
        for op, sizes in step_collectives(view, opt, setup, t).items():
            cum[op][0] += sum(sizes)
            cum[op][1] += len(sizes)
        out_steps.append({op: tuple(v) for op, v in cum.items()} if opt.name == "snr" else {})
    snr = opt.name == "snr"
    zero_rows = strategy.startswith("zero") and opt.needs_rows
    return {
        "steps": out_steps,
        "state": state_bytes(view, opt),
        "grad_bytes": float(sum(numel(s) for _, s in llama_shapes(CHECK_MODEL)) * F32)
        if strategy == "ddp"
        else 0.0,
        "costs": tracker_costs(view, opt) if snr else [],
        "owners": owners(view, opt) if snr else [],
        "cut_rows": view.cut_rows if zero_rows else None,
        "shard_copies": view.shard_copies if zero_rows else None,
    }


def _spawn(world: int, cases: list[tuple[str, Opt]]) -> list[list[dict]]:
    """Run ``cases`` on ``world`` gloo processes; per rank, the list of `_measure` results."""
    import io
    import queue

    import torch
    import torch.multiprocessing as mp

    from snr_dist.distributors.ports import free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_spawned, args=(r, world, port, cases, out), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, list[dict]] = {}
    try:
        while len(results) < world:
            try:
                r, status, payload = out.get(timeout=2)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"a measuring rank died (exit codes {dead})") from None
                continue
            if status != "ok":
                raise RuntimeError(f"rank {r} failed:\n{payload}")
            results[r] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _spawned(rank: int, world: int, port: int, cases, out) -> None:
    import io
    import os
    import traceback

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        buf = io.BytesIO()
        torch.save(_check_worker(rank, world, cases), buf)
        out.put((rank, "ok", buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- tables


def table_opts(rank: int, refresh_every: int) -> dict[str, Opt]:
    sub = Opt(mode="subspace", rank=rank, refresh_every=refresh_every)
    return {
        "adamw": Opt(name="adamw"),
        "diag": Opt(refresh_every=refresh_every),
        "sub": sub,
        "xsub": replace(sub, estimator="cross_sample"),
        "xdiag": Opt(estimator="cross_sample", refresh_every=refresh_every),
    }


def table_setups(world: int, tp: int) -> list[Setup]:
    out = [Setup(s, world) for s in ("ddp", "fsdp2", "zero1", "zero2", "zero3")]
    return out + [Setup("megatron", world, tp=min(tp, world))]


def _b(n: float) -> str:
    """Bytes in decimal units, three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{_g(n / size)} {unit}"
    return f"{n:.0f} B"


def _g(x: float) -> str:
    """Three significant digits, never an exponent."""
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:.{digits}f}"


def _ms(s: float) -> str:
    return _g(s * 1e3)


def _pct(a: float, b: float) -> str:
    return f"{_g(100 * a / b)}%" if b else "-"


def _flop(f: float) -> str:
    return f"{_g(f / 1e12)} TFLOP" if f >= 1e12 else f"{_g(f / 1e9)} GFLOP"


def compute(models: list[Llama], worlds: list[int], args, rates: Rates) -> dict:
    """Every cost the tables show: ``{(model, world, setup label): {opt key: Cost}}``."""
    opts = table_opts(args.rank, args.refresh_every)
    out = {}
    for m in models:
        for w in worlds:
            for setup in table_setups(w, args.tp):
                shapes = setup_shapes(m, setup)
                out[(m.label, w, setup.label)] = {
                    "setup": setup,
                    "n_global": sum(numel(sh) for _, sh in llama_shapes(m)),
                    "n_rank": sum(numel(x[1]) for x in shapes),
                    **{k: cost(shapes, setup, o, rates) for k, o in opts.items()},
                }
    return out


def report(models: list[Llama], worlds: list[int], args, rates: Rates) -> str:
    costs = compute(models, worlds, args, rates)
    r = args.rank
    lines: list[str] = [
        "Assumed (not measured): "
        + ", ".join(f"{k}={v}" for k, v in vars(rates).items())
        + f"; subspace rank {r}, refresh_every {args.refresh_every}, Megatron TP{args.tp}.",
        "",
    ]
    for m in models:
        rows = [(w, c) for (label, w, _), c in costs.items() if label == m.label]
        n = rows[0][1]["n_global"]
        lines += [
            f"### {m.label}: d_model {m.d_model}, {m.layers} layers, ffn {m.ffn}, {m.heads} heads "
            f"({m.kv_heads} KV), vocab {m.vocab}{', tied embeddings' if m.tied else ''}: "
            f"{n / 1e9:.2f}B parameters",
            "",
            "Optimizer state per rank (the rank holding the most):",
            "",
            f"| parallelism | ranks | AdamW | SNRAdamW diagonal | diagonal / AdamW "
            f"| SNRAdamW subspace r={r} | subspace / AdamW | of it, replicated tracker state "
            "| ZeRO row-shard copies |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w, c in rows:
            a, d, s = c["adamw"], c["diag"], c["sub"]
            adamw = _b(a.state_total)
            if c["setup"].strategy == "megatron" and c["setup"].dp > 1:  # moments over DP
                adamw += f" ({_b(2 * F32 * c['n_rank'] / c['setup'].dp)} distributed)"
            lines.append(
                f"| {c['setup'].label} | {w} | {adamw} | {_b(d.state_total)} "
                f"| {d.state_total / a.state_total:.2f}x "
                f"| {_b(s.state_total)} | {s.state_total / a.state_total:.2f}x "
                f"| {_b(s.replicated)} | {_b(s.shard_copies) if s.shard_copies else '-'} |"
            )
        lines += [
            "",
            "Bytes each rank sends per step (refreshes amortised over "
            f"refresh_every={args.refresh_every}):",
            "",
            "| parallelism | ranks | the parallelism's own | SNRAdamW diagonal "
            f"| SNRAdamW subspace r={r} | % of own | subspace cross-sample | % of own "
            "| diagonal cross-sample | % of own |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for w, c in rows:
            own = parallelism_wire(c["setup"], c["n_global"], c["n_rank"], rates)
            cells = []
            for k in ("sub", "xsub", "xdiag"):
                if c["setup"].strategy == "megatron" and k != "sub":
                    cells += ["refused", "-"]
                    continue
                cells += [_b(c[k].wire), _pct(c[k].wire, own)]
            lines.append(
                f"| {c['setup'].label} | {w} | {_b(own)} | {_b(c['diag'].wire)} | "
                + " | ".join(cells)
                + " |"
            )
        lines += [
            "",
            "Time per step per rank, ms (SNRAdamW columns: time added to AdamW's; the "
            "subspace split into its extra memory passes, tracker matmuls, collectives and "
            "amortised refresh compute):",
            "",
            "| parallelism | ranks | AdamW step | its parallelism's comm | SNRAdamW diagonal "
            f"| SNRAdamW subspace r={r} | = passes + matmuls + comm + refresh "
            "| subspace / (AdamW step + comm) | subspace / forward+backward |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for w, c in rows:
            setup = c["setup"]
            a, d, s = c["adamw"], c["diag"], c["sub"]
            own_s = parallelism_wire(setup, c["n_global"], c["n_rank"], rates) / rates.link(setup)
            fb = 6 * c["n_rank"] * rates.tokens / (rates.bf16_tflops * 1e12 * rates.mfu)
            d_add = d.time_s - a.time_s
            s_hbm = s.hbm_s - a.hbm_s
            s_add = s.time_s - a.time_s
            lines.append(
                f"| {setup.label} | {w} | {_ms(a.hbm_s)} | {_ms(own_s)} | {_ms(d_add)} "
                f"| {_ms(s_add)} | {_ms(s_hbm)} + {_ms(s.flops_s)} + {_ms(s.comm_s)} + "
                f"{_ms(s.refresh_s)} | {_pct(s_add, a.time_s + own_s)} | {_pct(s_add, fb)} |"
            )
        lines.append("")
    lines += refresh_table(models, worlds, args, rates)
    return "\n".join(lines)


def refresh_table(models: list[Llama], worlds: list[int], args, rates: Rates) -> list[str]:
    """Tracker ownership (`assign_owners` on each model's real matrices) and what one refresh
    costs: the busiest owner's solve, every rank's apply, the bytes, and per step."""
    opt = Opt(mode="subspace", rank=args.rank, refresh_every=args.refresh_every)
    lines = [
        f"Refreshes (subspace r={args.rank}, every {args.refresh_every} steps) and tracker "
        "ownership, longest job first (`snr_dist.distributors.assign_owners` on the real list "
        "of matrices; cost = elements x rank, as the optimizer counts it). Solve: the busiest "
        "owner's float64 flops; apply: fp32 flops on every rank; bytes: sent per rank for one "
        "refresh:",
        "",
        "| model | parallelism | ranks | trackers | data-parallel ranks | LPT max/mean "
        "| ranks owning none | solve max/mean | busiest solve | apply per rank | bytes "
        "| ms per refresh | ms per step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = (("DDP", "ddp"), ("FSDP2, ZeRO", "fsdp2"), (f"Megatron TP{args.tp}", "megatron"))
    for m in models:
        for label, strategy in groups:
            for w in worlds:
                setup = Setup(strategy, w, tp=min(args.tp, w))
                view = rank_view(setup_shapes(m, setup), setup, 0, opt)
                costs = tracker_costs(view, opt)
                g = max(view.group_world, 1)
                own = owners(view, opt)
                tracked = [p for p in view.pieces if tracks(p, opt)]
                flops = [refresh_flops(p, opt) for p in tracked]
                solves = [f for f, _ in flops]
                busiest = max(rank_loads(solves, own, g))
                apply = sum(a for _, a in flops)
                at_refresh = step_collectives(view, opt, setup, 2 * opt.refresh_every)
                extra = {  # a refresh step's reduces and broadcasts (its all-reduce is any step's)
                    op: (sum(v), len(v)) for op, v in at_refresh.items() if op != "all_reduce"
                }
                sent = wire_bytes(extra, setup)
                t = refresh_seconds(view, opt, rates)[0] + comm_seconds(extra, setup, rates)
                lines.append(
                    f"| {m.label} | {label} | {w} | {len(costs)} | {setup.dp} "
                    f"| {balance_ratio(costs, own, g):.3f} | {g - len(set(own))} "
                    f"| {balance_ratio(solves, own, g):.3f} | {_flop(busiest)} "
                    f"| {_flop(apply)} | {_b(sent)} | {_ms(t)} "
                    f"| {_ms(t / opt.refresh_every)} |"
                )
    return lines


# ---------------------------------------------------------------------------- check


def check_lines() -> tuple[list[str], bool]:
    """Run every case of `_cases` on real ranks; model and measurement side by side."""
    ok = True
    lines = [
        "| ranks | parallelism | optimizer | quantity | model | measured | equal |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for world, cases in _cases().items():
        measured = _spawn(world, cases)
        for i, (strategy, opt) in enumerate(cases):
            got = [measured[r][i] for r in range(world)]
            want = [predict(world, r, strategy, opt) for r in range(world)]
            label = check_setup(strategy, world)[0].label
            for quantity, m_val, g_val in _compare(got, want, opt, strategy):
                same = m_val == g_val
                ok &= same
                lines.append(
                    f"| {world} | {label} | {opt.label} | {quantity} | {m_val} | {g_val} "
                    f"| {'yes' if same else '**NO**'} |"
                )
    return lines, ok


def _per_rank(values: list) -> str:
    return " / ".join(f"{v:,}" for v in values)


def _compare(got: list[dict], want: list[dict], opt: Opt, strategy: str):
    """``(quantity, model, measured)`` rows of one case. Every rank is compared, state key by
    key and collectives after every step; a difference hidden by a total shows in the
    measured cell."""
    keys_same = all(g["state"] == w["state"] for g, w in zip(got, want))
    yield (
        "state bytes per rank (every key equal)",
        _per_rank(sum(w["state"].values()) for w in want),
        _per_rank(sum(g["state"].values()) for g in got) + ("" if keys_same else " (keys differ)"),
    )
    if opt.name == "snr":
        steps_same = all(g["steps"] == w["steps"] for g, w in zip(got, want))
        yield (
            f"all_reduce / reduce / broadcast bytes (calls), {CHECK_STEPS} steps (each step equal)",
            _collectives(want[0]["steps"][-1]),
            _collectives(got[0]["steps"][-1]) + ("" if steps_same else " (steps differ)"),
        )
        if want[0]["costs"] or got[0]["costs"]:
            same = all(g["owners"] == got[0]["owners"] for g in got) and all(
                g["costs"] == w["costs"] for g, w in zip(got, want)
            )
            yield (
                "trackers' owners (and costs equal)",
                " ".join(map(str, want[0]["owners"])),
                " ".join(map(str, got[0]["owners"])) + ("" if same else " (costs differ)"),
            )
    if want[0]["cut_rows"] is not None:
        yield (
            "rows cut by partitions; row-shard elements per rank",
            f"{want[0]['cut_rows']}; " + _per_rank(w["shard_copies"] for w in want),
            f"{got[0]['cut_rows']}; " + _per_rank(g["shard_copies"] for g in got),
        )
    if strategy == "ddp":
        yield (
            "DDP gradient bytes per step",
            f"{want[0]['grad_bytes']:,.0f}",
            f"{got[0]['grad_bytes']:,.0f}",
        )


def _collectives(counts: dict[str, tuple[int, int]]) -> str:
    return " / ".join("{:,} ({})".format(*counts.get(op, (0, 0))) for op in OPS)


def meta_costs_lines(models: list[Llama], worlds: list[int], rank: int) -> tuple[list[str], bool]:
    """The trackers' costs a real SNRAdamW computes for each model's real shapes (parameters
    on the meta device: shapes without memory) against the model's, and the balance
    `assign_owners` gives both."""
    import torch

    from snr_dist import SNRAdamW

    ok = True
    lines = [
        "| model | trackers (model / SNRAdamW) | costs equal | "
        + " | ".join(f"LPT max/mean, {w} ranks (model / SNRAdamW)" for w in worlds)
        + " |",
        "|---|---:|---|" + "---:|" * len(worlds),
    ]
    opt = Opt(mode="subspace", rank=rank)
    for m in models:
        shapes = llama_shapes(m)
        params = [torch.nn.Parameter(torch.empty(sh, device="meta")) for _, sh in shapes]
        real = list(SNRAdamW(params, mode="subspace", rank=rank).distributor.costs.values())
        ours = tracker_costs(rank_view(shapes, Setup("ddp", 1), 0, opt), opt)
        cells = []
        for w in worlds:
            a = balance_ratio(ours, assign_owners(ours, w), w)
            b = balance_ratio(real, assign_owners(real, w), w)
            ok &= a == b
            cells.append(f"{a:.3f} / {b:.3f}")
        ok &= ours == real
        lines.append(
            f"| {m.label} | {len(ours)} / {len(real)} | {'yes' if ours == real else '**NO**'} | "
            + " | ".join(cells)
            + " |"
        )
    return lines, ok


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="1B,8B,70B", help="of " + ", ".join(MODELS))
    ap.add_argument("--world", default="8,64,512,1024", help="rank counts")
    ap.add_argument("--rank", type=int, default=32, help="subspace rank")
    ap.add_argument("--refresh-every", type=int, default=50)
    ap.add_argument("--tp", type=int, default=8, help="Megatron's tensor-parallel size")
    ap.add_argument("--check", action="store_true", help="model vs measured on 2 and 4 ranks")
    for f in Rates.__dataclass_fields__.values():
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rates = Rates(**{f: getattr(args, f) for f in Rates.__dataclass_fields__})
    models = [MODELS[k] for k in args.models.split(",")]
    worlds = [int(w) for w in args.world.split(",")]
    if args.check:
        started = time.perf_counter()
        m, t = CHECK_MODEL, CHECK_TP_MODEL
        print(
            f"Measured model: d_model {m.d_model}, {m.layers} layers, ffn {m.ffn} (Megatron: "
            f"{t.ffn}), {m.heads} heads ({m.kv_heads} KV), vocab {m.vocab}; subspace rank "
            f"{CHECK_RANK}, refresh_every {CHECK_REFRESH}, {CHECK_STEPS} steps, "
            f"{CHECK_BATCH} x {CHECK_SEQ} tokens per rank per step.\n"
        )
        lines, ok = check_lines()
        print("\n".join(lines))
        print()
        more, ok2 = meta_costs_lines(list(MODELS.values()), [8, 64, 512, 1024], args.rank)
        print("\n".join(more))
        print()
        print("every byte equal" if ok and ok2 else "DIFFERENCES: see the rows marked **NO**")
        print(f"(checked in {time.perf_counter() - started:.0f} s)")
        return 0 if ok and ok2 else 1
    print(report(models, worlds, args, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
