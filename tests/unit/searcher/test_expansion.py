import numpy as np
import pytest

from services.common.errors import InvalidInput, NotSupported
from services.common.validate import check_qe
from services.index.descriptors import alpha_qe
from services.searcher.expansion import check_same_space, expand, found_ids


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
