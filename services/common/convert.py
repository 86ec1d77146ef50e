"""Conversions between protobuf messages and numpy arrays / Hits."""

from __future__ import annotations

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.errors import Corrupt, InvalidInput
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
    # A Vector's wire form is its packed float32 values behind a tag+length header: joining those
    # bytes is far faster than converting each repeated field element by element.
    raw = b"".join(v.SerializeToString()[-4 * d:] if d else b"" for v in vectors)
    return np.frombuffer(raw, dtype="<f4").reshape(len(vectors), d).copy()


def vectors_to_proto(x: np.ndarray) -> list[pb.Vector]:
    return [pb.Vector(values=row) for row in np.asarray(x, np.float32).tolist()]


def add_hits(container, D: np.ndarray, I: np.ndarray, S: np.ndarray, U: np.ndarray | None) -> None:
    """Append one query's merged row (scores, ids, shards, uris) to a repeated Hit field, skipping
    missing results. add() in place is faster than building Hit messages and copying them in."""
    uris = U.tolist() if U is not None else [""] * len(I)
    for d, i, s, u in zip(D.tolist(), I.tolist(), S.tolist(), uris):
        if i >= 0:
            container.add(id=i, uri=u, score=d, shard=s)


def fill_columns(columns: pb.HitColumns, D: np.ndarray, I: np.ndarray, S: np.ndarray, U: np.ndarray | None) -> None:
    """Merged (nq, k) arrays -> HitColumns (missing results keep id -1 and uri "")."""
    columns.k = I.shape[1]
    columns.ids.extend(I.ravel().tolist())
    columns.scores.extend(np.where(I >= 0, D, 0).ravel().tolist())  # no -inf on the wire for missing hits
    columns.shards.extend(np.where(I >= 0, S, 0).ravel().tolist())
    columns.uris.extend([""] * I.size if U is None else U.ravel().tolist())


def columns_from_proto(columns: pb.HitColumns) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HitColumns -> (scores, ids, shards, uris), each (nq, k)."""
    k = max(columns.k, 1)
    I = np.array(columns.ids, dtype=np.int64).reshape(-1, k)
    return (np.array(columns.scores, dtype=np.float32).reshape(I.shape), I,
            np.array(columns.shards, dtype=np.int32).reshape(I.shape),
            np.array(columns.uris, dtype=object).reshape(I.shape))


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


def unpack_results(reply, n: int) -> tuple[np.ndarray, np.ndarray, object]:
    """(D, I, uris): uris stay the flat repeated field (merge_topk reads only the winners)."""
    D = np.frombuffer(reply.scores, dtype="<f4").reshape(n, -1)
    I = np.frombuffer(reply.ids, dtype="<i8").reshape(n, -1)
    if len(reply.uris) != I.size:
        raise Corrupt(f"shard {reply.shard} sent {len(reply.uris)} uris for {I.size} results")
    return D, I, reply.uris


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
