"""Copy the studies' tables and pictures into the results pages (so each page shows exactly
what the commands produced).

``python -m snr_dist.experiments.publish [runs/experiments] [docs]`` replaces, for every study
folder with a ``report.md``, the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``
in whichever page holds that pair (``docs/results.md``, the verdict page, or one of the study
pages ``docs/results/*.md``; a pair must be in one page only) with that report's tables (and
the derived numbers) and the pictures it shows. Every picture the report shows, a line
``![...](FILE.png)``, is copied from the study folder to ``docs/results/``: ``curves.png`` as
``NAME.png``, any other as ``NAME-FILE.png`` (``gates.png``, the per-layer gate traces, as
``NAME-gates.png``; the horizon study's ``horizon.png``, ``frontier.png`` and ``monitor.png``
as ``NAME-horizon.png`` and so on), and linked relative to the page that holds the markers.
A picture in the folder that the report does not show (left by an earlier run) is not copied;
one it shows that the study did not write is left out. Hand-written text outside the markers
is kept.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

# a picture of the study folder on a line of its own: ![alt](file.png)
PICTURE = re.compile(r"^!\[([^\]\n]*)\]\(([^)\s/]+\.png)\)[ \t]*$", re.M)


def report_body(report: str) -> str:
    """The report without its title, its own picture lines and the method list that follows
    them (the results pages have their own): cut at ``![curves](curves.png)``, or, in a report
    without it (the horizon study's starts with ``![horizons](horizon.png)``), at its first
    picture line. Its ``##`` headings become ``####``."""
    body = report.split("\n", 1)[1]
    if "![curves](curves.png)" in body:
        body = body.split("![curves](curves.png)")[0]
    elif first := PICTURE.search(body):
        body = body[: first.start()]
    return re.sub(r"^## ", "#### ", body.strip(), flags=re.M)


def picture_name(name: str, file: str) -> str:
    """Where a study's picture goes in ``docs/results/``: ``NAME.png`` for its curves (the
    names the pages already link), ``NAME-FILE.png`` for any other."""
    return f"{name}.png" if file == "curves.png" else f"{name}-{file}"


def picture_alt(name: str, alt: str, file: str) -> str:
    if file == "curves.png":
        return name
    if file == "gates.png":
        return f"{name} gate traces"
    return f"{name} {alt}".strip()


def pages(docs: Path) -> list[Path]:
    """The pages that may hold a study's markers: the verdict page, then the study pages."""
    return [p for p in [docs / "results.md"] if p.exists()] + sorted(
        (docs / "results").glob("*.md")
    )


def publish(runs: Path, docs: Path) -> list[str]:
    """Publish every study report under ``runs`` whose markers a page under ``docs`` holds;
    return the studies' names."""
    texts = {page: page.read_text() for page in pages(docs)}
    changed: set[Path] = set()
    done = []
    for report in sorted(runs.glob("*/report.md")):
        name = report.parent.name
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        holders = [page for page, text in texts.items() if begin in text]
        if not holders:
            continue
        if len(holders) > 1:
            raise ValueError(f"{begin} is in {len(holders)} pages: {holders}")
        page = holders[0]
        text = report.read_text()
        body = report_body(text)
        shown = []
        seen = set()
        for alt, file in PICTURE.findall(text):
            source = report.parent / file
            if file in seen or not source.exists():
                continue
            seen.add(file)
            (docs / "results").mkdir(exist_ok=True)
            target = docs / "results" / picture_name(name, file)
            shutil.copyfile(source, target)
            link = Path(os.path.relpath(target, page.parent)).as_posix()
            if f"]({file})" in body:  # a picture inside the tables keeps its place
                body = body.replace(f"]({file})", f"]({link})")
            else:
                shown.append(f"![{picture_alt(name, alt, file)}]({link})")
        pictures = "".join(f"\n\n{line}" for line in shown)
        block = f"{begin}\n{body}{pictures}\n{end}"
        start, stop = texts[page].index(begin), texts[page].index(end) + len(end)
        texts[page] = texts[page][:start] + block + texts[page][stop:]
        changed.add(page)
        done.append(name)
    for page in changed:
        page.write_text(texts[page])
    return done


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = Path(args[0] if args else "runs/experiments")
    docs = Path(args[1] if len(args) > 1 else "docs")
    done = publish(runs, docs)
    where = f"{docs / 'results.md'} and {docs / 'results'}/*.md"
    print(f"updated {where}: {', '.join(done) or 'nothing'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
