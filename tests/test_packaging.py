"""The Dockerfile (no Docker engine here: parsed and checked) and the launch scripts."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
    entry = json.loads(dict(steps)["ENTRYPOINT"])
    assert entry == ["torchrun"]
    cmd = json.loads(dict(steps)["CMD"])
    assert cmd[cmd.index("-m") + 1] == "snr_dist.cli" and "train" in cmd


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
