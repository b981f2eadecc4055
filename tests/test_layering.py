"""The package layering of docs/architecture.md, checked on the source: imports point only downward, through
public names, and no two modules import each other (directly or around a loop). Lazy imports inside functions
count too: they are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ptm"

# Lowest first. A module belongs to the longest unit that prefixes its name; it may import its own unit or any
# unit below it.
LAYERS = [
    "ptm",
    "ptm.errors",
    "ptm.toml_file",
    "ptm.model.config",
    "ptm.parallel",
    "ptm.model",
    "ptm.ckpt",
    "ptm.convert",
    "ptm.data",
    "ptm.train",
    "ptm.merge",
    "ptm.eval",
    "ptm.toy",
    "ptm.search",
    "ptm.experiment",
    "ptm.testing",
    "ptm.config",  # gin glue: registers library functions (t5x: gin at the edge only)
    "*.commands",  # each package's CLI handlers (and `python -m` entry points): may use gin glue
    "ptm.cli",
]
EDGE = ("commands", "__main__")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(mod: str) -> int:
    if mod.rsplit(".", 1)[-1] in EDGE:
        return LAYERS.index("*.commands")
    best, rank = -1, None
    for i, u in enumerate(LAYERS):
        if (mod == u or mod.startswith(u + ".")) and len(u) > best:
            best, rank = len(u), i
    if rank is None:
        raise AssertionError(f"{mod}: in no layer of tests/test_layering.py::LAYERS (add it)")
    return rank


def _imports(path: Path, mod: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every ptm import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "ptm"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "ptm":
                continue
            names = [a.name for a in node.names]
            # `from ptm.ckpt import format` imports a module, not a name
            mods = [f"{base}.{n}" for n in names if (ROOT.parent / f"{base}.{n}".replace(".", "/")).with_suffix(
                ".py").exists() or (ROOT.parent / f"{base}.{n}".replace(".", "/")).is_dir()]
            if mods:
                out += [(m, [], node.lineno) for m in mods]
            rest = [n for n in names if f"{base}.{n}" not in mods]
            if rest:
                out.append((base, rest, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(ROOT.rglob("*.py"))}


def _package(mod: str) -> str:
    return ".".join(mod.split(".")[:2])


def _problems(graph: dict[str, list[tuple[str, list[str], int]]]) -> list[str]:
    problems = []
    for mod, imps in graph.items():
        for target, names, line in imps:
            if _unit(target) > _unit(mod):
                problems.append(f"{mod}:{line} imports {target}, which sits above it")
            private = [n for n in names if n.startswith("_")]
            if private and _package(target) != _package(mod):
                problems.append(f"{mod}:{line} imports private {private} from {target}")
    return problems


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)
    return cycles


def test_imports_point_downward_through_public_names():
    problems = _problems(_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    g = _graph()
    graph = {m: sorted({t for t, _, _ in imps if t in g} - {m}) for m, imps in g.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_catch_what_they_should(tmp_path):
    """An upward import, a private name from another package and a cycle are all reported."""
    f = tmp_path / "bad.py"
    f.write_text("from ptm.merge.engine import merge\n\ndef f():\n    from ptm.merge.engine import _Combiner\n")
    graph = {"ptm.ckpt.bad": _imports(f, "ptm.ckpt.bad")}
    assert graph["ptm.ckpt.bad"] == [("ptm.merge.engine", ["merge"], 1), ("ptm.merge.engine", ["_Combiner"], 4)]
    problems = _problems(graph)
    assert len(problems) == 3 and any("private" in p for p in problems), problems
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert _unit("ptm.model.config") < _unit("ptm.parallel.mesh") < _unit("ptm.model.llama") < _unit("ptm.ckpt.x")


@pytest.mark.parametrize("mod", sorted(_module_name(p) for p in ROOT.rglob("*.py")))
def test_every_module_has_a_layer(mod):
    _unit(mod)
