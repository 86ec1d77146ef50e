"""index delete / add on the index kinds the builder chooses, checked against what search returns."""

import pytest

from services.common.config import Settings
from services.common.errors import NotSupported
from services.common.store import LocalStore
from services.embedder.embeddings import read_embeddings
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


def test_adding_to_a_dba_index_is_refused(tmp_path):
    settings = Settings(home=tmp_path / "home")
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(300, 16, seed=2))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), factory="Flat", settings=settings, dba=2)
    write_fake_embeddings(tmp_path / "new", random_unit_vectors(10, 16, seed=3))
    with pytest.raises(NotSupported, match="DBA"):
        add_to_index(str(tmp_path / "idx"), str(tmp_path / "new"), settings)
