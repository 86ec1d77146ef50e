"""The projection as faiss applies it is the stored affine map followed by L2, batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidInput
from services.index import projection


def test_apply_is_the_affine_map_then_unit_length_in_every_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 64)).astype(np.float32)
    p = projection.train(x, 16)
    y = x @ p.matrix.T + p.bias
    expected = y / np.linalg.norm(y, axis=1, keepdims=True)
    np.testing.assert_allclose(p.apply(x), expected, atol=1e-5)
    np.testing.assert_allclose(p.apply(x, batch=7), expected, atol=1e-5)  # batches join up in order


def test_apply_survives_a_round_trip_through_its_bytes_and_refuses_another_width():
    x = np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32)
    p = projection.train(x, 8, power=0.5)
    again = projection.Projection.from_bytes(p.to_bytes())
    np.testing.assert_allclose(again.apply(x), p.apply(x), atol=1e-6)
    with pytest.raises(InvalidInput, match="32-d"):
        p.apply(x[:, :16])
