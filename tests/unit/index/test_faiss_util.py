"""Deleting ids from every kind of index the builder makes, against exact search on what is left."""

import numpy as np
import pytest

from services.index import faiss_util


@pytest.mark.parametrize("factory", ["IVF16,PQ8,Refine(SQ8)", "HNSW16", "IVF16,PQ8", "Flat"])
def test_remove_ids_hides_them_and_keeps_the_rest(factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(3000, dtype=np.int64) * 7 + 100
    index = faiss_util.make_index(32, factory)
    index.train(x)
    faiss_util.add(index, x, ids)
    gone = ids[[0, 5, 2999]]
    index, removed = faiss_util.remove_ids(index, np.append(gone, 1))  # 1: an id it never held
    assert removed == 3 and index.ntotal == 2997
    params, _keep = faiss_util.search_parameters(index, nprobe=16, k_factor=4)
    _, I = index.search(x[[0, 5, 2999, 1, 2]], 1, params=params)
    assert not np.isin(I, gone).any()
    assert I[3:, 0].tolist() == ids[[1, 2]].tolist()  # the rest is still found (by itself)
