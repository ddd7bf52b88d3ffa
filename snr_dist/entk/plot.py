"""Cumulative target energy over the ENTK eigen-index, clean vs noise, at several times."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from snr_dist.entk.spectrum import TargetSpectrum


def plot_cumulative(
    records: Sequence[TargetSpectrum | dict[str, Any]],
    path: str | Path,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """One colour per record: clean targets solid, label noise dashed, ``k90`` dotted; the
    grey diagonal is a uniformly random direction (``k / N``). Needs matplotlib (the
    ``examples`` extra); writes a PNG with the Agg backend."""
    if not records:
        raise ValueError("plot_cumulative needs at least one record")
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - the examples extra is missing
        raise ImportError("plotting needs matplotlib: pip install 'snr-dist[examples]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r.to_dict() if isinstance(r, TargetSpectrum) else r for r in records]
    if labels is None:
        labels = [f"epoch {r['epoch']}" if "epoch" in r else f"#{i}" for i, r in enumerate(recs)]
    if len(labels) != len(recs):
        raise ValueError(f"{len(labels)} labels for {len(recs)} records")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dim = recs[0]["dim"]
    ks_all = range(1, dim + 1)
    ax.plot(ks_all, [k / dim for k in ks_all], color="0.6", lw=1, label="random direction")
    for i, (rec, label) in enumerate(zip(recs, labels)):
        color = f"C{i}"
        ks = range(1, len(rec["clean_cumulative"]) + 1)
        ax.plot(ks, rec["clean_cumulative"], color=color, label=f"{label}: clean targets")
        if rec.get("noise_cumulative") is not None:
            ax.plot(ks, rec["noise_cumulative"], color=color, ls="--", label=f"{label}: noise")
        if rec.get("k90") is not None:
            ax.axvline(rec["k90"], color=color, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(1, dim)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("ENTK eigen-index k (descending eigenvalue)")
    ax.set_ylabel("energy fraction in the top-k eigenvectors")
    ax.set_title(title or "Target energy in the ENTK eigenbasis (dotted: k90)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
