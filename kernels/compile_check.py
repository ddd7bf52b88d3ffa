"""Compile every Triton kernel for real GPU targets, on a machine without a GPU.

Triton's interpreter (``TRITON_INTERPRET=1``), which the tests run on the CPU, executes a
kernel's Python body: it does not apply the compiler's rules (globals must be constexpr,
dtypes must unify across branches, ...), so a kernel can pass every CPU test and still fail
to compile on the first GPU it meets. This script lowers each kernel, for each variant the
launchers can pick, through Triton's full CUDA pipeline (TTIR, TTGIR, LLVM IR, PTX, cubin via
the ptxas bundled with Triton) for Ampere (sm_80) and Hopper (sm_90); no driver needed.

    python kernels/compile_check.py            # exit 1 and the errors if any variant fails

Run it with ``TRITON_INTERPRET`` unset (it refuses otherwise: interpreted kernels do not
compile).
"""

from __future__ import annotations

import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check: unset TRITON_INTERPRET (interpreted kernels are not compiled)")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from snr_dist.triton_kernels import snr_adamw, subspace  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


def _variant(fn, args: dict[str, str], constexprs: dict, warps: int, stages: int):
    """``(fn, signature, constexpr values, options)`` of one compile (each variant is
    compiled for the architecture whose launch configurations it comes from)."""
    sig = {**args, **dict.fromkeys(constexprs, "constexpr")}
    names = list(sig)
    const = {(names.index(k),): v for k, v in constexprs.items()}
    return fn, sig, const, {"num_warps": warps, "num_stages": stages}


def step_variants():
    args = {"table": "*i64", "n_tensors": "i32", "n_chunks": "i32", "rows": "*fp32"}
    args["oks"] = "*fp32"
    args.update(dict.fromkeys(["w1", "beta2", "w_s", "eps", "lr", "decay", "tau"], "fp32"))
    rules = snr_adamw._RULE_ID
    cases = [  # (param dtype, grad dtype, rule, shared s, innovation, maximize, aligned)
        (tl.float32, tl.float32, "wiener", False, True, False, True),
        (tl.bfloat16, tl.bfloat16, "clamp", False, False, True, False),
        (tl.float32, tl.bfloat16, "hard", True, False, False, True),
        (tl.bfloat16, tl.float32, "paper", False, True, False, True),
        (tl.float32, tl.float32, "none", True, False, True, True),
    ]
    configs = [("sm_90", c) for c in snr_adamw.HOPPER_CONFIGS]
    configs += [("sm_80", c) for c in snr_adamw.AMPERE_CONFIGS]
    for (pdt, gdt, rule, shared, innov, maximize, aligned), (target, (block, warps)) in zip(
        cases, itertools.cycle(configs)
    ):
        const = dict(
            P_DTYPE=pdt,
            G_DTYPE=gdt,
            RULE=rules[rule],
            GATED=rule != "none",
            SHARED_S=shared,
            INNOV=innov,
            MAXIMIZE=maximize,
            ALIGNED=aligned,
            CHUNK=snr_adamw.CHUNK,
            BLOCK=block,
        )
        yield (
            f"fused step {rule} {pdt}/{gdt}",
            target,
            _variant(snr_adamw._snr_adamw_kernel, args, const, warps, 1),
        )


def _extremes(configs):
    """The smallest and the largest tile of a launcher's autotuning configs."""
    size = lambda c: (sum(c.kwargs.values()), c.num_warps, c.num_stages)  # noqa: E731
    return [min(configs, key=size), max(configs, key=size)]


def subspace_variants():
    ints = dict.fromkeys(["M", "N", "R", "sxm", "sxn", "sqn", "sqr"], "i32")
    archs = (("sm_80", False), ("sm_90", True))
    # fp32 with IEEE dots (the default), fp32 with TF32 dots, bf16 data on tensor cores
    for x_dt, ieee in (("*fp32", True), ("*fp32", False), ("*bf16", True)):
        dot_fp32 = x_dt == "*fp32"
        proj = {"x_ptr": x_dt, "q_ptr": "*fp32", "r_ptr": "*fp32", "part_ptr": "*fp32", **ints}
        recon = {"x_ptr": x_dt, "r_ptr": "*fp32", "q_ptr": "*fp32" if dot_fp32 else "*bf16"}
        recon.update({"c_ptr": "*fp32", "a_ptr": "*fp32", "y_ptr": x_dt})
        recon.update(dict.fromkeys(["M", "N", "R", "sxm", "sxn", "srm", "srr"], "i32"))
        recon.update(dict.fromkeys(["sqn", "sqr", "sym", "syn"], "i32"))
        for target, hop in archs:
            for c in _extremes(subspace._proj_configs(hop)) if ieee else []:
                const = dict(c.kwargs, BLOCK_R=32, DOT_FP32=dot_fp32, IEEE=ieee)
                yield (
                    f"project {x_dt} ieee={ieee} {c}",
                    target,
                    _variant(subspace._project_kernel, proj, const, c.num_warps, c.num_stages),
                )
            for c in _extremes(subspace._recon_configs(hop))[: 2 if ieee else 1]:
                const = dict(c.kwargs, ACCUMULATE=True, BLOCK_R=32, DOT_FP32=dot_fp32, IEEE=ieee)
                yield (
                    f"reconstruct {x_dt} ieee={ieee} {c}",
                    target,
                    _variant(subspace._reconstruct_kernel, recon, const, c.num_warps, c.num_stages),
                )
            if not ieee:  # TF32 projection: one configuration per architecture
                c = subspace._proj_configs(hop)[0]
                const = dict(c.kwargs, BLOCK_R=32, DOT_FP32=True, IEEE=False)
                yield (
                    f"project tf32 {c}",
                    target,
                    _variant(subspace._project_kernel, proj, const, c.num_warps, c.num_stages),
                )


def main() -> int:
    failures = []
    t0 = time.perf_counter()
    count = 0
    variants = itertools.chain(step_variants(), subspace_variants())
    for name, target, (fn, sig, const, options) in variants:
        count += 1
        try:
            triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=const),
                target=TARGETS[target],
                options=options,
            )
        except Exception as e:  # report them all, then fail
            lines = str(e).strip().splitlines()
            failures.append(f"{name} [{target}]: {type(e).__name__}: {lines[-1] if lines else ''}")
    took = time.perf_counter() - t0
    for f in failures:
        print("FAILED", f)
    print(f"compile_check: {count - len(failures)}/{count} kernel variants compiled ({took:.0f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
