"""The package-level import graph of services/ (every import, at module level or inside a function), checked
against the layers: a package may import only packages on a lower layer — never one above it, never one
beside it — so no loop between packages can form.

    python -m scripts.import_graph [ROOT]   # prints the edges (with import counts) and any violation
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


def imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from services import cluster` names a package in the imported names
            names += [f"{node.module}.{a.name}" for a in node.names] if node.module == "services" else [node.module]
    return names


def package_graph(root: Path = ROOT) -> Counter:
    """(importing package, imported package) -> number of import statements naming it."""
    edges: Counter = Counter()
    for path in sorted((root / "services").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        src = package_of(module)
        for name in imported_modules(ast.parse(path.read_text(), str(path))):
            dst = package_of(name)
            if dst and src and dst != src:
                edges[(src, dst)] += 1
    return edges


def violations(edges: Counter) -> list[str]:
    out = []
    for (src, dst), n in sorted(edges.items()):
        if src not in LAYERS or dst not in LAYERS:
            out.append(f"{src} -> {dst}: {src if src not in LAYERS else dst} has no layer (add it to LAYERS)")
        elif LAYERS[dst] >= LAYERS[src]:
            way = "sideways" if LAYERS[dst] == LAYERS[src] else "up"
            out.append(f"{src} -> {dst} ({n} imports) points {way}")
    return out


def main(argv: list[str]) -> int:
    edges = package_graph(Path(argv[0]) if argv else ROOT)
    for (src, dst), n in sorted(edges.items(), key=lambda e: (-LAYERS.get(e[0][0], 99), e[0])):
        print(f"{src:>9} -> {dst:<9} {n:>3}")
    bad = violations(edges)
    for line in bad:
        print(f"violation: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
