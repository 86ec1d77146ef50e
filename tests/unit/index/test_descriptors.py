import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.index.descriptors import alpha_qe, dba


def test_alpha_qe_hand_case():
    q = np.array([[1.0, 0.0]], np.float32)
    nb = np.array([[[0.0, 1.0], [0.6, 0.8]]], np.float32)
    sims = np.array([[-0.2, 0.5]])  # a negative similarity gets no weight
    out = alpha_qe(q, nb, sims, alpha=2)  # (1, 0) + 0.25 * (0.6, 0.8) = (1.15, 0.2)
    expected = np.array([1.15, 0.2]) / np.hypot(1.15, 0.2)
    assert out[0] == pytest.approx(expected, abs=1e-6)


def test_dba_pulls_each_vector_towards_its_neighbours():
    x = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    out = dba(x, 1, alpha=1)
    # x0's nearest other is x1 (sim 0.8): x0 + 0.8 * x1
    expected = x[0] + 0.8 * x[1]
    assert out[0] == pytest.approx(expected / np.linalg.norm(expected), abs=1e-6)
    assert np.linalg.norm(out, axis=1) == pytest.approx(np.ones(4), abs=1e-6)
    with pytest.raises(InvalidInput):
        dba(x, 4)
