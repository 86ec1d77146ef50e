import numpy as np

from services.searcher.merge import merge_topk


def test_merge_equals_sorting_the_union():
    rng = np.random.default_rng(0)
    k, nq = 5, 4
    per_shard = []
    for s in range(3):
        D = -np.sort(-rng.random((nq, k)), axis=1).astype(np.float32)
        I = rng.integers(s * 1000, s * 1000 + 999, (nq, k))
        per_shard.append((s, D, I))
    merged = merge_topk(per_shard, k)
    for q in range(nq):
        union = sorted(((float(D[q, j]), int(I[q, j]), s) for s, D, I in per_shard for j in range(k)),
                       key=lambda c: -c[0])
        assert merged[q] == union[:k]


def test_missing_results_are_dropped_and_short_lists_allowed():
    D = np.array([[0.5, -np.inf]], np.float32)
    I = np.array([[7, -1]])
    assert merge_topk([(0, D, I)], 3) == [[(0.5, 7, 0)]]


def test_ties_break_on_id_independent_of_shard_order():
    a = (0, np.array([[0.5]], np.float32), np.array([[9]]))
    b = (1, np.array([[0.5]], np.float32), np.array([[3]]))
    assert merge_topk([a, b], 1) == merge_topk([b, a], 1) == [[(0.5, 3, 1)]]


def test_no_shards_no_results():
    assert merge_topk([], 10) == []
