"""Every pair of index writers: the second runs whole inside the first's window (after the first read CURRENT,
before it flips it), as a concurrent job would. The second is acknowledged; the first is then redone on top of
it (add, delete, gc) or refused with a Conflict (build, publish, rollback) — no acknowledged change is lost."""

from __future__ import annotations

import itertools

import pytest

from services.common.config import Settings
from services.common.errors import Conflict
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.index import versions
from services.index.versions import current_pointer, gc, list_versions, publish, rollback
from services.indexer.build import build_index
from services.indexer.update import add_to_index, delete_from_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings

OPS = ["add", "delete", "build", "publish", "rollback", "gc"]


class Catalogue:
    """v1 and v2 published (v2 current), 'staged' written but not published, 'junk' an old unpublished
    version gc removes; per writer k: embeddings to add and ids to delete."""

    def __init__(self, tmp):
        self.tmp, self.root = tmp, str(tmp / "idx")
        self.settings = Settings(home=tmp / "home", gc_grace_s=0)
        write_fake_embeddings(tmp / "emb", random_unit_vectors(200, 8, seed=1))
        for version, published in (("v1", True), ("junk", False), ("v2", True), ("staged", False)):
            build_index(str(tmp / "emb"), self.root, shards=2, settings=self.settings, version=version,
                        publish_it=published)
        self.ids = read_embeddings(LocalStore(tmp / "emb")).ids.tolist()
        self.new = []
        for k in range(2):
            write_fake_embeddings(tmp / f"new{k}", random_unit_vectors(10, 8, seed=5 + k), first_row=1000 + 100 * k)
            self.new.append(set(read_embeddings(LocalStore(tmp / f"new{k}")).ids.tolist()))
        self.store = LocalStore(self.root)

    def run(self, op: str, k: int) -> str | None:
        """Writer k does op; returns the version it published (None when its change publishes none)."""
        s, cache = self.settings, self.settings.home / "cache"
        if op == "add":
            return add_to_index(self.root, str(self.tmp / f"new{k}"), s)[0].version
        if op == "delete":
            return delete_from_index(self.root, self.ids[3 * k:3 * k + 3], s)[0].version
        if op == "build":
            return build_index(str(self.tmp / "emb"), self.root, shards=2, settings=s, version=f"build{k}").version
        if op == "publish":
            return publish(self.store, "staged", cache).version
        if op == "rollback":
            return rollback(self.store, cache).version
        gc(self.store, keep=9, grace_s=0)
        return None

    def holds(self, op: str, k: int, version: str | None) -> bool:
        """Whether writer k's change is in the published state now."""
        pointer = current_pointer(self.store)
        chain = [pointer.version, *pointer.history]
        held = {int(i) for sh in IndexSearcher(self.root, self.settings).shards for i in sh.ids}
        if op == "add":
            return self.new[k] <= held
        if op == "delete":
            return not set(self.ids[3 * k:3 * k + 3]) & held
        if op in ("build", "publish"):
            return version in chain
        if op == "rollback":  # v1 came back after v2
            return "v1" in chain and chain.index("v1") < (chain.index("v2") if "v2" in chain else len(chain))
        return "junk" not in list_versions(self.store)


@pytest.mark.parametrize("first,second", list(itertools.product(OPS, OPS)))
def test_a_writer_racing_any_other_loses_no_acknowledged_change(tmp_path, monkeypatch, first, second):
    cat = Catalogue(tmp_path)
    interloper: dict = {}
    real = versions.crash_point

    def window(name: str) -> None:  # the first writer is about to flip CURRENT: the second runs now, whole
        if name == "index.before-flip" and not interloper:
            interloper["version"] = None
            interloper["version"] = cat.run(second, 1)
        real(name)

    monkeypatch.setattr(versions, "crash_point", window)
    try:
        version, acknowledged = cat.run(first, 0), True
    except Conflict:
        version, acknowledged = None, False
    monkeypatch.setattr(versions, "crash_point", real)
    assert "version" in interloper  # the race happened
    lost = [w for w, op, k, v, ack in (("second", second, 1, interloper["version"], True),
                                       ("first", first, 0, version, acknowledged)) if ack and not cat.holds(op, k, v)]
    assert lost == []
    assert acknowledged or first in ("build", "publish", "rollback"), "adds, deletes and gc are redone, not refused"
    if not acknowledged:  # refused: its change is absent (a build's version stays staged, unpublished)
        assert not cat.holds(first, 0, "build0" if first == "build" else "staged")
    print(f"{first} raced by {second}: {second} acknowledged, {first} "
          f"{'acknowledged' if acknowledged else 'refused (Conflict)'}, acknowledged changes lost: {len(lost)}")
