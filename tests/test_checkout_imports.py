"""The checkout's root on ``sys.path`` (a script in the root, ``python -m`` from it,
``PYTHONPATH=.``) must not hide another distribution's top-level module.

On 9d06d09 the top-level ``kernels/`` folder was a regular package: with the root first on
``sys.path``, ``import transformers.activations`` (transformers 5.25 imports Hugging Face's
``kernels``) failed with ``cannot import name 'CUDAProperties' from 'kernels'`` (issue 32).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROBE = """
import sys
sys.path.insert(0, {root!r})
import transformers.activations
import snr_dist, snr_dist.bundled
assert snr_dist.bundled.root().is_dir()
try:
    import kernels
except ImportError:
    where = None
else:
    where = getattr(kernels, "__file__", None)
print("kernels from", where)
"""


def _site_without(tmp: Path, hidden: tuple[str, ...]) -> Path:
    """A copy of site-packages' layout (links) without the named distributions: a real
    absence, module and metadata both, without building a second environment."""
    site = Path(sysconfig.get_paths()["purelib"])
    out = tmp / "site"
    out.mkdir()
    for entry in site.iterdir():
        stem = entry.name.split("-")[0].lower()
        if entry.name in hidden or stem in hidden:
            continue
        (out / entry.name).symlink_to(entry)
    return out


@pytest.mark.parametrize("hf_kernels", ["installed", "absent"])
def test_transformers_imports_with_the_checkout_root_first_on_sys_path(tmp_path, hf_kernels):
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable]
    if hf_kernels == "absent":
        # no site: the stdlib, the link copy without kernels, then the editable install's
        # finder (its .pth is processed by site.addsitedir)
        site = _site_without(tmp_path, ("kernels",))
        boot = f"import site; site.addsitedir({str(site)!r})\n"
        cmd += ["-S", "-c", boot + _PROBE.format(root=str(ROOT))]
    else:
        pytest.importorskip("kernels", reason="Hugging Face's kernels is not installed")
        cmd += ["-c", _PROBE.format(root=str(ROOT))]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    where = out.stdout.split("kernels from", 1)[1].strip()
    if hf_kernels == "installed":
        assert "site-packages" in where, where  # Hugging Face's, not the checkout's folder
    else:
        assert not where.startswith(str(ROOT / "kernels" / "__init__")), where


def test_no_test_puts_the_checkout_root_on_pythonpath():
    """Tests run what users get: the installed package (editable or wheel), never the source
    tree through ``PYTHONPATH`` (which hid the kernels/ shadowing from every earlier run)."""
    offenders = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "PYTHONPATH" in line and ("ROOT" in line or "parents[1]" in line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert not offenders, offenders
