"""The import graph of services/ checked against three rules. Every import counts, at module level or inside a
function: an import inside a function hides a circle from Python's import machinery, not from a reader.

1. Layers: a package imports only packages on a lower layer, never one above it or beside it, so no loop
   between packages can form.
2. No circles between modules, inside a package too: no module reaches itself through the modules it imports.
3. Nothing imports a process's entry point: a `__main__.py`, or a module with an `if __name__ == "__main__"`
   block. An entry point parses a command line and starts a server; a module that needs what a server does
   imports the module that does it.

    python -m scripts.import_graph [ROOT]   # prints the package edges (with import counts) and any violation

Hand-written rather than import-linter's contracts: the three rules read one AST pass over services/, and the
layer table below is the one place a new package gets its floor.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower numbers are lower layers. A new package must be placed here before anything may import it.
LAYERS = {
    "protos": 0,
    "common": 1,
    "embedder": 2, "index": 2,
    "indexer": 3, "searcher": 3,
    "eval": 4, "gateway": 4,
    "stack": 5,
    "cli": 6,
}


def package_of(module: str) -> str | None:
    """services.index.shards -> index; services.cli -> cli; protos.imsearch.v1 -> protos; others None."""
    parts = module.split(".")
    if parts[0] == "protos":
        return "protos"
    if parts[0] == "services" and len(parts) > 1:
        return parts[1]
    return None


def modules_of(root: Path) -> dict[str, ast.AST]:
    """Module name -> parsed source, for every file under root/services (a package's __init__ named as the
    package)."""
    out = {}
    for path in sorted((root / "services").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(tree: ast.AST, known: set[str] | dict) -> list[str]:
    """What each import statement of the tree names, one entry a name: `import a.b` -> a.b; `from a.b import c`
    -> a.b.c when that is a known module, else a.b (c is a name defined in a.b)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names]
    return names


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of services/ it imports."""
    modules = modules_of(root)
    return {name: {m for m in imported(tree, modules) if m in modules and m != name}
            for name, tree in modules.items()}


def package_graph(root: Path = ROOT) -> Counter:
    """(importing package, imported package) -> number of names imported from it."""
    edges: Counter = Counter()
    modules = modules_of(root)
    for module, tree in modules.items():
        src = package_of(module)
        for name in imported(tree, modules):
            dst = package_of(name)
            if dst and src and dst != src:
                edges[(src, dst)] += 1
    return edges


def violations(edges: Counter) -> list[str]:
    """Rule 1: imports that point up or sideways, or name a package with no layer."""
    out = []
    for (src, dst), n in sorted(edges.items()):
        if src not in LAYERS or dst not in LAYERS:
            out.append(f"{src} -> {dst}: {src if src not in LAYERS else dst} has no layer (add it to LAYERS)")
        elif LAYERS[dst] >= LAYERS[src]:
            way = "sideways" if LAYERS[dst] == LAYERS[src] else "up"
            out.append(f"{src} -> {dst} ({n} imports) points {way}")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Rule 2: the groups of modules that reach each other through imports (Tarjan's strongly connected
    components of more than one module), each sorted, in name order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def entry_points(root: Path = ROOT) -> set[str]:
    """Modules a process starts from: __main__ modules and modules with an `if __name__ == "__main__"` block."""
    out = set()
    for name, tree in modules_of(root).items():
        if name.endswith(".__main__") or any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test)
                                             and "__main__" in ast.unparse(node.test) for node in tree.body):
            out.add(name)
    return out


def entry_point_imports(graph: dict[str, set[str]], entries: set[str]) -> list[str]:
    """Rule 3: every import of an entry point by another module."""
    return [f"{src} imports {dst}, a process's entry point" for src in sorted(graph)
            for dst in sorted(graph[src] & entries)]


def check(root: Path = ROOT) -> list[str]:
    """Every violation of the three rules in the tree at root."""
    graph = module_graph(root)
    return (violations(package_graph(root))
            + [f"circle: {' <-> '.join(group)}" for group in circles(graph)]
            + entry_point_imports(graph, entry_points(root)))


def main(argv: list[str]) -> int:
    root = Path(argv[0]) if argv else ROOT
    edges = package_graph(root)
    for (src, dst), n in sorted(edges.items(), key=lambda e: (-LAYERS.get(e[0][0], 99), e[0])):
        print(f"{src:>9} -> {dst:<9} {n:>3}")
    bad = check(root)
    for line in bad:
        print(f"violation: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
