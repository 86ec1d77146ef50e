"""Gated αQE, the default, through real processes: the τ an index learns at build from the gate sample beside its
embeddings (carried by add, delete and rollback), a copy searched plain and a query far from its best hit
expanded, qe=0 / qe=N, a batch answering as single searches do, Info and the HTTP edge saying so, and
IMSEARCH_QE_GATE overriding the learned τ."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from services.common.config import Settings
from services.common.errors import Corrupt
from services.common.store import LocalStore
from services.embedder import gatesample
from services.embedder.embeddings import read_embeddings
from services.index.gate import QUANTILE, copy_scores
from services.index.loaded import open_version
from services.index.versions import load_current, rollback
from services.indexer.build import build_index
from services.indexer.update import add_to_index, delete_from_index
from services.searcher.client import SearchClient
from tests.helpers import random_unit_vectors, write_fake_embeddings

DIM, N, K, PCA = 32, 3000, 10, 16


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    x = random_unit_vectors(N, DIM, seed=5, clusters=30)
    spec = write_fake_embeddings(tmp / "emb", x)
    rng = np.random.default_rng(6)  # the sample `imsearch embed` writes: catalogue images and a copy of each
    originals = x[rng.choice(N, 200, replace=False)]
    gatesample.write(LocalStore(tmp / "emb"), originals, unit(originals + 0.12 * rng.standard_normal(originals.shape)),
                     spec.fingerprint)
    settings = Settings(home=tmp / "h", pca_dim=PCA)
    m = build_index(str(tmp / "emb"), str(tmp / "idx"), shards=2, factory="Flat", settings=settings)
    space = open_version(LocalStore(tmp / "idx"), m, tmp / "cache").projection.apply  # the index's own space
    row = {int(i): r for r, i in enumerate(read_embeddings(LocalStore(tmp / "emb")).ids)}
    return tmp, x, m, space, row


def far_and_near(x: np.ndarray, space, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Queries whose best hit (exact, in the index's space) scores well below τ, and copies well above it."""
    rng = np.random.default_rng(7)
    db = space(x)
    candidates = unit(rng.standard_normal((400, DIM)))
    best = (space(candidates) @ db.T).max(1)
    far = candidates[best < tau - 0.05][:6]
    near = unit(x[:6] + 0.02 * rng.standard_normal((6, DIM)))
    assert len(far) == 6 and ((space(near) @ db.T).max(1) > tau + 0.05).all()
    return far, near


def test_the_build_learns_tau_from_the_gate_sample_in_the_indexs_own_space(catalogue):
    tmp, x, m, space, _ = catalogue
    sample = gatesample.read(LocalStore(tmp / "emb"))
    want = np.quantile(copy_scores(space(sample.originals), space(sample.copies)), QUANTILE)
    assert m.qe_gate is not None and m.qe_gate.copies == 200 and m.dim == PCA
    assert abs(m.qe_gate.tau - want) < 1e-4
    model_space = np.quantile(copy_scores(sample.originals, sample.copies), QUANTILE)
    assert abs(model_space - want) > 0.01  # the projection moves it: learned where the index searches


def test_tau_is_carried_by_add_and_delete_and_rollback_returns_the_version_before(catalogue, tmp_path):
    tmp, x, m, _, _ = catalogue
    idx = tmp_path / "idx"
    settings = Settings(home=tmp_path / "h", pca_dim=PCA)
    build_index(str(tmp / "emb"), str(idx), shards=2, factory="Flat", settings=settings)
    write_fake_embeddings(tmp_path / "more", random_unit_vectors(50, DIM, seed=9), first_row=N)
    added, n_added, _ = add_to_index(str(idx), str(tmp_path / "more"), settings)
    gone = read_embeddings(LocalStore(tmp / "emb")).ids[:3].tolist()
    deleted, removed, _ = delete_from_index(str(idx), gone, settings)
    assert (n_added, removed) == (50, 3) and deleted.count == N + 50 - 3
    assert added.qe_gate == deleted.qe_gate == m.qe_gate is not None
    rollback(LocalStore(idx), settings.home / "cache")
    back = load_current(LocalStore(idx))
    assert back.version == added.version and back.qe_gate == m.qe_gate


def test_embeddings_without_a_gate_sample_build_an_index_that_never_expands_by_default(tmp_path):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(500, DIM, seed=3))
    said = []
    m = build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=1, factory="Flat",
                    settings=Settings(home=tmp_path / "h", pca_dim=0), step=said.append)
    assert m.qe_gate is None
    assert any("no gate sample beside these embeddings" in line for line in said), said


def test_a_damaged_gate_sample_fails_the_build_naming_it_rather_than_learning_from_it(tmp_path):
    spec = write_fake_embeddings(tmp_path / "emb", random_unit_vectors(500, DIM, seed=3))
    v = random_unit_vectors(40, DIM, seed=4)
    gatesample.write(LocalStore(tmp_path / "emb"), v, v, spec.fingerprint)
    data = bytearray((tmp_path / "emb" / gatesample.SAMPLE_KEY).read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "emb" / gatesample.SAMPLE_KEY).write_bytes(bytes(data))
    with pytest.raises(Corrupt, match="gate-sample.npz does not match the checksum"):
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=1, factory="Flat",
                    settings=Settings(home=tmp_path / "h", pca_dim=0))


def test_by_default_a_copy_is_searched_plain_and_a_query_far_from_its_best_hit_is_expanded(catalogue, start_stack):
    tmp, x, m, space, row = catalogue
    far, near = far_and_near(x, space, m.qe_gate.tau)
    stack = start_stack(tmp / "idx", gateway=True, redis=True, env={"IMSEARCH_HOME": str(tmp / "h")})
    with SearchClient(stack.router.address) as client:
        default = [client.search(q, k=K) for q in (*near, *far)]
        off = [client.search(q, k=K, qe=0) for q in (*near, *far)]  # after the same queries unset: not their key
        forced = [client.search(q, k=K, qe=10) for q in (*near, *far)]
        batch = client.search_batch([*near, *far], k=K)
        columns = client.search_columns([*near, *far], k=K)
        info = client.info()
    db = space(x)
    assert [r.expanded for r in default] == [False] * 6 + [True] * 6
    assert not any(r.expanded for r in off) and all(r.expanded for r in forced)
    for d, o, f, q in zip(default, off, forced, (*near, *far)):
        ids = [h.id for h in d.hits]
        if d.expanded:  # ranked as qe=10 ranks, the plain answer's best hit kept first, scored by the query
            assert ids == [h.id for h in f.hits] and ids[0] == o.hits[0].id and d.hits[0].score == o.hits[0].score
            stored = db[[row[i] for i in ids]]
            np.testing.assert_allclose([h.score for h in d.hits], stored @ space(q[None])[0], atol=1e-5)
        else:  # exactly the plain answer
            assert ids == [h.id for h in o.hits] and [h.score for h in d.hits] == [h.score for h in o.hits]
    assert any([h.id for h in d.hits] != [h.id for h in o.hits] for d, o in zip(default[6:], off[6:]))
    assert [[h.id for h in r.hits] for r in batch] == [[h.id for h in r.hits] for r in default]
    assert [r.expanded for r in batch] == [r.expanded for r in default]
    assert columns.expanded.tolist() == [r.expanded for r in default]
    np.testing.assert_allclose(columns.scores, [[h.score for h in r.hits] for r in default], atol=1e-6)
    assert info.has_qe_gate and abs(info.qe_gate - m.qe_gate.tau) < 1e-6 and info.qe_neighbours == 10
    assert info.qe_gate_from == "learned at build from 200 synthetic copies"
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        plain = http.post("/v1/search", json={"vector": near[0].tolist(), "k": K}).json()
        expanded = http.post("/v1/search", json={"vector": far[0].tolist(), "k": K}).json()
        cached = http.post("/v1/search", json={"vector": far[0].tolist(), "k": K}).json()
        off_http = http.post("/v1/search", json={"vector": far[0].tolist(), "k": K, "qe": 0}).json()
        index = http.get("/v1/index").json()
    assert plain["expanded"] is False and expanded["expanded"] is True
    assert cached["cached"] and cached["expanded"] is True and cached["results"] == expanded["results"]
    assert off_http["expanded"] is False and [r["id"] for r in off_http["results"]] == [h.id for h in off[6].hits]
    assert [r["id"] for r in expanded["results"]] == [h.id for h in default[6].hits]
    assert index["query_expansion"]["tau"] == pytest.approx(m.qe_gate.tau, abs=1e-6)


def test_imsearch_qe_gate_overrides_the_learned_tau(catalogue, start_stack):
    tmp, x, m, space, _ = catalogue
    far, near = far_and_near(x, space, m.qe_gate.tau)
    stack = start_stack(tmp / "idx", env={"IMSEARCH_HOME": str(tmp / "h"), "IMSEARCH_QE_GATE": "-1"})
    with SearchClient(stack.router.address) as client:
        assert not any(client.search(q, k=K).expanded for q in far)  # -1: never
        assert client.search(far[0], k=K, qe=5).expanded  # a request may still ask
        info = client.info()
    assert info.qe_gate == -1 and info.qe_gate_from == "IMSEARCH_QE_GATE"


def test_a_shard_killed_under_gated_expansion_costs_flagged_partial_answers_not_errors(catalogue, start_stack):
    """With one shard left, a merge hands out the survivor's reply buffers (read-only): the expansion once wrote
    into them and every expanded query failed with a plain INTERNAL (a 500 at the gateway)."""
    tmp, x, m, space, _ = catalogue
    far, near = far_and_near(x, space, m.qe_gate.tau)
    stack = start_stack(tmp / "idx", gateway=True, env={"IMSEARCH_HOME": str(tmp / "h"),
                                                         "IMSEARCH_SHARD_TIMEOUT_S": "1"})
    with SearchClient(stack.router.address) as client:
        assert client.search(far[0], k=K).coverage == 1.0
        stack.shards[1][0].kill()
        answers = [client.search(q, k=K) for q in (*far[1:], *near[1:])]
        batch = client.search_batch(list(far), k=K)
    assert [(r.coverage, r.expanded) for r in answers] == [(0.5, True)] * 5 + [(0.5, False)] * 5
    assert all(len(r.hits) == K and all(h.shard == 0 for h in r.hits) for r in answers)
    assert all(r.coverage == 0.5 and r.expanded for r in batch)
    with httpx.Client(base_url=stack.gateway.url, timeout=30) as http:
        reply = http.post("/v1/search", json={"vector": far[0].tolist(), "k": K})
    assert reply.status_code == 200 and reply.json()["partial"] and reply.json()["expanded"], reply.text
