"""Launch helpers shared by the kernels: interpreter detection, dtypes, device limits."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreted(fn) -> bool:
    """Whether ``fn`` (a jit function) runs in Triton's CPU interpreter: it was decorated while
    ``TRITON_INTERPRET=1``. The interpreter ignores launch tuning, and its ``tl.dot`` gets
    16-bit inputs wrong (triton 3.9), so interpreted launches take fixed blocks and fp32 dots."""
    return isinstance(fn, InterpretedFunction)


def next_pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def ieee_fp32() -> bool:
    """fp32 dots follow torch's matmul precision setting: IEEE unless the user allowed TF32."""
    return torch.get_float32_matmul_precision() == "highest"


@functools.cache
def arch(device_index: int) -> tuple[int, int, int]:
    """``(major, minor, shared memory bytes per block)`` of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device_index)
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return major, minor, int(props["max_shared_mem"])


def hopper(device: torch.device) -> bool:
    return device.type == "cuda" and arch(device.index or 0)[0] >= 9


def smem_limit(device: torch.device) -> int:
    return arch(device.index or 0)[2]
