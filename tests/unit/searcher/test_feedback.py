"""Rocchio relevance feedback and the feedback marks users type."""

import numpy as np
import pytest

from services.cli import join_feedback
from services.common.errors import InvalidInput
from services.searcher.feedback import MAX_FEEDBACK, parse_marks, rocchio


def test_rocchio_hand_case():
    q = np.array([1.0, 0.0, 0.0])
    rel = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    bad = np.array([[1.0, 0.0, 0.0]])
    out = rocchio(q, rel, bad)  # 1*q + 0.75*(0, .5, .5) - 0.15*(1, 0, 0) = (0.85, 0.375, 0.375)
    expected = np.array([0.85, 0.375, 0.375])
    assert out == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)
    assert np.linalg.norm(out) == pytest.approx(1.0, abs=1e-6)
    assert rocchio(q, np.zeros((0, 3)), np.zeros((0, 3))) == pytest.approx(q)  # no marks: the query itself


def test_rocchio_refuses_a_cancelled_query():
    q = np.array([1.0, 0.0])
    with pytest.raises(InvalidInput, match="cancelled"):
        rocchio(q, np.zeros((0, 2)), np.array([[1.0, 0.0]]), gamma=1.0)


def test_parse_marks():
    assert parse_marks(["+12 +40 -7"]) == ([12, 40], [7])
    assert parse_marks(["+1,-2", "+3"]) == ([1, 3], [2])
    assert parse_marks([]) == ([], [])
    for bad in (["12"], ["+x"], ["+1 -1"], ["+" + " +".join(map(str, range(MAX_FEEDBACK + 1)))]):
        with pytest.raises(InvalidInput):
            parse_marks(bad)


def test_cli_joins_the_documented_feedback_form():
    argv = ["search", "idx", "q.jpg", "--feedback", "+12", "+40", "-7", "-k", "5"]
    assert join_feedback(argv) == ["search", "idx", "q.jpg", "--feedback", "+12 +40 -7", "-k", "5"]
    quoted = ["search", "idx", "q.jpg", "--feedback", "+12 -7"]
    assert join_feedback(quoted) == quoted
