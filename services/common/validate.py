"""Checks of request numbers, the same at every edge (CLI, gRPC, HTTP): each names the field, and quotes at
most a short prefix of what the caller sent."""

from __future__ import annotations

from services.common.errors import InvalidInput

UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
QUOTE = 40  # characters of user input an error message may repeat


def quote(value, limit: int = QUOTE) -> str:
    """repr of user input, cut to a short prefix (an error must not echo a whole body back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def check_range(name: str, value: int, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidInput(f"{name} must be an integer between {lo} and {hi}, got {quote(value)}")
    return value


def check_k(k: int, max_k: int) -> None:
    if not 1 <= k <= max_k:
        raise InvalidInput(f"k must be between 1 and {max_k}, got {quote(k)}")


def check_nprobe(nprobe: int, max_nprobe: int) -> None:
    """A request's nprobe: 0 (the index's tuned value) or 1..max_nprobe (IMSEARCH_MAX_NPROBE)."""
    if not 0 <= nprobe <= max_nprobe:
        raise InvalidInput(f"nprobe must be between 0 (the index's tuned value) and {max_nprobe} "
                           f"(IMSEARCH_MAX_NPROBE), got {quote(nprobe)}")


MAX_QE = 50  # αQE neighbours: each is a stored-vector lookup on every shard


def check_qe(qe: int) -> None:
    if not 0 <= qe <= MAX_QE:
        raise InvalidInput(f"qe must be between 0 and {MAX_QE} (neighbours of query expansion), got {quote(qe)}")


def check_id(name: str, value: int) -> int:
    """A catalogue id: a signed 64-bit integer (faiss ids are int64)."""
    return check_range(name, value, INT64_MIN, INT64_MAX)
