"""The Dockerfile (no Docker engine here: parsed and checked) and the launch scripts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# what `make` installs with; `make constraints` points it at an empty file to try the newest
CONSTRAINTS = Path(os.environ.get("SNR_DIST_CONSTRAINTS", ROOT / "constraints.txt"))
INSTRUCTIONS = {
    "FROM",
    "ENV",
    "WORKDIR",
    "COPY",
    "RUN",
    "ENTRYPOINT",
    "CMD",
    "ARG",
    "LABEL",
    "EXPOSE",
    "USER",
    "VOLUME",
    "SHELL",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def test_dockerfile_is_well_formed_pinned_and_complete():
    steps = parse_dockerfile((ROOT / "Dockerfile").read_text())
    assert all(word in INSTRUCTIONS for word, _ in steps), steps
    assert steps[0][0] == "FROM"
    image = steps[0][1]
    assert re.fullmatch(r"pytorch/pytorch:\d+\.\d+\.\d+-cuda[\d.]+-cudnn\d+-runtime", image), image
    for word, args in steps:
        if word == "COPY":
            for src in args.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert ".[deepspeed,triton" in runs and "--constraint" in runs
    assert "constraints.txt" in runs  # the versions the suite passed with (issue 32)
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry == ["torchrun"]
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd[cmd.index("-m") + 1] == "snr_dist.cli" and "train" in cmd


def test_the_image_runs_the_installed_package_not_a_source_copy():
    """torchrun -m snr_dist.cli from the working directory imports a snr_dist/ folder there
    before the installed wheel, and the source tree has no snr_dist.triton_kernels (the wheel
    maps it from kernels/): the image must not leave the package's sources in WORKDIR, and the
    build checks that the Triton kernels import."""
    steps = parse_dockerfile((ROOT / "Dockerfile").read_text())
    workdir = dict(steps)["WORKDIR"]
    for word, args in steps:
        if word == "COPY":
            *srcs, dest = args.split()
            dest = dest if dest.startswith("/") else f"{workdir}/{dest}"
            if "snr_dist" in srcs or "kernels" in srcs:
                assert not dest.rstrip("/").startswith(workdir), (srcs, dest)
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "import snr_dist, snr_dist.triton_kernels" in runs


def test_launch_scripts_parse_and_document_their_environment():
    for name in ("torchrun.sh", "multinode.sh", "slurm.sbatch"):
        script = ROOT / "launch" / name
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = (ROOT / "launch" / "multinode.sh").read_text()
    for var in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        assert var in text
    missing = subprocess.run(
        ["bash", str(ROOT / "launch" / "multinode.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert missing.returncode != 0 and "NNODES" in missing.stderr


# ---------------------------------------------------------------------- the wheel's modules
def _package_dirs() -> dict[str, Path]:
    """Installed package -> its source folder, from pyproject's setuptools settings."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = cfg.get("package-dir", {})
    listed = cfg["packages"]
    if isinstance(listed, dict):  # packages.find
        listed = [
            ".".join(init.parent.relative_to(ROOT).parts)
            for pattern in listed["find"]["include"]
            for init in sorted((ROOT / pattern.rstrip("*").rstrip(".")).rglob("__init__.py"))
        ]
    out = {}
    for name in listed:  # the longest mapped prefix decides the folder (setuptools' rule)
        prefix = max(
            (m for m in mapped if name == m or name.startswith(m + ".")), key=len, default=""
        )
        rest = name[len(prefix) :].lstrip(".").replace(".", "/")
        out[name] = (ROOT / mapped[prefix] / rest) if prefix else ROOT / name.replace(".", "/")
    return out


def test_pyproject_lists_every_package_of_the_source_tree():
    """The package list is explicit (for the kernels/ mapping): a new subpackage must be added."""
    listed = _package_dirs()
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "snr_dist").rglob("__init__.py")
    }
    assert on_disk <= set(listed), sorted(on_disk - set(listed))
    for name, folder in listed.items():
        if name.startswith("snr_dist.configs"):  # data-only folders of bundled configs
            assert folder.is_dir() and any(folder.iterdir()), (name, folder)
            continue
        assert (folder / "__init__.py").is_file(), (name, folder)


def test_no_top_level_folder_of_the_checkout_is_a_regular_package_but_snr_dist():
    """A regular package at the checkout's root is importable by its folder's name wherever the
    root is on ``sys.path`` (a script there, ``python -m`` there, ``PYTHONPATH=.``) and hides an
    installed distribution of that name: ``kernels/__init__.py`` hid Hugging Face's ``kernels``,
    which transformers 5.25 imports (issue 32). Namespace folders lose to installed packages."""
    regular = sorted(
        p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "snr_dist"
    )
    # kernels/ and configs/ (PyPI has both names) are plain folders; what installs from them
    # (kernels/triton_kernels, configs' data) is mapped into snr_dist by pyproject.toml
    assert not regular, regular


def test_the_docker_image_copies_every_folder_the_wheel_installs():
    """b673a1b's image never copied kernels/, so it installed without the Triton kernels."""
    steps = parse_dockerfile((ROOT / "Dockerfile").read_text())
    copied = {
        (ROOT / src).resolve()
        for word, args in steps
        if word == "COPY"
        for src in args.split()[:-1]
    }
    for name, folder in _package_dirs().items():
        assert any(folder.resolve().is_relative_to(c) for c in copied), (
            f"the Dockerfile does not COPY {folder.relative_to(ROOT)} (package {name})"
        )


def _build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources (setuptools writes build/ next to pyproject.toml)."""
    src = _sources(tmp)
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip, "-w", str(tmp), str(src)], check=True, capture_output=True)
    (wheel,) = tmp.glob("snr_dist-*.whl")
    return wheel


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_module_beside_pypis_kernels_package(tmp_path):
    """Hugging Face's ``kernels`` (used by transformers and diffusers) and snr-dist in one
    venv: both import, neither overwrites the other (b673a1b installed a top-level
    ``kernels`` package of its own)."""
    import sysconfig
    import zipfile

    wheel = _build_wheel(tmp_path)
    tops = {
        n.split("/")[0]
        for n in zipfile.ZipFile(wheel).namelist()
        if not n.split("/")[0].endswith((".dist-info", ".data"))
    }
    assert tops == {"snr_dist"}, tops
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # PyPI's kernels with its own dependencies, then snr-dist without its (torch and the
    # rest come from this interpreter's site-packages, appended below: no second torch)
    subprocess.run(
        [*pip, "--constraint", str(CONSTRAINTS), "kernels"], check=True, capture_output=True
    )
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_host_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import os, kernels, snr_dist, snr_dist.triton_kernels as tk\n"
        "from snr_dist.kernels import triton_available\n"
        "assert hasattr(kernels, 'kernelize'), kernels.__file__\n"
        f"assert kernels.__file__.startswith({str(site)!r}), kernels.__file__\n"
        f"assert snr_dist.__file__.startswith({str(site)!r}), snr_dist.__file__\n"
        "assert hasattr(tk, 'fused_snr_adamw_step') and triton_available()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ""}
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _sources(tmp: Path) -> Path:
    """A copy of what the build reads (the build writes build/ and *.egg-info beside it)."""
    import shutil

    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in {p.relative_to(ROOT).parts[0] for p in _package_dirs().values()}:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return src


@pytest.mark.slow
def test_sdist_and_wheel_install_into_a_fresh_venv_and_run_the_quickstart(tmp_path):
    """`python -m build` (sdist, then the wheel built from it), installed into a fresh venv,
    runs `snr-dist train --config quickstart` from an empty directory: the configs ship inside
    the package and are found by name. `pip check` is clean."""
    import sysconfig
    import tarfile
    import zipfile

    pytest.importorskip("build", reason="the dev extra (python -m build) is not installed")
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(_sources(tmp_path)),
        ],
        check=True,
        capture_output=True,
    )
    (sdist,) = dist.glob("snr_dist-*.tar.gz")
    (wheel,) = dist.glob("snr_dist-*.whl")
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    assert any(m.endswith("configs/quickstart.yaml") for m in members)
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in ("quickstart.yaml", "experiments/label_noise.yaml", "deepspeed/zero3_subspace.json"):
        assert f"snr_dist/configs/{cfg}" in names, cfg
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    # snr-dist without its dependencies (torch and the rest come from this interpreter's
    # site-packages, appended below: no second torch is downloaded)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    # the venv's own old setuptools would shadow the host's, which torch requires to be newer
    subprocess.run([py, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "zz_host_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            str(venv / "bin" / "snr-dist"),
            "train",
            "--config",
            "quickstart",
            "--set",
            "train.epochs=2",
            "--set",
            "train.seeds=[0]",
            "--set",
            "model.hidden=[16]",
            "--no-progress",
            "--output-dir",
            "runs",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "runs" / "quickstart" / "report.md").is_file()
    probe = "import snr_dist, snr_dist.bundled as b; print(snr_dist.__file__, b.root())"
    where = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, cwd=work)
    assert str(site) in where.stdout.split()[0] and str(site) in where.stdout.split()[1]
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout + check.stderr
