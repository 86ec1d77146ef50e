"""Each metric against a case computed by hand."""

import numpy as np
import pytest

from services.eval import metrics as m


def test_average_precision_counts_missed_relevant_items():
    # relevant at ranks 1 and 3; a third relevant item never returned: (1/1 + 2/3) / 3
    assert m.average_precision([1, 0, 1, 0, 0], 3) == pytest.approx((1 + 2 / 3) / 3)
    assert m.average_precision([1, 1], 2) == 1.0
    assert m.average_precision([0, 0], 2) == 0.0


def test_average_precision_rejects_impossible_input():
    with pytest.raises(ValueError):
        m.average_precision([1, 1, 1], 2)
    with pytest.raises(ValueError):
        m.average_precision([0], 0)


def test_ap_at_k_divides_by_min_of_relevant_and_k():
    assert m.average_precision_at_k([1, 0, 1, 1], 5, k=3) == pytest.approx((1 + 2 / 3) / 3)
    assert m.average_precision_at_k([1, 1, 0, 0], 10, k=2) == 1.0  # a perfect top 2
    assert m.average_precision_at_k([0, 1], 1, k=2) == 0.5
    # the full-ranking AP of the same list is lower: 8 relevant items were never returned
    assert m.average_precision([1, 1, 0, 0], 10) == pytest.approx(0.2)


def test_precision_and_recall_at_k():
    assert m.precision_at_k([1, 0, 1, 0], 4) == 0.5
    assert m.precision_at_k([1], 5) == 0.2  # a short list does not inflate precision
    assert m.recall_at_k([1, 0, 1], 4, 2) == 0.25


def test_nmrr_hand_cases():
    # NG = 2, GTM = 2 -> K = min(8, 4) = 4; denominator 1.25*4 - 0.5 - 1 = 3.5
    assert m.nmrr([1, 1, 0, 0], 2, 2) == 0.0
    assert m.nmrr([0, 0, 0, 0], 2, 2) == pytest.approx(1.0)
    # ranks 1 and 6; 6 > K so it counts 1.25*K = 5: AVR 3, MRR 1.5
    assert m.nmrr([1, 0, 0, 0, 0, 1], 2, 2) == pytest.approx(1.5 / 3.5)
    # K depends on GTM: NG = 1, GTM = 1 -> K = 2; rank 2: AVR 2, MRR 1, denominator 2.5-1 = 1.5
    assert m.nmrr([0, 1], 1, 1) == pytest.approx(1 / 1.5)
    assert m.anmrr([[1, 1], [0, 0]], [2, 2]) == pytest.approx(0.5)


def test_micro_ap_pools_and_sorts_all_predictions():
    scores = [0.6, 0.9, 0.7, 0.8]
    correct = [0, 1, 1, 0]  # sorted: correct, wrong, correct, wrong
    assert m.micro_ap(scores, correct, 3) == pytest.approx((1 + 2 / 3) / 3)
    # a distractor scored above every true copy costs precision
    assert m.micro_ap([0.95, 0.9], [0, 1], 1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        m.micro_ap([0.5], [0], 0)


def test_revisited_ap_removes_junk_and_interpolates():
    # kept ranking a, b, c (j is junk); positives at ranks 0 and 2
    ap = m.revisited_ap(["a", "j", "b", "c"], {"a", "c"}, {"j"})
    assert ap == pytest.approx((1 + 1) / 4 + (1 / 2 + 2 / 3) / 4)
    assert np.isnan(m.revisited_ap(["a"], [], []))


def test_revisited_map_setups():
    ranking = ["e", "h", "x", "j"]
    gnd = [{"easy": ["e"], "hard": ["h"], "junk": ["j"]}]
    out = m.revisited_map([ranking], gnd)
    assert out["easy"] == pytest.approx(1.0)  # h ignored as junk
    assert out["medium"] == pytest.approx(1.0)  # e, h at ranks 0, 1
    assert out["hard"] == pytest.approx(1.0)  # e ignored, h first
    out = m.revisited_map([["x", "h", "e"]], gnd)
    # kept x, h: h at rank 1 -> precision 0/1 before it and 1/2 at it, averaged
    assert out["hard"] == pytest.approx((0 + 1 / 2) / 2)


def test_interpolated_precision_recall():
    pr = m.interpolated_pr([1, 0, 1], 2, np.array([0.0, 0.5, 1.0]))
    assert pr == pytest.approx([1.0, 1.0, 2 / 3])
    assert m.interpolated_pr([0, 0], 2, np.array([0.5]))[0] == 0.0
