"""DeepSpeed ZeRO 1-3 (and its bf16 optimizer) for the estimators that need whole rows.

ZeRO hands the client optimizer one flat fp32 partition per param group (stages 1 and 2, and
DeepSpeed's bf16 optimizer) or per sub-group (stage 3): slices that cut across tensors, so
per-matrix statistics on them would be wrong. But a subspace tracker (basis on the column
side) and the cross-sample estimator only need *whole rows*: their statistics are sums over
rows. So this view gives every rank, for every parameter, the rows whose first element its
partition holds (a row shard, possibly empty) and runs an inner `SNRAdamW` on those shards
with the `zero` distributor (`snr_dist.distributors.zero`). Each step that DeepSpeed asks for:

1. the partition's gradient and values are copied into the row shards; a row cut by a
   partition boundary is completed by one all-reduce of the cut rows (gradient and values,
   ``2n`` floats per cut row of length ``n``);
2. the inner step runs: estimators, the step's one all-reduce of statistics, refreshes;
3. the shards are written back into the partition, and the new values of the cut rows reach
   every rank holding a piece of them through one more all-reduce (``n`` floats per cut row).

A stage 1/2 boundary cuts at most one row (of one parameter) per rank; stage 3 partitions
every parameter, so up to ``world - 1`` rows of each. Cross-sample statistics need each rank's
own micro-batch gradients: tensor hooks on the model's parameters see them before they are
accumulated, and so before ZeRO's reduction hooks (which run after accumulation), and report
them under the row shard (`MicrobatchCapture.attach_proxies`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from snr_dist.distributors.dtensor import mark_row_shard


@dataclass
class _Piece:
    """One model parameter as one bucket (flat partition) holds it on this rank."""

    lp: Tensor
    shape: tuple[int, ...]
    n: int
    """Row length (elements per row of the ``(rows, n)`` view)."""
    start: int
    """First element of the flattened parameter this rank holds."""
    count: int
    hp_offset: int
    """Where ``start`` sits in the flat partition."""
    first: int = 0
    last: int = 0
    """This rank owns rows ``[first, last)``: those whose first element it holds."""
    cuts: list[int] = field(default_factory=list)
    """Rows cut by a partition boundary (the same list on every rank)."""
    cut_offset: int = 0
    """Element offset of this parameter's cut rows in its bucket's exchange buffer."""
    shard: Tensor | None = None


@dataclass
class _Bucket:
    flat: Tensor
    group: int
    pieces: list[_Piece]
    cut_elems: int = 0


def _row_view(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0] if len(shape) else 1
    return rows, (math.prod(shape[1:]) if len(shape) > 1 else 1)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def discover(zero_opt) -> list[tuple[Tensor, int, list[tuple[Tensor, int, int, int]]]]:
    """``[(flat partition, param group, [(model param, start, count, hp_offset)])]`` read from
    DeepSpeed's ZeRO stage 1/2, stage 3 or bf16 optimizer."""
    out = []
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # stage 3
        rank = dist.get_rank(group=zero_opt.dp_process_group)
        for sub, (flat, lps) in enumerate(
            zip(zero_opt.fp32_partitioned_groups_flat, zero_opt.fp16_groups)
        ):
            entries = []
            for lp in lps:
                _, offset, _ = zero_opt.grad_position[zero_opt.get_param_id(lp)]
                size = lp.partition_numel()
                start = rank * size
                count = max(0, min(size, lp.ds_numel - start))
                entries.append((lp, min(start, lp.ds_numel), count, offset))
            out.append((flat, zero_opt.sub_group_to_group_id[sub], entries))
        return out
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):  # stage 1, 2
        flats, lp_groups = zero_opt.single_partition_of_fp32_groups, zero_opt.bit16_groups
    elif hasattr(zero_opt, "fp32_groups_flat_partition"):  # bf16 optimizer
        flats, lp_groups = zero_opt.fp32_groups_flat_partition, zero_opt.bf16_groups
    else:
        raise TypeError(
            f"snr-dist does not know DeepSpeed's {type(zero_opt).__name__}: it reads the "
            "partitions of DeepSpeedZeroOptimizer (stages 1, 2), DeepSpeedZeroOptimizer_Stage3 "
            "and BF16_Optimizer"
        )
    for i, (flat, lps) in enumerate(zip(flats, lp_groups)):
        entries = []
        for lp in lps:
            m = getattr(lp, "_hp_mapping", None)
            if m is None:
                entries.append((lp, 0, 0, 0))
            else:
                lp_a, hp_a = m.lp_fragment_address, m.hp_fragment_address
                entries.append((lp, int(lp_a.start), int(lp_a.numel), int(hp_a.start)))
        out.append((flat, i, entries))
    return out


def per_tensor_copies(wrapper) -> list[tuple[Tensor, Tensor]] | None:
    """``[(model param, fp32 copy)]`` when DeepSpeed's wrapper keeps one whole fp32 copy per
    tensor (its unfused fp16/bf16 optimizer, used for bf16 at stage 0), else None. Those copies
    have their shapes, so no row shards are needed; only the per-rank gradients must be
    reported under the copies."""
    if hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
        return [
            (lp, hp)
            for lps, hps in zip(wrapper.fp16_groups, wrapper.fp32_groups)
            for lp, hp in zip(lps, hps)
        ]
    return None


def _held_pieces(buckets: list[_Bucket]):
    """``(bucket, offset in the cut-row buffer, offset in the partition, length)`` of every
    piece of a cut row this rank's partitions hold."""
    base = 0
    for bk in buckets:
        for piece in bk.pieces:
            for j, row in enumerate(piece.cuts):
                lo = max(row * piece.n, piece.start)
                hi = min((row + 1) * piece.n, piece.start + piece.count)
                if lo < hi:
                    at = base + piece.cut_offset + j * piece.n + (lo - row * piece.n)
                    yield bk, at, piece.hp_offset + (lo - piece.start), hi - lo
        base += bk.cut_elems


def shape_of(lp: Tensor) -> tuple[int, ...]:
    """The model parameter's full shape (ZeRO-3 keeps it in ``ds_shape``)."""
    return tuple(getattr(lp, "ds_shape", lp.shape))


class ZeroView:
    """Row shards of ZeRO's partitions and the inner optimizer that steps them."""

    def __init__(self, outer, zero_opt, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world = dist.get_world_size(group=group)
        found = discover(zero_opt)
        # every rank's (start, count) of every parameter: the cut rows follow from all of them
        mine = [[(s, c) for _, s, c, _ in entries] for _, _, entries in found]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine, group=group)
        self.buckets: list[_Bucket] = []
        device = found[0][0].device if found else torch.device("cpu")
        for b, (flat, gi, entries) in enumerate(found):
            pieces = []
            offset = 0
            for j, (lp, start, count, hp_offset) in enumerate(entries):
                shape = shape_of(lp)
                _, n = _row_view(shape)
                piece = _Piece(lp, shape, n, start, count, hp_offset)
                if count > 0:
                    piece.first = _ceil_div(start, n)
                    piece.last = _ceil_div(start + count, n)
                piece.cuts = sorted(
                    s // n
                    for s, c in (everyone[r][b][j] for r in range(self.world))
                    if c > 0 and s % n != 0
                )
                piece.cut_offset = offset
                offset += len(piece.cuts) * n
                local_shape = (piece.last - piece.first,) + (shape[1:] if len(shape) > 1 else ())
                shard = torch.zeros(local_shape, dtype=torch.float32, device=device)
                piece.shard = mark_row_shard(shard, shape if shape else (1,), piece.first)
                pieces.append(piece)
            self.buckets.append(_Bucket(flat, gi, pieces, offset))
        self.by_flat = {id(bk.flat): bk for bk in self.buckets}
        groups = []
        for gi, og in enumerate(outer.param_groups):
            shards = [p.shard for bk in self.buckets if bk.group == gi for p in bk.pieces]
            groups.append({**{k: v for k, v in og.items() if k != "params"}, "params": shards})
        defaults = {k: v for k, v in outer.defaults.items() if k in ("lr", "betas", "eps")}
        self.inner = type(outer)(  # SNRAdamW (or the user's subclass of it)
            groups,
            **defaults,
            skip_nonfinite=outer.skip_nonfinite,
            flush_denormals=outer.flush_denormals,
            process_group=group if self.world > 1 else None,
        )
        # the model's parameters report their per-rank gradients under their row shards
        outer._engine.close()
        pairs = [
            (p.lp, p.shard)
            for bk in self.buckets
            if outer.param_groups[bk.group]["estimator"] == "cross_sample"
            for p in bk.pieces
        ]
        self.inner._engine.capture.attach_proxies(pairs)
        self.outer = outer

    # ------------------------------------------------------------------ step
    def _sync_hyperparameters(self) -> None:
        """Schedulers drive the outer groups (the ones DeepSpeed and the user see); DeepSpeed
        may show the optimizer a sub-list of them while it steps one group."""
        for og in self.outer.param_groups:
            for flat in og["params"]:
                bk = self.by_flat.get(id(flat))
                if bk is None:
                    continue
                ig = self.inner.param_groups[bk.group]
                for k, v in og.items():
                    if k != "params":
                        ig[k] = v

    def _cut_rows(self, buckets: list[_Bucket], which: list[str]) -> Tensor:
        """All-reduce the cut rows of ``which`` ("grad", "value") from every holder's pieces."""
        total = sum(bk.cut_elems for bk in buckets)
        buf = torch.zeros(len(which) * total, dtype=torch.float32, device=self._device())
        if total == 0:
            return buf
        for bk, at, src, size in _held_pieces(buckets):
            sources = {"grad": bk.flat.grad, "value": bk.flat.detach()}
            for w, name in enumerate(which):
                buf[w * total + at : w * total + at + size].copy_(sources[name][src : src + size])
        if self.world > 1:
            self.inner.distributor.comm.all_reduce_([buf])  # counted with the statistics
        return buf

    def _device(self) -> torch.device:
        return self.buckets[0].flat.device if self.buckets else torch.device("cpu")

    @staticmethod
    def _owned(piece: _Piece) -> tuple[int, int]:
        """``(elements of the shard read from this rank's partition, where they start in it)``."""
        own = min(piece.start + piece.count, piece.last * piece.n) - piece.first * piece.n
        return max(own, 0), piece.hp_offset + piece.first * piece.n - piece.start

    def _fill(self, buckets: list[_Bucket], cut: Tensor, total: int) -> None:
        """Row shards' values and gradients from the partitions and the completed cut rows."""
        base = 0
        for bk in buckets:
            grad = bk.flat.grad
            for piece in bk.pieces:
                shard = piece.shard
                flat_v = shard.view(-1)
                g = torch.zeros_like(shard)
                flat_g = g.view(-1)
                own, at = self._owned(piece)
                flat_v[:own].copy_(bk.flat.detach()[at : at + own])
                flat_g[:own].copy_(grad[at : at + own])
                if own < flat_v.numel():  # the last owned row is cut: the rest comes from peers
                    row = piece.last - 1
                    j = piece.cuts.index(row)
                    src = base + piece.cut_offset + j * piece.n
                    rest = flat_v.numel() - own
                    start = src + piece.n - rest
                    flat_g[own:].copy_(cut[start : start + rest])
                    flat_v[own:].copy_(cut[total + start : total + start + rest])
                shard.grad = g
            base += bk.cut_elems

    def _write_back(self, buckets: list[_Bucket]) -> None:
        """The new values into this rank's partition, cut rows to every rank holding a piece."""
        total = sum(bk.cut_elems for bk in buckets)
        buf = torch.zeros(total, dtype=torch.float32, device=self._device())
        base = 0
        for bk in buckets:
            for piece in bk.pieces:
                own, at = self._owned(piece)
                flat_v = piece.shard.view(-1)
                bk.flat.data[at : at + own].copy_(flat_v[:own])
                if piece.last > piece.first and (piece.last - 1) in piece.cuts:
                    j = piece.cuts.index(piece.last - 1)
                    dst = base + piece.cut_offset + j * piece.n
                    buf[dst : dst + piece.n].copy_(flat_v[-piece.n :])
            base += bk.cut_elems
        if total == 0:
            return
        if self.world > 1:
            self.inner.distributor.comm.all_reduce_([buf])
        for bk, at, dst, size in _held_pieces(buckets):
            bk.flat.data[dst : dst + size].copy_(buf[at : at + size])

    @torch.no_grad()
    def step(self) -> None:
        """Step the partitions DeepSpeed put in the outer groups now (stage 3 asks one
        sub-group at a time; every rank asks for the same ones in the same order)."""
        now = [p for g in self.outer.param_groups for p in g["params"]]
        buckets = [self.by_flat[id(p)] for p in now if id(p) in self.by_flat]
        active = {id(bk) for bk in buckets}
        for bk in self.buckets:
            if id(bk) not in active:
                for piece in bk.pieces:
                    piece.shard.grad = None
        buckets = [bk for bk in buckets if bk.flat.grad is not None]
        if not buckets:
            return
        self._sync_hyperparameters()
        cut = self._cut_rows(buckets, ["grad", "value"])
        self._fill(buckets, cut, sum(bk.cut_elems for bk in buckets))
        self.inner.step()
        self._write_back(buckets)
        for bk in buckets:
            for piece in bk.pieces:
                piece.shard.grad = None

    def shard_names(self, names: dict[Tensor, str] | None) -> dict[Tensor, str] | None:
        """Metric names of the model's parameters, moved to their row shards."""
        if names is None:
            return None
        return {p.shard: names[p.lp] for bk in self.buckets for p in bk.pieces if p.lp in names}

    # ------------------------------------------------------------------ checkpoints
    def layout(self) -> dict[str, Any]:
        """What a saved state belongs to: the world size, this rank and its row ranges."""
        return {
            "world": self.world,
            "rank": self.rank,
            "rows": [[(p.first, p.last) for p in bk.pieces] for bk in self.buckets],
        }

    def resharded(self, saved: list[dict[str, Any]]) -> dict[str, Any]:
        """This rank's state dict (as `SNRAdamW.state_dict` writes it here) from the state
        dicts that every rank of another data-parallel world saved: each parameter's rows are
        joined and cut where this world cuts them (a tracker's projected mean along its
        columns, which are the rows), a tracker's partial sums over rows are summed and go
        whole to its owner here (the other ranks start from zero: only the sum over the ranks
        is ever used), and what every rank holds alike is taken from the first."""
        layouts = [sd.get("zero_layout") for sd in saved]
        if any(lay is None for lay in layouts):
            raise ValueError(
                "the optimizer states to reshard were not saved through snr-dist's row shards "
                "(no 'zero_layout'): resume from a checkpoint written by the same setup"
            )
        world = len(saved)
        if sorted(lay["rank"] for lay in layouts) != list(range(world)) or any(
            lay["world"] != world for lay in layouts
        ):
            raise ValueError(
                f"row-shard states of ranks {sorted(lay['rank'] for lay in layouts)} of "
                f"{[lay['world'] for lay in layouts]}: every saved rank's state is needed"
            )
        saved = sorted(saved, key=lambda sd: sd["zero_layout"]["rank"])
        # state dicts number the inner parameters group by group, and a group's shards bucket
        # by bucket (buckets follow the groups): the same order on every world size
        shards = [p for g in self.inner.param_groups for p in g["params"]]
        piece_of = {id(p.shard): p for bk in self.buckets for p in bk.pieces}
        old_rows = [[tuple(r) for bucket in lay["rows"] for r in bucket] for lay in layouts]
        if any(len(rows) != len(shards) for rows in old_rows):
            raise ValueError(
                f"the saved row shards hold {len(old_rows[0])} parameters, this optimizer "
                f"{len(shards)}: resume with the model and param groups that saved them"
            )
        state: dict[int, dict[str, Any]] = {}
        for k, shard in enumerate(shards):
            piece = piece_of[id(shard)]
            held = [(old_rows[r][k], saved[r]["state"].get(k, {})) for r in range(world)]
            state[k] = self._rows_state(piece, held)
        return {
            "state": state,
            "param_groups": saved[0]["param_groups"],
            "zero_layout": self.layout(),
        }

    def _rows_state(self, piece: _Piece, held: list[tuple[tuple[int, int], dict]]) -> dict:
        """One parameter's state on this rank's rows, from ``[((first, last), state)]`` of
        every saved rank (in rank order)."""
        from snr_dist.layout import Kind

        rows = _row_view(piece.shape)[0]
        spans = sorted(span for span, _ in held if span[1] > span[0])
        ends = [0] + [last for _, last in spans]
        if [first for first, _ in spans] != ends[:-1] or ends[-1] != rows:
            raise ValueError(
                f"the saved row shards of a parameter of shape {list(piece.shape)} cover rows "
                f"{spans}, not 0..{rows}: resume with the model that saved them"
            )
        keys = list(dict.fromkeys(k for _, st in held for k in st))
        kinds = self.inner.state_kinds(piece.shard, keys)
        owns = self.inner.distributor.owns(piece.shard)
        mine = piece.last - piece.first
        out = {}
        for key in keys:
            parts = [(span, st[key]) for span, st in held if key in st]
            kind = kinds.get(key, Kind.SHARED)
            first = parts[0][1]
            if not torch.is_tensor(first):
                out[key] = first
            elif kind is Kind.SHARED:
                out[key] = first.clone()
            elif kind is Kind.PARTIAL:
                total = torch.stack([v for _, v in parts]).sum(0)
                out[key] = total if owns else torch.zeros_like(total)
            else:  # PARAM: the rows themselves; COLUMNS: one column per row
                dim = 0 if kind is Kind.PARAM else -1
                ordered = sorted(parts, key=lambda part: part[0])
                whole = torch.cat([v for span, v in ordered if span[1] > span[0]], dim)
                out[key] = whole.narrow(dim, piece.first, mine).clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("zero_layout")
        if saved is None:
            raise ValueError(
                "this optimizer steps DeepSpeed ZeRO partitions through snr-dist's row shards, "
                "and the state to load was not saved that way (no 'zero_layout'): resume from "
                "a checkpoint written by the same setup (engine.save_checkpoint)"
            )
        if saved != self.layout():
            raise ValueError(
                f"the optimizer state was saved by rank {saved['rank']} of {saved['world']} "
                f"with other row shards than rank {self.rank} of {self.world} holds now: a "
                "state dict of one rank loads on the same number of data-parallel ranks and "
                "the same model and ZeRO settings; on another number of ranks load the whole "
                "checkpoint with engine.load_checkpoint (snr_dist.deepspeed.load_checkpoint), "
                "which reshards every rank's rows"
            )
        state_dict = {k: v for k, v in state_dict.items() if k != "zero_layout"}
        self.inner.load_state_dict(state_dict)
        for og, ig in zip(self.outer.param_groups, self.inner.param_groups):
            for k, v in ig.items():
                if k != "params":
                    og[k] = v
