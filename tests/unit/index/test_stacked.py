"""Plain-IVF shards searched as one faiss index give what searching each shard and merging gives."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from services.index.manifest import ShardEntry
from services.index.merge import merge_topk
from services.index.shards import LoadedShard, shared_quantizer
from services.index.stacked import stack_shards as stack_with
from tests.helpers import random_unit_vectors

DIM, N = 16, 3000


def shards_of(factory: str, sizes: tuple[int, ...]) -> tuple[list[LoadedShard], np.ndarray]:
    """Shards trained together (one quantizer), as the indexer makes them; ids are not row numbers."""
    x = random_unit_vectors(sum(sizes), DIM, seed=1, clusters=20)
    ids = np.random.default_rng(2).choice(10**12, len(x), replace=False).astype(np.int64)
    trained = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(random_unit_vectors(2000, DIM, seed=8, clusters=20))
    out, start = [], 0
    for n, size in enumerate(sizes):
        ix = faiss.clone_index(trained)
        ix.add_with_ids(x[start:start + size], ids[start:start + size])
        order = np.argsort(ids[start:start + size])
        entry = ShardEntry(shard=n, file="", sha256="", bytes=0, count=size, docs_file="", docs_sha256="")
        uris = np.array([f"img/{i}.jpg" for i in ids[start:start + size]], dtype=object)
        out.append(LoadedShard(entry, ix, ids[start:start + size][order], uris[order]))
        start += size
    return out, x


def stack_shards(shards: list[LoadedShard]):
    """As IndexSearcher stacks them: with the quantizer shared_quantizer finds."""
    return stack_with(shards, shared_quantizer([s.index for s in shards]))


def per_shard(shards: list[LoadedShard], q: np.ndarray, k: int, nprobe: int):
    results = []
    for s in shards:
        D, I = s.index.search(q, k, params=s.params(nprobe, 1.0))
        results.append((s.entry.shard, D, I, s.uris_of(I)))
    return merge_topk(results, k)


@pytest.mark.parametrize("factory", ["IVF32,Flat", "IVF32,PQ8x4", "IVF32,SQ8"])
@pytest.mark.parametrize("nprobe", [1, 4, 32])
def test_the_stack_answers_as_the_shards_merged(factory, nprobe):
    shards, x = shards_of(factory, (1200, 1000, 800))
    q = random_unit_vectors(50, DIM, seed=3, clusters=20)
    want = per_shard(shards, q, 10, nprobe)  # before: stacking moves the shards' lists into the stack
    stacked = stack_shards(shards)
    D, I, S, U = stacked.search(q, 10, nprobe, 1.0)
    np.testing.assert_array_equal(I, want[1])
    np.testing.assert_allclose(D, want[0], rtol=1e-5)
    found = I >= 0  # nprobe 1 may find fewer than k: a missing result has no shard (the merge's says any)
    np.testing.assert_array_equal(S[found], want[2][found])
    assert (S[~found] == -1).all()
    assert U.tolist() == want[3].tolist()
    assert stacked.index.ntotal == N  # every shard's vectors, moved (not copied) into one index
    assert all(s.index.ntotal == 0 for s in shards)
    invlists = faiss.downcast_InvertedLists(stacked.index.invlists)  # renumbered: positions among the ids
    held = np.concatenate([faiss.rev_swig_ptr(invlists.get_ids(i), invlists.list_size(i)).copy()
                           for i in range(stacked.index.nlist) if invlists.list_size(i)])
    assert stacked.by_position and sorted(held.tolist()) == list(range(N))
    row = {int(i): r for r, i in enumerate(np.random.default_rng(2).choice(10**12, N, replace=False))}  # shards_of's
    for s in shards:  # each shard's stored vectors are still its own to read, through the stack
        s.enable_fetch()
        got = s.fetch([int(s.ids[0]), int(shards[(s.entry.shard + 1) % 3].ids[0])])
        assert got[0] is not None and got[1] is None  # another shard's id is not this shard's
        if factory == "IVF32,Flat":  # exact codes: the very vectors added
            np.testing.assert_array_equal(got[0], x[row[int(s.ids[0])]])
            np.testing.assert_array_equal(s.vectors_of(s.ids[:5]), x[[row[int(i)] for i in s.ids[:5]]])
        assert s.vectors_of(s.ids[:5]).shape == (5, DIM)


def test_a_coarse_assignment_made_elsewhere_gives_the_same_answer():
    shards, _ = shards_of("IVF32,Flat", (1500, 1500))
    stacked = stack_shards(shards)
    q = random_unit_vectors(20, DIM, seed=4, clusters=20)
    Dq, Iq = faiss.downcast_index(shards[0].index).quantizer.search(q, 4)
    with_assign = stacked.search(q, 10, 4, 1.0, assign=(Dq, Iq))
    plain = stacked.search(q, 10, 4, 1.0)
    np.testing.assert_array_equal(with_assign[1], plain[1])


def test_fewer_results_than_k_are_missing_rows_and_an_empty_shard_is_fine():
    shards, _ = shards_of("IVF32,Flat", (5, 0, 3))
    stacked = stack_shards(shards)
    D, I, S, U = stacked.search(random_unit_vectors(2, DIM, seed=5), 20, 32, 1.0)
    assert (I[:, :8] >= 0).all() and (I[:, 8:] == -1).all()
    assert (S[:, 8:] == -1).all() and np.isneginf(D[:, 8:]).all() and set(U[:, 8:].ravel()) == {""}
    assert set(S[:, :8].ravel()) == {0, 2}


def test_only_several_plain_ivf_shards_with_one_quantizer_are_stacked():
    one, _ = shards_of("IVF32,Flat", (100,))
    assert stack_shards(one) is None
    flat, _ = shards_of("IDMap,Flat", (100, 100))
    assert stack_shards(flat) is None
    a, _ = shards_of("IVF32,Flat", (300, 300))
    b, _ = shards_of("IVF32,Flat", (300, 300))
    b[1].index = faiss.index_factory(DIM, "IVF32,Flat", faiss.METRIC_INNER_PRODUCT)  # another quantizer
    b[1].index.train(random_unit_vectors(2000, DIM, seed=9))
    assert stack_shards([a[0], b[1]]) is None
