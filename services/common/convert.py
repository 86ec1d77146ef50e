"""Conversions between protobuf messages and numpy arrays / Hits."""

from __future__ import annotations

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.errors import InvalidInput
from services.common.hits import Hit


def vectors_from_proto(vectors, dim: int | None = None) -> np.ndarray:
    """Repeated Vector -> (n, d) float32; ragged, empty or wrong-dimension input is refused."""
    if not vectors:
        raise InvalidInput("no query vectors given")
    lengths = {len(v.values) for v in vectors}
    if len(lengths) != 1:
        raise InvalidInput(f"query vectors have different lengths: {sorted(lengths)}")
    d = lengths.pop()
    if dim is not None and d != dim:
        raise InvalidInput(f"query vectors have dim {d}, the index takes {dim}-d vectors")
    return np.array([v.values for v in vectors], dtype=np.float32).reshape(len(vectors), d)


def vectors_to_proto(x: np.ndarray) -> list[pb.Vector]:
    return [pb.Vector(values=row) for row in np.asarray(x, np.float32).tolist()]


def hits_to_proto(hits: list[Hit]) -> pb.HitList:
    return pb.HitList(hits=[pb.Hit(id=h.id, uri=h.uri, score=h.score, shard=h.shard) for h in hits])


def hits_from_proto(hit_list: pb.HitList) -> list[Hit]:
    return [Hit(h.score, h.id, h.shard, h.uri) for h in hit_list.hits]


def pack_queries(x: np.ndarray) -> tuple[bytes, int]:
    x = np.ascontiguousarray(x, dtype="<f4")
    return x.tobytes(), x.shape[1]


def unpack_queries(data: bytes, dim: int, expected_dim: int | None = None) -> np.ndarray:
    if dim == 0 or not data or len(data) % (4 * dim):
        raise InvalidInput(f"queries: {len(data)} bytes is not a whole number of {dim}-d float32 vectors")
    if expected_dim is not None and dim != expected_dim:
        raise InvalidInput(f"query vectors have dim {dim}, the index takes {expected_dim}-d vectors")
    return np.frombuffer(data, dtype="<f4").reshape(-1, dim)


def pack_results(D: np.ndarray, I: np.ndarray, uris: np.ndarray) -> dict:
    return {"scores": np.ascontiguousarray(D, "<f4").tobytes(), "ids": np.ascontiguousarray(I, "<i8").tobytes(),
            "uris": uris.ravel().tolist()}


def unpack_results(reply, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    D = np.frombuffer(reply.scores, dtype="<f4").reshape(n, -1)
    I = np.frombuffer(reply.ids, dtype="<i8").reshape(n, -1)
    uris = np.array(reply.uris, dtype=object).reshape(I.shape)
    return D, I, uris


def pack_assign(Dq: np.ndarray, Iq: np.ndarray) -> dict:
    return {"assign": np.ascontiguousarray(Iq, "<i8").tobytes(),
            "assign_scores": np.ascontiguousarray(Dq, "<f4").tobytes()}


def unpack_assign(request, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The router's coarse assignment carried by a ShardSearchRequest, or None."""
    if not request.assign:
        return None
    if len(request.assign) % (8 * n) or len(request.assign_scores) * 2 != len(request.assign):
        raise InvalidInput("coarse assignment does not match the number of queries")
    Iq = np.frombuffer(request.assign, dtype="<i8").reshape(n, -1)
    return np.frombuffer(request.assign_scores, dtype="<f4").reshape(n, -1), Iq
