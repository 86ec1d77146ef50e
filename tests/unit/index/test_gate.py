import numpy as np

from services.index import faiss_util
from services.index.gate import MIN_COPIES, QUANTILE, as_indexed, copy_scores, learn, normalised


def pairs(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    originals = normalised(rng.standard_normal((n, 16)).astype(np.float32))
    return originals, originals + noise / 4 * rng.standard_normal((n, 16)).astype(np.float32)


def test_tau_lies_below_all_but_ten_percent_of_the_copies_scores_with_their_originals():
    originals, copies = pairs(400, 0.5)
    g = learn(originals, copies)
    scores = copy_scores(originals, copies)
    assert g.copies == 400 and g.quantile == QUANTILE == 0.10
    assert abs(np.mean(scores < g.tau) - QUANTILE) <= 0.005
    assert g.tau < np.median(scores) - 0.02  # not the middle of the copies: nearly all stay above


def test_harder_copies_learn_a_lower_tau():
    assert learn(*pairs(200, 0.8)).tau < learn(*pairs(200, 0.3)).tau - 0.1


def test_too_few_copies_learn_no_tau():
    assert learn(*pairs(MIN_COPIES - 1, 0.5)) is None
    assert learn(*pairs(MIN_COPIES, 0.5)) is not None


def test_tau_is_learned_against_the_originals_as_the_index_codes_them_since_pq_scores_run_lower():
    originals, copies = pairs(2000, 0.5)
    pq = faiss_util.make_index(16, "IVF8,PQ4x4")
    pq.train(originals)
    coded = as_indexed(pq, originals)
    assert np.abs(coded - originals).max() > 0.05  # 4 bytes a vector: far from exact
    q = normalised(copies)
    pq.add(originals)
    pq.nprobe = 8
    D, I = pq.search(q[:200], 1)
    own = I[:, 0] == np.arange(200)  # the copy found its original first: its score is the index's score for it
    np.testing.assert_allclose(D[own, 0], copy_scores(coded[:200], copies[:200])[own], atol=1e-4)
    assert learn(coded, copies).tau < learn(originals, copies).tau  # τ moves down with the index's scores
    flat = faiss_util.make_index(16, "Flat")
    assert as_indexed(flat, originals) is originals and as_indexed(None, originals) is originals
