"""The import layers of snapgen's subpackages (docs/testing.md, "Import layers"). Lower layers never import
higher ones; subpackages never import each other in a cycle. Every ``import`` / ``from ... import`` in
``src/snapgen/**/*.py`` counts, function-level (lazy) imports included: they are the same dependency.

    0 nn, utils, env, registry,     4 data, pipelines
      _version
    1 attention, text, vae          5 tasks, export, eval
    2 models                        6 train
    3 flow, sampling, elastic,      7 cli, snapgen (the package's __init__), every __main__.py (`python -m` entry points)
      distill, compress, search

A new subpackage or top-level module fails the test until it is given a layer in LAYERS."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "snapgen"  # this checkout's sources, not an installed copy
LAYERS = {**dict.fromkeys(["nn", "utils", "env", "registry", "_version"], 0), **dict.fromkeys(["attention", "text", "vae"], 1), "models": 2,
          **dict.fromkeys(["flow", "sampling", "elastic", "distill", "compress", "search"], 3),
          **dict.fromkeys(["data", "pipelines"], 4), **dict.fromkeys(["tasks", "export", "eval"], 5),
          "train": 6, "cli": 7, "__init__": 7, "__main__": 7}

# Each entry is a debt to remove (move the shared code down a layer, or invert the dependency), never to add.
# The list may only shrink: an entry that no longer occurs fails the test until it is deleted here.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()  # all paid off; keep it empty


def _unit(rel: Path) -> str:
    """The layer unit of a file: its top-level subpackage, or the module name for top-level modules."""
    if rel.name == "__main__.py":  # `python -m snapgen.x` entry points sit on top, beside the CLI
        return "__main__"
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def import_graph() -> dict[tuple[str, str], set[str]]:
    """(from_unit, to_unit) -> the files (relative to src/snapgen) holding such an import."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        package = ["snapgen", *rel.parent.parts]  # what a relative import's first dot means here
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name.split(".") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level <= len(package), f"{rel}:{node.lineno}: relative import climbs above snapgen"
                base = (package[:len(package) - node.level + 1] if node.level else [])
                base = base + (node.module.split(".") if node.module else [])
                targets = [base + [a.name] for a in node.names] if base == ["snapgen"] else [base]
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                  in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str)):  # importlib.import_module("snapgen.x")
                targets = [node.args[0].value.split(".")]
            else:
                continue
            for t in targets:
                if t[0] != "snapgen":
                    continue
                # `import snapgen` and `from snapgen import ThreeStageDiT` reach the package's __init__
                is_unit = len(t) > 1 and ((SRC / t[1]).is_dir() or (SRC / f"{t[1]}.py").is_file())
                to = t[1] if is_unit else "__init__"
                if to != _unit(rel):
                    edges.setdefault((_unit(rel), to), set()).add(str(rel))
    return edges


def find_cycle(edges) -> list[str] | None:
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (cycle := visit(m)):
                return cycle
        state[n] = "done"
        stack.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_every_subpackage_has_a_layer():
    units = {_unit(p.relative_to(SRC)) for p in SRC.rglob("*.py")} | {b for _, b in import_graph()}
    assert not units - LAYERS.keys(), f"give these a layer in LAYERS: {sorted(units - LAYERS.keys())}"


def test_no_upward_imports_beyond_the_known_debts():
    edges = import_graph()
    upward = {e for e in edges if LAYERS.get(e[0], 99) < LAYERS.get(e[1], 99)}
    new = {f"{a} -> {b} ({', '.join(sorted(edges[a, b]))})" for a, b in upward - KNOWN_VIOLATIONS}
    assert not new, f"imports against the layer order: {sorted(new)}"
    gone = KNOWN_VIOLATIONS - set(edges)
    assert not gone, f"paid off, delete from KNOWN_VIOLATIONS: {sorted(gone)}"


def test_no_import_cycles_beyond_the_known_debts():
    cycle = find_cycle(set(import_graph()) - KNOWN_VIOLATIONS)
    assert cycle is None, f"import cycle between subpackages: {' -> '.join(cycle)}"
