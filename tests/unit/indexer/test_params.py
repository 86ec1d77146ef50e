import math

import pytest

from services.common.errors import InvalidInput
from services.indexer.params import choose_nlist, choose_params, params_from_factory

GB = 2**30


def test_small_catalogues_are_exact():
    p = choose_params(5_000, 1280, 8 * GB)
    assert p.kind == "flat" and p.factory == "Flat"


@pytest.mark.parametrize("n", [30_000, 100_000, 1_000_000, 50_000_000])
def test_nlist_is_within_4_to_16_sqrt_n(n):
    nlist = choose_nlist(n)
    assert 4 * math.sqrt(n) <= nlist <= 16 * math.sqrt(n)
    assert n / nlist >= 39  # trainable


def test_ivf_flat_while_the_vectors_fit():
    p = choose_params(1_000_000, 128, 8 * GB)
    assert p.kind == "ivf-flat" and p.factory == f"IVF{choose_nlist(1_000_000)},Flat"


def test_pq_with_sq8_reranking_when_memory_is_short():
    p = choose_params(1_000_000, 1280, 2 * GB)  # 5 GB of floats do not fit 2 GB
    assert p.kind == "ivf-pq-sq8" and "Refine(SQ8)" in p.factory
    assert 1280 % p.pq_m == 0 and p.k_factor > 1
    assert p.bytes_per_vector * 1_000_000 <= 2 * GB


def test_pq_reranked_from_disk_when_not_even_sq8_codes_fit():
    p = choose_params(10_000_000, 1280, 1 * GB)  # 107 B a vector: PQ alone would be the only choice in RAM
    assert p.kind == "ivf-pq-disk" and p.factory.endswith(",Refine(Flat)") and p.k_factor > 1
    assert 1280 % p.pq_m == 0 and p.bytes_per_vector * 10_000_000 <= 1 * GB
    assert p.disk_bytes_per_vector == 4 * 1280


def test_plain_pq_only_when_disk_reranking_is_turned_off():
    p = choose_params(10_000_000, 1280, 1 * GB, disk_rerank=False)
    assert p.kind == "ivf-pq" and 1280 % p.pq_m == 0 and p.k_factor == 1
    assert p.bytes_per_vector * 10_000_000 <= 1 * GB


def test_empty_and_impossible_budgets_are_clear_errors():
    with pytest.raises(InvalidInput, match="empty"):
        choose_params(0, 128, GB)
    with pytest.raises(InvalidInput, match="budget"):
        choose_params(10_000_000, 1280, 1_000)


def test_params_from_factory():
    assert params_from_factory("IVF256,Flat").nlist == 256
    assert params_from_factory("OPQ16,IVF1024_HNSW32,PQ16,Refine(SQ8)").nlist == 1024
    assert params_from_factory("IVF64,PQ8,RFlat").k_factor > 1
    assert params_from_factory("Flat").nlist == 0
