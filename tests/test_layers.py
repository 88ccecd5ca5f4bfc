"""The package's layers: imports point one way, without cycles or private names across modules,
and the library path (import + OptimalSampler(...).generate) never loads the CLI, the jobs or the
process layer.

The layer order is written once, here (and in the README's "Code layout"): a module may import
modules of its own layer and of layers below it, never above.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "optimal_sampling"
LAYERS = (
    ("config", "errors", "outputs", "version"),
    ("mixing",),
    ("models",),
    ("engines",),
    ("distributed",),
    ("runtime",),
    ("jobs",),
    ("server", "integrations"),
    ("cli", "__main__"),
)
RANK = {top: rank for rank, tops in enumerate(LAYERS) for top in tops}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    if level == 0:
        return name or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every import anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in known else (target, alias.name, node.lineno))
    return [
        (t, n, line) for t, n, line in found if t == "optimal_sampling" or t.startswith("optimal_sampling.")
    ]


def top_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, list[tuple[str, str, int]]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_every_top_level_module_has_a_layer():
    tops = {top_of(m) for m in modules()} - {""}
    assert tops <= set(RANK), f"modules outside the layer table: {sorted(tops - set(RANK))}"


def test_every_folder_is_a_package():
    """setuptools' package discovery (pyproject) installs only folders with an __init__.py: a
    folder without one works from a source tree and is missing from every installed copy."""
    folders = {p.parent for p in PACKAGE.rglob("*.py")}
    missing = sorted(str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").is_file())
    assert not missing, f"folders without __init__.py: {missing}"


def test_no_import_points_upward():
    upward = []
    for module, edges in graph().items():
        here = top_of(module)
        for target, _, line in edges:
            there = top_of(target)
            if here and there and RANK[there] > RANK[here]:
                upward.append(f"{module}:{line} imports {target} ({here} -> {there})")
    assert not upward, "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str]:
    """One import cycle of the graph (as a path that returns to its start), or []."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1 and nxt != node:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if state.get(nxt) is None:
                found = visit(nxt, path + [node])
                if found:
                    return found
        state[node] = 2
        return []

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node, [])
            if found:
                return found
    return []


def test_no_import_cycle():
    """Module-level and function-level imports alike (ast.walk sees both)."""
    nodes = set(modules())
    edges = {m: {t for t, _, _ in e if t in nodes} for m, e in graph().items()}
    assert not find_cycle(edges), " -> ".join(find_cycle(edges))


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_private_name_crosses_a_module():
    crossings = [
        f"{module}:{line} imports {name} from {target}"
        for module, edges in graph().items()
        for target, name, line in edges
        if name.startswith("_") and target != module
    ]
    assert not crossings, "\n".join(crossings)


def test_a_cycle_or_upward_edge_is_caught(tmp_path):
    """The checks above can fail: an upward import in a copy of a module is reported."""
    fake = {"optimal_sampling.mixing.bad": [("optimal_sampling.cli", "", 1)]}
    upward = [(m, t) for m, e in fake.items() for t, _, _ in e if RANK[top_of(t)] > RANK[top_of(m)]]
    assert upward == [("optimal_sampling.mixing.bad", "optimal_sampling.cli")]


LIBRARY_RUN = """
import sys
import optimal_sampling
from optimal_sampling import OptimalSampler
sampler = OptimalSampler({base!r}, {teacher!r}, device="cpu", seed=0)
out = sampler.generate(["hello there"], max_tokens=3, collect_diagnostics=True)
assert len(out.generated_ids[0]) >= 1
ours = sorted(m for m in sys.modules if m.startswith("optimal_sampling"))
print("OURS", " ".join(ours))
"""


def test_the_library_path_loads_no_cli_jobs_or_process_layer(tiny_pair):
    base, teacher = tiny_pair("qwen2")
    code = LIBRARY_RUN.format(base=str(base), teacher=str(teacher))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = next(line for line in done.stdout.splitlines() if line.startswith("OURS")).split()[1:]
    assert "optimal_sampling.runtime.sampler" in ours  # the check sees what was loaded
    higher = [m for m in ours if top_of(m) in ("cli", "jobs", "distributed", "server", "__main__")]
    assert not higher, higher
    # torch itself imports argparse, so the check is that none of our loaded modules does
    known = modules()
    with_argparse = [m for m in ours if m in known and "argparse" in {t for t, _, _ in raw_imports(known[m])}]
    assert not with_argparse, with_argparse


def raw_imports(path: Path) -> list[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(a.name, "", n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
