"""The configs that ship with snr-dist, found by name when no such file exists.

The repository's ``configs/`` folder installs inside the package (``snr_dist/configs`` in a
wheel; in an editable install it stays at the repository root), so a pip-installed
``snr-dist train --config quickstart`` or ``snr-dist experiment label_noise`` works from any
directory. A path that exists always wins over a bundled name.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def root() -> Path:
    """The bundled configs folder (the wheel's copy, else the checkout's)."""
    for candidate in (_HERE / "configs", _HERE.parent / "configs"):
        if (candidate / "quickstart.yaml").is_file():
            return candidate
    raise FileNotFoundError("snr-dist's bundled configs are missing (a broken install?)")


def names(folder: str = "", suffix: str = ".yaml") -> list[str]:
    """Bundled config names in ``folder`` (``""``, ``"experiments"``, ``"deepspeed"``, ...)."""
    try:
        base = root() / folder
    except FileNotFoundError:
        return []
    return sorted(p.stem for p in base.glob(f"*{suffix}"))


def resolve(given: str | Path, folder: str = "", suffix: str = ".yaml") -> Path:
    """``given`` if it is a file, else the bundled ``folder/given[.suffix]`` if it exists,
    else ``given`` unchanged (the caller's "not found" names it)."""
    path = Path(given)
    if path.is_file():
        return path
    name = path.name if path.suffix else f"{path.name}{suffix}"
    try:
        candidate = root() / folder / name
    except FileNotFoundError:
        return path
    if candidate.is_file() and (len(path.parts) == 1 or path.parts[0] == "configs"):
        return candidate
    return path
