"""The package's import graph: no circle, and the layers of DEVELOPERS.md.

Read from the source (``ast``), every import counted: module-level, inside functions (a lazy
import is still a dependency: ``optim/base.py`` once imported ``zero_view`` in a method, which
imported ``snr_adamw``, which imported ``base``) and under ``TYPE_CHECKING``. A module is a
file; ``from pkg import name`` depends on ``pkg.name`` where that is a module, else on
``pkg``'s ``__init__``. ``snr_dist.triton_kernels`` is read from the repository's
``kernels/triton_kernels/``, where it lives.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "snr_dist": ROOT / "snr_dist",
    "snr_dist.triton_kernels": ROOT / "kernels" / "triton_kernels",
}


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upward
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            # `from a import b` where b is not a module, `import a.b.c` where only a.b is ours
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    """The reader finds the imports it should (so the tests below can fail)."""
    edges = graph()
    assert "snr_dist.optim.engine" in edges["snr_dist.optim.snr_adamw"] or any(
        "snr_dist.optim.engine" in edges[m] for m in edges["snr_dist.optim.snr_adamw"]
    )
    assert "snr_dist.kernels.reference" in edges["snr_dist.triton_kernels.snr_adamw"]
    assert "snr_dist.triton_kernels" in edges["snr_dist.kernels"]  # lazy, inside a function
    assert "snr_dist.optim.engine" in edges["snr_dist.optim.steps.base"]  # under TYPE_CHECKING
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_inside_snr_dist():
    found = circles(graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


# Who may not import whom (DEVELOPERS.md: the maths never imports training or distribution
# code; estimators never read the optimizer; distributors never know what a statistic means;
# the kernels are the bottom of the hot loops).
TRAINING = (
    "snr_dist.optim",
    "snr_dist.integrations",
    "snr_dist.experiments",
    "snr_dist.checkpoint",
    "snr_dist.deepspeed",
    "snr_dist.megatron",
    "snr_dist.fsdp",
    "snr_dist.metrics",
    "snr_dist.stopping",
)
LAYERS = {
    "maths": (
        ("snr_dist.snr", "snr_dist.subspace", "snr_dist.cross_sample"),
        TRAINING + ("snr_dist.estimators", "snr_dist.distributors"),
    ),
    "kernels": (
        ("snr_dist.kernels", "snr_dist.triton_kernels"),
        TRAINING + ("snr_dist.estimators", "snr_dist.distributors"),
    ),
    "estimators": (("snr_dist.estimators",), TRAINING),
    "distributors": (("snr_dist.distributors",), ("snr_dist.optim", "snr_dist.estimators")),
}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
    lower, upper = LAYERS[layer]
    edges = graph()
    bad = [
        f"{m} -> {t}"
        for m, targets in edges.items()
        if _within(m, lower)
        for t in targets
        if _within(t, upper) and not _within(t, lower)
    ]
    assert not bad, bad
