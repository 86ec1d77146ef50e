"""The package structure: layers only point down, no module circles, nothing imports an entry point, the
searcher's files stay readable, and the light readers stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.import_graph import (
    ROOT,
    check,
    circles,
    entry_point_imports,
    entry_points,
    module_graph,
    package_graph,
    violations,
)


def module(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


def test_the_tree_keeps_every_rule_of_the_import_graph():
    edges, graph = package_graph(), module_graph()
    assert ("indexer", "index") in edges and ("searcher", "index") in edges  # the graph is really read
    assert "services.index.versions" in graph["services.indexer.update"]
    assert check() == []


def test_a_circle_between_two_modules_of_one_package_is_named_even_through_an_import_inside_a_function(
        tmp_path: Path):
    module(tmp_path, "services/common/config.py", "def f():\n    from services.common.faults import POINTS\n")
    module(tmp_path, "services/common/faults.py", "from services.common.config import get_settings\n")
    module(tmp_path, "services/common/store.py", "from services.common import config\n")
    graph = module_graph(tmp_path)
    assert graph["services.common.store"] == {"services.common.config"}  # `from package import module`
    assert circles(graph) == [["services.common.config", "services.common.faults"]]
    assert check(tmp_path) == ["circle: services.common.config <-> services.common.faults"]


def test_an_import_of_a_process_entry_point_is_named(tmp_path: Path):
    module(tmp_path, "services/searcher/shard.py", "def main():\n    pass\n\n\nif __name__ == '__main__':\n"
                                                   "    main()\n")
    module(tmp_path, "services/searcher/__main__.py", "from services.searcher.router import Router\n")
    module(tmp_path, "services/searcher/router.py", "from services.searcher.shard import main\n")
    module(tmp_path, "services/searcher/cli.py", "import services.searcher.__main__\n")
    entries = entry_points(tmp_path)
    assert entries == {"services.searcher.shard", "services.searcher.__main__"}
    assert entry_point_imports(module_graph(tmp_path), entries) == [
        "services.searcher.cli imports services.searcher.__main__, a process's entry point",
        "services.searcher.router imports services.searcher.shard, a process's entry point"]


def test_no_file_of_the_searcher_is_over_350_lines():
    """The searcher's hub was a 621-line router.py: a servicer, two routers in one and an entry point."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "services" / "searcher").glob("*.py")}
    assert len(sizes) > 5 and {name: n for name, n in sizes.items() if n > 350} == {}


def test_the_check_names_an_upward_a_sideways_and_an_unplaced_import(tmp_path: Path):
    module(tmp_path, "services/embedder/train.py", "def f():\n    from services.eval.protocols import class_folder\n")
    module(tmp_path, "services/indexer/build.py", "from services.searcher.merge import merge_topk\n")
    module(tmp_path, "services/extra.py", "from services.common import store\n")
    found = violations(package_graph(tmp_path))
    assert found == ["embedder -> eval (1 imports) points up", "extra -> common: extra has no layer (add it to LAYERS)",
                     "indexer -> searcher (1 imports) points sideways"]


def test_reading_the_catalogue_of_an_index_loads_neither_faiss_nor_torch():
    code = ("import sys; import services.gateway.app, services.index.docs, services.index.versions; "
            "print(sorted(m for m in ('faiss', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
