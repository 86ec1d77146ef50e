"""The package structure: layers only point down, and the light readers stay light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from scripts.import_graph import ROOT, package_graph, violations


def test_packages_import_only_packages_on_lower_layers():
    edges = package_graph()
    assert ("indexer", "index") in edges and ("searcher", "index") in edges  # the graph is really read
    assert violations(edges) == []


def test_the_check_names_an_upward_a_sideways_and_an_unplaced_import(tmp_path: Path):
    def module(path: str, text: str) -> None:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    module("services/embedder/train.py", "def f():\n    from services.eval.protocols import class_folder\n")
    module("services/indexer/build.py", "from services.searcher.merge import merge_topk\n")
    module("services/extra.py", "from services.common import store\n")
    found = violations(package_graph(tmp_path))
    assert found == ["embedder -> eval (1 imports) points up", "extra -> common: extra has no layer (add it to LAYERS)",
                     "indexer -> searcher (1 imports) points sideways"]


def test_reading_the_catalogue_of_an_index_loads_neither_faiss_nor_torch():
    code = ("import sys; import services.gateway.app, services.index.docs, services.index.versions; "
            "print(sorted(m for m in ('faiss', 'torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
