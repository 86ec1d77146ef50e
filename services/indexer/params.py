"""Index parameters chosen from the data size and a memory budget (autofaiss-style).

Flat for small N (exact); IVF-Flat while the full vectors fit the budget; above that
IVF-PQ with an SQ8 re-ranking stage (DESIGN.md: PQ alone never reaches recall 0.95); when even
SQ8 codes do not fit, IVF-PQ codes in RAM re-ranked from the full vectors kept on disk (the
searcher memory-maps them: 8·k vectors read a query); plain IVF-PQ only when disk re-ranking is
turned off: PQ codes alone lose most of the recall at the models' width, and re-ranked they reach the target
(README Performance, "memory against recall", bench_memory) — so every automatic choice can reach it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from services.common.errors import InvalidInput
from services.index.manifest import DISK_RERANK_KIND

ID_BYTES = 8
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this
PQ_TRAIN_POINTS = 256 * MIN_POINTS_PER_CENTROID


@dataclass(frozen=True)
class IndexParams:
    factory: str
    kind: str  # flat | ivf-flat | ivf-pq-sq8 | ivf-pq-disk | ivf-pq
    nlist: int = 0
    pq_m: int = 0
    k_factor: int = 1  # re-ranking: candidates fetched per result
    bytes_per_vector: int = 0  # in RAM
    disk_bytes_per_vector: int = 0  # memory-mapped from the shard file (ivf-pq-disk: the full vectors)

    def as_dict(self) -> dict:
        return asdict(self)


def choose_nlist(n: int) -> int:
    """About 4·sqrt(N) lists (the cheap end of 4-16·sqrt(N): k-means cost grows with nlist² here,
    and nprobe tuning recovers recall), fewer when N is too small to train them (39 points a list)."""
    return max(1, int(min(math.ceil(4 * math.sqrt(n)), n / MIN_POINTS_PER_CENTROID)))


def choose_pq_m(dim: int, max_bytes: float) -> int:
    """Largest PQ sub-quantizer count dividing dim (at most 64 bytes) that fits max_bytes."""
    for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if dim % m == 0 and m <= max_bytes:
            return m
    raise InvalidInput(f"memory budget too small: not even 1 byte per vector for dim {dim}")


def choose_params(n: int, dim: int, budget_bytes: float, flat_max: int = 20_000,
                  disk_rerank: bool = True) -> IndexParams:
    if n <= 0:
        raise InvalidInput("cannot choose index parameters for an empty catalogue")
    if n <= flat_max:
        return IndexParams("Flat", "flat", bytes_per_vector=4 * dim + ID_BYTES)
    nlist = choose_nlist(n)
    per_vector = budget_bytes / n
    if 4 * dim + ID_BYTES <= per_vector:
        return IndexParams(f"IVF{nlist},Flat", "ivf-flat", nlist, bytes_per_vector=4 * dim + ID_BYTES)
    if n < PQ_TRAIN_POINTS:
        raise InvalidInput(f"budget too small for IVF-Flat and {n} vectors are too few to train PQ codes "
                           f"(need {PQ_TRAIN_POINTS}); raise the memory budget")
    overhead = 2 * ID_BYTES  # IVF list ids + the IDMap wrapper's ids (Refine has no add_with_ids)
    if per_vector - overhead - dim >= 1:
        m = choose_pq_m(dim, per_vector - overhead - dim)
        return IndexParams(f"IVF{nlist},PQ{m},Refine(SQ8)", "ivf-pq-sq8", nlist, m, k_factor=8,
                           bytes_per_vector=m + dim + overhead)
    if disk_rerank and per_vector - overhead >= 1:
        m = choose_pq_m(dim, per_vector - overhead)
        return IndexParams(f"IVF{nlist},PQ{m},Refine(Flat)", DISK_RERANK_KIND, nlist, m, k_factor=8,
                           bytes_per_vector=m + overhead, disk_bytes_per_vector=4 * dim)
    m = choose_pq_m(dim, per_vector - ID_BYTES)
    return IndexParams(f"IVF{nlist},PQ{m}", "ivf-pq", nlist, m, bytes_per_vector=m + ID_BYTES)


def params_from_factory(factory: str) -> IndexParams:
    """Params for a user-given factory string (--index-factory)."""
    nlist = 0
    for part in factory.split(","):
        digits = part[3:].split("_")[0]
        if part.startswith("IVF") and digits.isdigit():
            nlist = int(digits)
    refine = "Refine" in factory or "RFlat" in factory
    return IndexParams(factory, "custom", nlist, k_factor=8 if refine else 1)
