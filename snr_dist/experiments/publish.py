"""Copy the studies' tables and pictures into ``docs/results.md`` (so the page shows exactly
what the commands produced).

``python -m snr_dist.experiments.publish [runs/experiments] [docs]`` replaces, for every study
folder with a ``report.md``, the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
in ``docs/results.md`` with that report's tables (and the derived numbers), and copies its
``curves.png`` to ``docs/results/NAME.png`` (and ``gates.png``, the per-layer gate traces, to
``docs/results/NAME-gates.png`` when the study recorded them). Hand-written text outside the
markers is kept.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path


def report_body(report: str) -> str:
    """The report without its title, picture and method list (results.md has its own)."""
    body = report.split("\n", 1)[1]
    body = body.split("![curves](curves.png)")[0]
    return re.sub(r"^## ", "#### ", body.strip(), flags=re.M)


def publish(runs: Path, docs: Path) -> list[str]:
    page = docs / "results.md"
    text = page.read_text()
    done = []
    for report in sorted(runs.glob("*/report.md")):
        name = report.parent.name
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if begin not in text:
            continue
        (docs / "results").mkdir(exist_ok=True)
        shutil.copyfile(report.parent / "curves.png", docs / "results" / f"{name}.png")
        pictures = f"![{name}](results/{name}.png)"
        if "(gates.png)" in report.read_text():  # the report shows per-layer gate traces
            shutil.copyfile(report.parent / "gates.png", docs / "results" / f"{name}-gates.png")
            pictures += f"\n\n![{name} gate traces](results/{name}-gates.png)"
        block = f"{begin}\n{report_body(report.read_text())}\n\n{pictures}\n{end}"
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + block + text[stop:]
        done.append(name)
    page.write_text(text)
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = Path(args[0] if args else "runs/experiments")
    docs = Path(args[1] if len(args) > 1 else "docs")
    done = publish(runs, docs)
    print(f"updated {docs / 'results.md'}: {', '.join(done) or 'nothing'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
