import numpy as np

from services.index.gate import MIN_COPIES, QUANTILE, copy_scores, learn


def pairs(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    originals = rng.standard_normal((n, 16)).astype(np.float32)
    return originals, originals + noise * rng.standard_normal((n, 16)).astype(np.float32)


def test_tau_lies_below_all_but_five_percent_of_the_copies_scores_with_their_originals():
    originals, copies = pairs(400, 0.5)
    g = learn(originals, copies)
    scores = copy_scores(originals, copies)
    assert g.copies == 400 and g.quantile == QUANTILE == 0.05
    assert abs(np.mean(scores < g.tau) - 0.05) <= 0.005
    assert g.tau < np.median(scores) - 0.02  # not the middle of the copies: nearly all stay above


def test_harder_copies_learn_a_lower_tau():
    assert learn(*pairs(200, 0.8)).tau < learn(*pairs(200, 0.3)).tau - 0.1


def test_too_few_copies_learn_no_tau():
    assert learn(*pairs(MIN_COPIES - 1, 0.5)) is None
    assert learn(*pairs(MIN_COPIES, 0.5)) is not None
