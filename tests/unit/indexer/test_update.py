"""index delete / add on the index kinds the builder chooses, checked against what search returns."""

import numpy as np
import pytest

from services.common.config import Settings
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
from services.index.descriptors import weighted_sum
from services.index.versions import load_current
from services.indexer.build import build_index
from services.indexer.update import add_to_index, delete_from_index
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings


@pytest.mark.parametrize("factory", ["IVF8,PQ8,Refine(SQ8)", "IVF8,Flat"])
def test_deleted_ids_are_gone_from_search_and_the_rest_stays(tmp_path, factory):
    settings = Settings(home=tmp_path / "home")
    x = random_unit_vectors(2000, 32, seed=1, clusters=8)
    write_fake_embeddings(tmp_path / "emb", x)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, factory=factory, settings=settings)
    ids = read_embeddings(LocalStore(tmp_path / "emb")).ids
    manifest, removed, unknown = delete_from_index(str(tmp_path / "idx"), [int(ids[0]), int(ids[1]), 12345],
                                                   settings)
    assert removed == 2 and unknown == [12345] and manifest.count == 1998
    searcher = IndexSearcher(str(tmp_path / "idx"), settings)
    hits = searcher.search(x[:4], k=5, nprobe=8)
    assert not {h.id for row in hits for h in row} & {int(ids[0]), int(ids[1])}
    assert [row[0].id for row in hits[2:]] == [int(ids[2]), int(ids[3])]


def test_an_add_to_a_dba_index_augments_the_new_vectors_and_leaves_the_indexed_ones(tmp_path):
    """An add re-weights each new vector with its 2 nearest among the indexed (as stored: augmented) and the
    other new vectors; the indexed vectors keep theirs until a rebuild."""
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(300, 16, seed=2, clusters=6))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, factory="Flat", settings=settings, dba=2)
    before = IndexSearcher(str(tmp_path / "idx"), settings)
    old_ids = read_embeddings(LocalStore(tmp_path / "emb")).ids.tolist()
    stored_before = before.fetch(old_ids)
    new = random_unit_vectors(10, 16, seed=3, clusters=6)
    write_fake_embeddings(tmp_path / "new", new, first_row=1000)
    new_ids = read_embeddings(LocalStore(tmp_path / "new")).ids.tolist()

    manifest, added, _ = add_to_index(str(tmp_path / "idx"), str(tmp_path / "new"), settings)
    after = IndexSearcher(str(tmp_path / "idx"), settings)
    assert added == 10 and manifest.params["dba"] == 2
    assert np.array_equal(after.fetch(old_ids), stored_before)
    pool = np.concatenate([stored_before, new])  # what each new vector's neighbours are drawn from
    for i, v in enumerate(new):
        sims = pool @ v
        sims[len(old_ids) + i] = -np.inf  # not itself
        top = np.argsort(-sims)[:2]
        want = weighted_sum(v[None], pool[top][None], sims[top][None])[0]
        assert np.allclose(after.fetch([new_ids[i]])[0], want, atol=1e-5), i



def test_adds_and_deletes_keep_the_projection_and_project_new_vectors_with_it(tmp_path):
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(1000, 32, seed=4, clusters=8))
    first = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, pca_dim=8, settings=settings)
    new = random_unit_vectors(5, 32, seed=5)
    write_fake_embeddings(tmp_path / "new", new, first_row=5000)
    new_ids = read_embeddings(LocalStore(tmp_path / "new")).ids.tolist()
    added, _, _ = add_to_index(str(tmp_path / "idx"), str(tmp_path / "new"), settings)
    assert added.projection.sha256 == first.projection.sha256 and added.dim == 8
    searcher = IndexSearcher(str(tmp_path / "idx"), settings)
    assert [row[0].id for row in searcher.search(new, k=1)] == new_ids
    assert np.allclose(searcher.fetch(new_ids), searcher.projection.apply(new), atol=1e-5)
    deleted, removed, _ = delete_from_index(str(tmp_path / "idx"), new_ids[:2], settings)
    assert removed == 2 and deleted.projection.sha256 == first.projection.sha256
    assert IndexSearcher(str(tmp_path / "idx"), settings).search(new[2:], k=1)[0][0].id == new_ids[2]


class Interrupted(Exception):
    pass


def test_a_change_that_fails_before_publishing_leaves_no_files_and_one_that_fails_after_keeps_its_version(tmp_path):
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(400, 16, seed=3))
    write_fake_embeddings(tmp_path / "more", random_unit_vectors(100, 16, seed=4), first_row=400)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings, version="v1")
    versions = tmp_path / "idx" / "versions"

    def fail_at(prefix):
        def step(msg):
            if msg.startswith(prefix):
                raise Interrupted(msg)
        return step

    with pytest.raises(Interrupted):  # shard files written, the manifest not yet
        add_to_index(str(tmp_path / "idx"), str(tmp_path / "more"), settings, fail_at("wrote shard 1"), "v2")
    assert sorted(p.name for p in versions.iterdir()) == ["v1"]
    with pytest.raises(Interrupted):  # published, then the caller's step failed (a closed terminal)
        add_to_index(str(tmp_path / "idx"), str(tmp_path / "more"), settings, fail_at("published"), "v3")
    assert load_current(LocalStore(tmp_path / "idx")).version == "v3"
    assert IndexSearcher(str(tmp_path / "idx"), settings).manifest.count == 500  # its files are all there
