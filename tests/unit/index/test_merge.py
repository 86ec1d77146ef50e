import numpy as np

from services.index.merge import hit_lists, merge_topk


def test_merge_equals_sorting_the_union():
    rng = np.random.default_rng(0)
    k, nq = 5, 4
    per_shard = []
    for s in range(3):
        D = -np.sort(-rng.random((nq, k)), axis=1).astype(np.float32)
        I = rng.integers(s * 1000, s * 1000 + 999, (nq, k))
        per_shard.append((s, D, I))
    D, I, S, _ = merge_topk(per_shard, k)
    for q in range(nq):
        union = sorted(((float(d[q, j]), int(i[q, j]), s) for s, d, i in per_shard for j in range(k)),
                       key=lambda c: -c[0])[:k]
        assert [(float(D[q, j]), int(I[q, j]), int(S[q, j])) for j in range(k)] == union


def test_missing_results_are_dropped_and_short_lists_allowed():
    D = np.array([[0.5, -np.inf]], np.float32)
    I = np.array([[7, -1]])
    merged = merge_topk([(0, D, I)], 3)
    hits = hit_lists(*merged[:3])
    assert [(h.score, h.id, h.shard) for h in hits[0]] == [(0.5, 7, 0)]


def test_ties_break_on_id_independent_of_shard_order():
    a = (0, np.array([[0.5]], np.float32), np.array([[9]]))
    b = (1, np.array([[0.5]], np.float32), np.array([[3]]))
    for shards in ([a, b], [b, a]):
        D, I, S, _ = merge_topk(shards, 1)
        assert (I[0, 0], S[0, 0]) == (3, 1)


def test_no_shards_no_results():
    D, I, S, U = merge_topk([], 10)
    assert I.shape == (0, 10) and hit_lists(D, I, S) == [] and U is None


def test_uris_travel_with_their_hits():
    a = (0, np.array([[0.9, 0.1]], np.float32), np.array([[1, 2]]), np.array([["a1", "a2"]], dtype=object))
    b = (1, np.array([[0.5, 0.4]], np.float32), np.array([[3, 4]]), np.array([["b3", "b4"]], dtype=object))
    D, I, S, U = merge_topk([a, b], 3)
    assert I.tolist() == [[1, 3, 4]] and U.tolist() == [["a1", "b3", "b4"]] and S.tolist() == [[0, 1, 1]]


def test_uris_from_flat_sequences_of_unequal_shards_match_sorting_the_union():
    rng = np.random.default_rng(1)
    nq, widths = 3, [4, 2, 5]
    per_shard = []
    for s, w in enumerate(widths):
        D = -np.sort(-rng.random((nq, w)), axis=1).astype(np.float32)
        I = rng.integers(s * 1000, s * 1000 + 999, (nq, w))
        per_shard.append((s, D, I, [f"u{i}" for i in I.ravel().tolist()]))  # flat, like a repeated field
    D, I, S, U = merge_topk(per_shard, 6)
    assert U.shape == (nq, 6)
    assert U.tolist() == [[f"u{i}" for i in row] for row in I.tolist()]


def test_one_shard_passes_through_with_missing_results_marked():
    D = np.array([[0.8, 0.2, -3.4e38]], np.float32)
    I = np.array([[5, 6, -1]])
    d, i, s, u = merge_topk([(2, D, I, np.array([["a", "b", ""]], dtype=object))], 3)
    assert i.tolist() == [[5, 6, -1]] and s.tolist() == [[2, 2, 2]] and u.tolist() == [["a", "b", ""]]
    assert d[0, 2] == -np.inf and d[0, 0] == np.float32(0.8)


def test_one_ranked_result_gets_the_order_a_merge_of_its_parts_gets():
    """The stacked in-process search (one faiss heap over every shard) and the router's merge order equal scores
    by one rule: by the smaller id, missing results last."""
    from services.index.merge import order_ties

    rng = np.random.default_rng(3)
    D = -np.sort(-rng.integers(0, 4, (50, 8)).astype(np.float32), axis=1)  # few distinct scores: many ties
    I = rng.permutation(1000)[:400].reshape(50, 8).astype(np.int64)
    I[:5, -2:], D[:5, -2:] = -1, -np.inf  # fewer than k results
    parts = [(0, D[:, 0::2], I[:, 0::2]), (1, D[:, 1::2], I[:, 1::2])]  # each part ranked, as a shard's is
    want_D, want_I, _, _ = merge_topk(parts, 8)
    got_D, got_I = D.copy(), I.copy()
    missing = order_ties(got_D, got_I)
    assert not np.array_equal(got_I, I)  # ties were out of id order, and are not now
    assert np.array_equal(got_I, want_I) and np.array_equal(got_D, want_D)
    assert np.array_equal(missing, want_I < 0)
