"""``torch.sqrt`` of an Adam second moment that holds zeros, plain and raised to the floor.

On the CPU torch hands ``sqrt`` of a contiguous fp32 tensor to MKL's VML, whose high-accuracy
path treats zero (and subnormal) inputs as special values and handles every 16-float vector
that holds one on a slow path. `snr_dist.optim.moment_sqrt` raises ``v`` to the smallest normal
number first (an extra cheap pass) where at least 2% of it is below that. This benchmark times,
in interleaved rounds, the plain ``torch.sqrt(v)`` against ``clamp_min(v, tiny).sqrt_()`` on
tensors of the digits MLP's largest size and of 1M entries, with no zeros, zeros scattered
(1% and 12%: pixels blank in every image), zeros in whole rows (12%: dead units) and only
zeros, and prints the medians, their ratio (raised / plain) and whether `MomentSqrt` takes the
floor there.

    python benchmarks/moment_sqrt.py
    python benchmarks/moment_sqrt.py --rounds 200 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from snr_dist.optim.moment_sqrt import MomentSqrt

TINY = torch.finfo(torch.float32).tiny


def patterns(n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Second moments of ``n`` entries (rows of 256) with zeros laid out as training leaves
    them."""
    base = torch.rand(n, generator=gen) * 1e-4 + 1e-12
    out = {"no zeros": base}
    for share in (0.01, 0.12):
        v = base.clone()
        v[torch.rand(n, generator=gen) < share] = 0.0
        out[f"{share:.0%} scattered"] = v
    rows = base.clone().view(-1, 256)
    rows[torch.rand(rows.shape[0], generator=gen) < 0.12] = 0.0
    out["12% whole rows"] = rows.view(-1)
    out["all zero"] = torch.zeros(n)
    return out


def paired(v: torch.Tensor, rounds: int) -> tuple[float, float, float]:
    """Median microseconds of the plain and the raised sqrt, and the median per-round ratio."""
    out = torch.empty_like(v)
    plain = lambda: torch.sqrt(v, out=out)  # noqa: E731
    raised = lambda: torch.clamp_min(v, TINY, out=out).sqrt_()  # noqa: E731
    for _ in range(5):
        plain(), raised()
    t_plain, t_raised = [], []
    for r in range(rounds):
        for f, ts in (
            ((plain, t_plain), (raised, t_raised))
            if r % 2
            else (
                (raised, t_raised),
                (plain, t_plain),
            )
        ):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    ratio = statistics.median(b / a for a, b in zip(t_plain, t_raised))
    return 1e6 * statistics.median(t_plain), 1e6 * statistics.median(t_raised), ratio


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=400, help="interleaved rounds per row")
    ap.add_argument("--sizes", type=int, nargs="+", default=[65_536, 1_048_576])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(
        f"torch.sqrt of fp32 second moments, {args.threads} thread(s), MKL: "
        f"{torch.backends.mkl.is_available()}\n"
    )
    print("| entries | zeros | plain sqrt (us) | raised (us) | raised / plain | floor taken |")
    print("|---:|---|---:|---:|---:|---|")
    rows = []
    for n in args.sizes:
        for name, v in patterns(n, gen).items():
            t_plain, t_raised, ratio = paired(v, args.rounds)
            taken = MomentSqrt()._floor(torch.zeros(()), v, 1e-8, 1.0) is not None
            rows.append(
                dict(
                    entries=n,
                    zeros=name,
                    plain_us=t_plain,
                    raised_us=t_raised,
                    ratio=ratio,
                    floor_taken=taken,
                )
            )
            print(
                f"| {n:,} | {name} | {t_plain:.1f} | {t_raised:.1f} | {ratio:.2f}x | "
                f"{'yes' if taken else 'no'} |"
            )
    return rows


if __name__ == "__main__":
    main()
