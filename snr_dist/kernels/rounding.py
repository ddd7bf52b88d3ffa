"""Stochastic rounding of float32 values to bfloat16, reproducible from a seed.

State kept in bfloat16 (``state_dtype="bfloat16"``) is an EMA: each step moves it by a small
fraction of the gap to the new value (``1 - beta``: 10% for Adam's first moment, 1% for the SNR
statistics' ``snr_beta = 0.99``). Rounded to nearest, a move smaller than half a bfloat16 ulp
(2^-9 of the value) is lost, and an EMA whose input stays within a few percent of it stops
moving: a bias. Rounded stochastically (up with probability equal to the distance to the lower
neighbour, in ulps), the stored value is unbiased, ``E[round(x)] = x``, and the EMA is the
float32 one plus zero-mean noise.

How: add a uniform 16-bit integer ``r`` to the float32 bit pattern and clear its low 16 bits
(the bfloat16 is then exact). ``r`` is not drawn from a global RNG: it is a hash of ``(seed,
tensor key, step, element index)`` (`salt`, `random_bits`), so a run reproduces bit for bit,
every rank of a replicated state draws the same bits, and how the step is split into chunks or
pieces changes nothing. The hash is integer arithmetic in int64 on values below 2^32 with
multipliers below 2^31, so nothing overflows.
"""

from __future__ import annotations

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # the multiplier of a well-mixing 32-bit integer hash (Mueller's), < 2^31
_KEEP_HIGH = -65536  # int32 0xFFFF0000: the bits a bfloat16 keeps
_index: dict[torch.device, Tensor] = {}


def mix32(h: int) -> int:
    """The 32-bit hash of `random_bits`, on a Python integer."""
    h &= MASK32
    h = ((h >> 16) ^ h) * _MUL & MASK32
    h = ((h >> 16) ^ h) * _MUL & MASK32
    return (h >> 16) ^ h


def salt(seed: int, key: int, step: int) -> int:
    """A 32-bit value that differs from tensor to tensor and from step to step."""
    return mix32(mix32(mix32(seed) ^ key) ^ step)


def _arange(n: int, device: torch.device) -> Tensor:
    """``0 .. n-1`` as int64, from a buffer kept per device."""
    buf = _index.get(device)
    if buf is None or buf.numel() < n:
        buf = _index[device] = torch.arange(max(n, 1 << 16), dtype=torch.int64, device=device)
    return buf[:n]


def random_bits(n: int, salt_: int, offset: int, device: torch.device) -> Tensor:
    """32 random bits (int64 in ``[0, 2^32)``) for elements ``offset .. offset + n - 1`` of a
    tensor: the hash of ``salt + index``."""
    h = torch.add(_arange(n, device), (salt_ + offset) & MASK32)
    h.bitwise_and_(MASK32)
    for _ in range(2):
        h.bitwise_xor_(h >> 16).mul_(_MUL).bitwise_and_(MASK32)
    return h.bitwise_xor_(h >> 16)


def halves(bits: Tensor, count: int) -> list[Tensor]:
    """``count`` int32 tensors of 16 random bits each from `random_bits`' output (two per 32
    bits; more are hashed from it again)."""
    out: list[Tensor] = []
    while True:
        out.append(torch.bitwise_and(bits, 0xFFFF).to(torch.int32))
        if len(out) == count:
            return out
        out.append((bits >> 16).to(torch.int32))
        if len(out) == count:
            return out
        bits = bits.bitwise_xor(0x9E3779B9)
        for _ in range(2):
            bits.bitwise_xor_(bits >> 16).mul_(_MUL).bitwise_and_(MASK32)
        bits.bitwise_xor_(bits >> 16)


def round_into_(out: Tensor, value: Tensor, r: Tensor) -> None:
    """``out`` (bfloat16) <- ``value`` (contiguous float32) rounded stochastically with the
    16-bit integers ``r`` (int32, as `halves` gives them). NaN and infinities stay as they
    are (a NaN whose payload fills its top bits could wrap: none that arithmetic produces)."""
    b = torch.add(value.view(torch.int32), r.view(value.shape))
    b.bitwise_and_(_KEEP_HIGH)
    out.copy_(b.view(torch.float32))  # exact: the low bits are clear


def stochastic_round(value: Tensor, seed: int, key: int, step: int, offset: int = 0) -> Tensor:
    """``value`` (float32) as bfloat16, rounded stochastically with the bits of ``(seed, key,
    step)`` for elements ``offset ..`` (the readable form; the optimizer rounds several
    tensors of one parameter with one hash, `halves`)."""
    value = value.contiguous()
    out = torch.empty(value.shape, dtype=torch.bfloat16, device=value.device)
    bits = random_bits(value.numel(), salt(seed, key, step), offset, value.device)
    round_into_(out, value, halves(bits, 1)[0])
    return out
