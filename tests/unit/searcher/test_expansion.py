import math

import numpy as np
import pytest

from services.common.config import Settings
from services.common.errors import InvalidInput, NotSupported
from services.common.validate import check_qe
from services.index.descriptors import alpha_qe
from services.index.gate import QeGate
from services.index.manifest import Manifest
from services.searcher.expansion import (
    QePlan,
    check_same_space,
    expand,
    found_ids,
    gate,
    keep_best_first,
    plan,
    rescore,
    to_expand,
    unknown,
)


def test_missing_first_round_hits_weigh_nothing_and_the_rest_weigh_by_similarity_cubed():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4)).astype(np.float32)
    stored = rng.standard_normal((3, 4)).astype(np.float32)
    ids = np.array([[7, 8], [9, -1]])
    scores = np.array([[0.9, 0.5], [0.8, 0.0]], np.float32)
    assert found_ids(ids) == [7, 8, 9]
    got = expand(q, ids, scores, stored)
    want = alpha_qe(q, np.stack([stored[:2], np.stack([stored[2], np.zeros(4, np.float32)])]), scores)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_stored_vectors_of_another_width_are_refused_not_mixed():
    for what in ("query expansion", "relevance feedback"):
        with pytest.raises(NotSupported, match=f"{what} on a projected index needs the router started with --index"):
            check_same_space(np.ones((1, 4), np.float32), np.ones((1, 8), np.float32), what)
    check_same_space(np.zeros((0, 4), np.float32), np.ones((1, 8), np.float32), "query expansion")  # none fetched


@pytest.mark.parametrize("qe", [-1, 51])
def test_qe_out_of_range_names_the_field(qe):
    with pytest.raises(InvalidInput, match="qe must be between 0 and 50"):
        check_qe(qe)


def test_a_query_expands_only_when_its_best_hit_scores_below_tau_and_never_without_a_hit():
    ids = np.array([[4, 5], [6, 7], [-1, -1]])
    scores = np.array([[0.59, 0.5], [0.61, 0.6], [-np.inf, -np.inf]], np.float32)
    assert to_expand(ids, scores, 0.6).tolist() == [True, False, False]


def test_a_query_by_catalogue_id_is_gated_by_its_best_hit_but_itself():
    ids = np.array([[4, 5], [6, 7], [8, 9]])
    scores = np.array([[1.0, 0.5], [1.0, 0.9], [0.55, 0.5]], np.float32)
    own = np.array([4, 6, -1])  # the first two query by id (and find themselves first); the third is an image
    assert to_expand(ids, scores, 0.6, own).tolist() == [True, False, True]
    assert to_expand(ids, scores, 0.6).tolist() == [False, False, True]  # read from the first hit, it never would


def test_an_unset_qe_is_the_gated_default_zero_is_off_and_n_expands_every_query():
    s = Settings(qe_neighbours=10)
    assert plan(None, 0.64, s) == QePlan(10, 0.64)
    assert plan(None, None, s) is None  # no τ: no expansion unless asked
    assert plan(None, 0.64, Settings(qe_neighbours=0)) is None
    assert plan(0, 0.64, s) is None
    assert plan(3, None, s) == QePlan(3, math.inf)
    with pytest.raises(InvalidInput, match="qe must be between 0 and 50"):
        plan(51, 0.64, s)


def test_imsearch_qe_gate_overrides_the_tau_a_version_learned():
    m = Manifest(version="v", created_at="", model={}, dim=4, factory="Flat", params={}, count=1, shards=[],
                 qe_gate=QeGate(tau=0.64, copies=256))
    assert gate(m, Settings()) == (0.64, "learned at build from 256 synthetic copies")
    assert gate(m, Settings(qe_gate=0.8)) == (0.8, "IMSEARCH_QE_GATE")
    assert gate(m.model_copy(update={"qe_gate": None}), Settings()) == (None, "")


def test_an_expanded_querys_hits_are_scored_by_the_query_itself_from_its_first_round_or_the_stored_vector():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    known = {3: np.array([0.6, 0.8], np.float32), 5: np.array([1.0, 0.0], np.float32)}
    first_ids, first_scores = np.array([[5, 7], [7, 8]]), np.array([[0.93, 0.5], [0.4, 0.3]], np.float32)
    ids = np.array([[3, 5], [5, -1]])
    scores = np.array([[0.99, 0.98], [0.97, -np.inf]], np.float32)  # the expanded query's own scores
    assert unknown(np.array([[3, 7, 9], [7, 9, -1]]), known, first_ids) == [9]  # 7: the first round has it
    # 5 in query 0's first round: its score there (the index's, as a plain answer gives it); the rest by vector
    np.testing.assert_allclose(rescore(q, ids, scores, known, first_ids, first_scores), [[0.6, 0.93], [0.0, -np.inf]])


def test_an_expanded_answer_keeps_the_first_rounds_best_hit_first_and_not_twice():
    first = [np.array([[0.9, 0.5], [0.8, 0.7]], np.float32), np.array([[4, 5], [6, 7]]), np.array([[0, 1], [1, 0]])]
    second = [np.array([[0.5, 0.9, 0.4], [0.3, 0.2, 0.1]], np.float32), np.array([[5, 4, 8], [9, 3, 2]]),
              np.array([[1, 0, 1], [0, 0, 1]])]
    scores, ids, shards = keep_best_first(first, second)
    assert ids.tolist() == [[4, 5, 8], [6, 9, 3]]  # 4 moved first (once); 6 was not in the expanded round: it leads
    np.testing.assert_allclose(scores, [[0.9, 0.5, 0.4], [0.8, 0.3, 0.2]])
    assert shards.tolist() == [[0, 1, 1], [1, 0, 0]]
