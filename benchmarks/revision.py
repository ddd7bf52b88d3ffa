"""Import the ``snr_dist`` package of another git revision beside the current one.

Benchmarks compare two versions of the optimizer in one interleaved run (the machines are
noisy, so separate runs are not comparable): ``package_at("b673a1b")`` extracts that
revision's ``snr_dist/`` with ``git archive`` into a temporary folder, renames it
``snr_dist_<sha>`` (rewriting its own imports) and imports it.
"""

from __future__ import annotations

import importlib
import io
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def package_at(rev: str) -> ModuleType:
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    name = f"snr_dist_{sha}"
    if name in sys.modules:
        return sys.modules[name]
    archive = subprocess.run(
        ["git", "archive", "--format=tar", sha, "snr_dist"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    dest = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "snr_dist").rename(dest / name)
    pattern = re.compile(r"\bsnr_dist\b(?=[.\s]|$)")
    for path in (dest / name).rglob("*.py"):
        path.write_text(pattern.sub(name, path.read_text()))
    sys.path.insert(0, str(dest))
    return importlib.import_module(name)
