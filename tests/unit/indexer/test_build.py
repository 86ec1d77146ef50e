import faiss
import numpy as np
import pytest

from services.common.config import Settings
from services.common.errors import Corrupt, InvalidInput, NotFound, NotSupported
from services.common.store import LocalStore
from services.embedder.embeddings import id_from_sha256, read_embeddings
from services.index.versions import load_current
from services.indexer.build import build_index, choose_engine
from services.indexer.driver import first_rows
from services.indexer.stages import nprobe_steps
from services.searcher.local import IndexSearcher
from tests.helpers import random_unit_vectors, write_fake_embeddings


@pytest.fixture()
def settings(tmp_path):
    return Settings(home=tmp_path / "home")


def exact_topk(vectors, ids, queries, k):
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    _, rows = flat.search(queries, k)
    return ids[rows]


def test_embeddings_round_trip_keeps_rows_and_errors(tmp_path):
    x = random_unit_vectors(1200, 16)
    write_fake_embeddings(tmp_path / "emb", x, error_rows=3)
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    assert emb.vectors.shape == (1200, 16) and np.allclose(emb.vectors, x)
    assert emb.errors.num_rows == 3 and len(emb.meta["parts"]) == 3
    assert len(set(emb.ids.tolist())) == 1200


def test_sharded_flat_search_equals_one_flat_index(tmp_path, settings):
    x = random_unit_vectors(3000, 32, seed=1)
    write_fake_embeddings(tmp_path / "emb", x)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=4, settings=settings)
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    assert s.manifest.factory == "Flat" and len(s.shards) == 4
    assert sum(sh.entry.count for sh in s.shards) == 3000
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    queries = random_unit_vectors(50, 32, seed=2)
    truth = exact_topk(emb.vectors, emb.ids, queries, 10)
    got = s.search(queries, k=10)
    assert [[h.id for h in hits] for hits in got] == truth.tolist()
    assert all(h.uri.startswith("img/") for h in got[0])


def test_sharded_ivf_agrees_with_exact_search(tmp_path):
    settings = Settings(home=tmp_path / "home", flat_max=1000)
    x = random_unit_vectors(20_200, 32, seed=3, clusters=50)
    x, queries = x[:20_000], x[20_000:]  # held-out queries from the same distribution
    write_fake_embeddings(tmp_path / "emb", x, part_rows=5000)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=3, settings=settings)
    assert m.params["kind"] == "ivf-flat" and m.tuning["recall_at_10"] >= 0.95
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    truth = exact_topk(emb.vectors, emb.ids, queries, 10)
    got = s.search(queries, k=10)
    agree = np.mean([len(set(t) & {h.id for h in g}) / 10 for t, g in zip(truth.tolist(), got)])
    assert agree >= 0.95
    assert len({h.shard for hits in got for h in hits}) == 3


def test_pq_with_reranking_reaches_the_target(tmp_path):
    # 56 bytes per vector: no room for 32 floats (136 B with the id), room for SQ8 + PQ8 + ids.
    settings = Settings(home=tmp_path / "home", flat_max=1000, memory_budget_gb=12_000 * 56 / 2**30)
    x = random_unit_vectors(12_000, 32, seed=5, clusters=40)
    write_fake_embeddings(tmp_path / "emb", x, part_rows=6000)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    assert m.params["kind"] == "ivf-pq-sq8"
    assert m.tuning["recall_at_10"] >= 0.95, m.tuning


def test_pq_reranked_from_disk_reaches_the_target_and_the_searcher_maps_the_vectors(tmp_path):
    # 24 bytes per vector: not room for SQ8 codes of 32 dims (+ ids), room for PQ8 codes and the ids.
    settings = Settings(home=tmp_path / "home", flat_max=1000, memory_budget_gb=12_000 * 24 / 2**30)
    x = random_unit_vectors(12_200, 32, seed=5, clusters=40)
    x, queries = x[:12_000], x[12_000:]
    write_fake_embeddings(tmp_path / "emb", x, part_rows=6000)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    assert m.params["kind"] == "ivf-pq-disk" and m.reranks_from_disk
    assert m.tuning["recall_at_10"] >= 0.95, m.tuning
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    for shard in s.shards:  # the full vectors are the shard file's pages, not a copy in RAM
        refine = faiss.downcast_index(faiss.downcast_index(faiss.downcast_index(shard.index).index).refine_index)
        assert not refine.codes.is_owned
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    truth = exact_topk(emb.vectors, emb.ids, queries, 10)
    got = s.search(queries, k=10)
    assert np.mean([len(set(t) & {h.id for h in g}) / 10 for t, g in zip(truth.tolist(), got)]) >= 0.95
    assert np.allclose(s.fetch(emb.ids[:3].tolist()), emb.vectors[:3], atol=1e-6)  # exact vectors, from disk


def test_without_disk_reranking_the_last_resort_is_pq_alone(tmp_path):
    settings = Settings(home=tmp_path / "home", flat_max=1000, memory_budget_gb=12_000 * 24 / 2**30,
                        disk_rerank=False)
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(12_000, 32, seed=5, clusters=40), part_rows=6000)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    assert m.params["kind"] == "ivf-pq" and not m.reranks_from_disk


def test_ids_are_content_hashes_and_duplicates_are_dropped(tmp_path, settings):
    x = random_unit_vectors(100, 8)
    write_fake_embeddings(tmp_path / "a", x, name="same")
    m = build_index(str(tmp_path / "a"), str(tmp_path / "idx"), settings=settings)
    assert m.count == 100 and m.duplicates_dropped == 0
    emb = read_embeddings(LocalStore(tmp_path / "a"))
    import hashlib
    assert emb.ids[0] == id_from_sha256(hashlib.sha256(b"same-0").hexdigest())


@pytest.mark.parametrize("whiten", [0.0, 1.0])
def test_the_projection_is_learned_at_build_and_queries_are_projected_with_it(tmp_path, settings, whiten):
    x = random_unit_vectors(2000, 32, seed=6, clusters=10)
    write_fake_embeddings(tmp_path / "emb", x)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, pca_dim=8, whiten=whiten,
                    settings=settings)
    assert m.dim == 8 and m.model_dim == 32 and m.projection is not None
    assert m.params["pca_dim"] == 8 and m.params["whiten_power"] == whiten
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    assert [row[0].id for row in s.search(emb.vectors[:5], k=1)] == emb.ids[:5].tolist()  # model vectors in
    stored = s.fetch(emb.ids[:5].tolist())
    assert stored.shape == (5, 8) and np.allclose(stored, s.projection.apply(emb.vectors[:5]), atol=1e-5)
    assert [row[0].id for row in s.search(stored, k=1)] == emb.ids[:5].tolist()  # index vectors in, as they are
    with pytest.raises(InvalidInput, match="takes 8 or 32-d vectors"):
        s.search(np.ones((1, 16), np.float32))


def test_a_catalogue_too_small_or_a_model_too_narrow_is_indexed_unprojected(tmp_path, settings):
    steps = []
    write_fake_embeddings(tmp_path / "small", random_unit_vectors(100, 64, seed=1))
    m = build_index(str(tmp_path / "small"), str(tmp_path / "a"), pca_dim=32, settings=settings, step=steps.append)
    assert m.projection is None and m.dim == 64 and "pca_dim" not in m.params
    assert any("too few to learn 32 dimensions" in s for s in steps), steps
    write_fake_embeddings(tmp_path / "narrow", random_unit_vectors(2000, 16, seed=1))
    m = build_index(str(tmp_path / "narrow"), str(tmp_path / "b"), settings=settings, step=steps.append)  # 128
    assert m.projection is None and m.dim == 16 and any("have 16 dimensions" in s for s in steps)
    with pytest.raises(InvalidInput, match="whiten"):
        build_index(str(tmp_path / "narrow"), str(tmp_path / "c"), pca_dim=8, whiten=2, settings=settings)


def test_user_factory_overrides_the_choice(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(3000, 16))
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), factory="IVF32,Flat", settings=settings)
    assert m.factory == "IVF32,Flat" and m.params["nlist"] == 32 and 1 <= m.nprobe <= 32
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "w"), factory="IVF32,Flat", pca_dim=8, nprobe=5,
                    settings=settings)
    assert m.factory == "IVF32,Flat" and m.dim == 8 and m.nprobe == 5 and m.tuning["nprobe_from"] == "user"
    with pytest.raises(InvalidInput, match="factory"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx2"), factory="IVFxyz,Nope", settings=settings)


def test_bad_inputs(tmp_path, settings):
    with pytest.raises(NotFound, match="embeddings.json"):
        build_index(str(tmp_path / "nothing"), str(tmp_path / "idx"), settings=settings)
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(10, 8))
    with pytest.raises(InvalidInput, match="shards"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=0, settings=settings)
    with pytest.raises(InvalidInput, match="nprobe"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), nprobe=0, settings=settings)


def test_wrong_dim_k_and_nprobe_are_refused(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(50, 8))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings)
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    with pytest.raises(InvalidInput, match="8-d"):
        s.search(np.zeros((1, 9), np.float32))
    for k in (0, -1, settings.max_k + 1):
        with pytest.raises(InvalidInput, match="k must be"):
            s.search(random_unit_vectors(1, 8), k=k)
    with pytest.raises(InvalidInput, match="NaN"):
        s.search(np.full((1, 8), np.nan, np.float32))


def test_damaged_shard_is_detected(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(50, 8))
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    shard = tmp_path / "idx" / "versions" / m.version / m.shards[1].file
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Corrupt, match="checksum"):
        IndexSearcher(str(tmp_path / "idx"), settings)
    shard.unlink()
    with pytest.raises(Corrupt, match="missing"):
        IndexSearcher(str(tmp_path / "idx"), settings)


def test_a_failed_build_leaves_the_published_version(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(50, 8))
    first = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings)
    with pytest.raises(InvalidInput):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), factory="Bogus", settings=settings)
    assert load_current(LocalStore(tmp_path / "idx")).version == first.version


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat", "PCAW8,L2norm,Flat"])
def test_stored_vectors_can_be_fetched_by_id(tmp_path, settings, factory):
    """Whitened indexes cannot give back their input vectors: they say so."""
    x = random_unit_vectors(1000, 16, seed=9, clusters=5)
    write_fake_embeddings(tmp_path / "emb", x)
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, factory=factory, settings=settings)
    emb = read_embeddings(LocalStore(tmp_path / "emb"))
    shard = IndexSearcher(str(tmp_path / "idx"), settings, only=[1]).shards[0]
    shard.enable_fetch()
    mine = [int(i) for i in shard.ids[:3]]
    if factory.startswith("PCAW"):
        with pytest.raises(NotSupported, match="whitening"):
            shard.fetch(mine)
        return
    got = shard.fetch(mine + [12345])
    assert got[-1] is None
    row = {int(i): r for r, i in enumerate(emb.ids)}
    for id_, v in zip(mine, got):
        assert v is not None and np.allclose(v, emb.vectors[row[id_]], atol=1e-5)


def test_a_coarse_assignment_made_elsewhere_gives_the_same_results(tmp_path, settings):
    x = random_unit_vectors(4000, 16, seed=12, clusters=20)
    write_fake_embeddings(tmp_path / "emb", x)
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, factory="IVF32,Flat", settings=settings)
    assert m.quantizer is not None
    quantizer = faiss.read_index(str(tmp_path / "idx" / "versions" / m.version / m.quantizer.file))
    searcher = IndexSearcher(str(tmp_path / "idx"), settings)
    queries = random_unit_vectors(30, 16, seed=13, clusters=20)
    Dq, Iq = quantizer.search(queries, 4)
    own = searcher.search_arrays(queries, 10, nprobe=4)
    given = searcher.search_arrays(queries, 10, assign=(Dq, Iq))
    assert (own[1] == given[1]).all()
    with pytest.raises(InvalidInput, match="outside"):
        searcher.search_arrays(queries, 10, assign=(Dq, Iq + 1000))
    with pytest.raises(InvalidInput, match="shape"):
        searcher.search_arrays(queries, 10, assign=(Dq[:5], Iq[:5]))


def test_only_plain_ivf_indexes_publish_a_quantizer(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(500, 8))
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), settings=settings)
    assert m.factory == "Flat" and m.quantizer is None
    s = IndexSearcher(str(tmp_path / "idx"), settings)
    Dq, Iq = np.zeros((1, 2), np.float32), np.zeros((1, 2), np.int64)
    with pytest.raises(InvalidInput, match="not a plain IVF"):
        s.search_arrays(random_unit_vectors(1, 8), 5, assign=(Dq, Iq))


def test_first_rows_keeps_the_first_of_each_id_in_catalogue_order_and_maps_every_row_to_it():
    ids = np.array([7, 3, 7, 9, 3, 1])
    kept, to_kept = first_rows(ids)
    assert kept.tolist() == [0, 1, 3, 5]
    assert ids[kept][to_kept].tolist() == ids.tolist()


def test_the_engine_is_ray_past_the_threshold_or_with_a_cluster_and_never_with_dba(tmp_path):
    s = Settings(home=tmp_path, index_ray_min_vectors=1000)
    assert choose_engine("auto", 999, s, None)[0] == "local"
    assert choose_engine("auto", 1000, s, None)[0] == "ray"
    assert choose_engine("auto", 10, Settings(home=tmp_path, ray_address="ray://head:10001"), None)[0] == "ray"
    assert choose_engine("auto", 5000, s, 4) == ("local", "database-side augmentation needs every vector in one "
                                                          "process")
    with pytest.raises(InvalidInput, match="--dba needs every vector"):
        choose_engine("ray", 10, s, 4)
    with pytest.raises(InvalidInput, match="--engine must be auto, local or ray"):
        choose_engine("spark", 10, s, None)


def test_tuning_steps_double_up_to_the_list_count():
    assert nprobe_steps(0) == [1] and nprobe_steps(1) == [1]
    assert nprobe_steps(100) == [1, 2, 4, 8, 16, 32, 64, 100]


def test_a_build_whose_codes_cannot_reach_the_target_recall_says_so_and_what_to_do(tmp_path, settings):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(12_000, 32, seed=4, clusters=20), part_rows=4000)
    said: list[str] = []
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), factory="IVF16,PQ2", settings=settings,
                    step=said.append)
    assert m.tuning["recall_at_10"] < 0.95
    assert any(s.startswith("warning: recall@10 stays below IMSEARCH_TARGET_RECALL 0.95") and
               "IMSEARCH_MEMORY_BUDGET_GB" in s for s in said)
    said.clear()
    build_index(str(tmp_path / "emb"), str(tmp_path / "flat"), factory="IVF16,Flat", settings=settings,
                step=said.append)
    assert not any(s.startswith("warning") for s in said)
