import numpy as np
import pytest

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common.convert import (
    add_hits,
    columns_from_proto,
    fill_columns,
    pack_results,
    unpack_results,
    vectors_from_proto,
    vectors_to_proto,
)
from services.common.errors import Corrupt, InvalidInput


@pytest.mark.parametrize("dim", [1, 3, 128, 1000])
def test_vectors_round_trip_through_the_wire(dim):
    x = np.random.default_rng(dim).normal(size=(5, dim)).astype(np.float32)
    x[0, 0] = -0.0
    msg = pb.SearchBatchRequest(queries=[pb.Query(vector=v) for v in vectors_to_proto(x)])
    parsed = pb.SearchBatchRequest.FromString(msg.SerializeToString())
    got = vectors_from_proto([q.vector for q in parsed.queries])
    assert got.dtype == np.float32 and got.flags.writeable
    np.testing.assert_array_equal(got, x)


def test_vectors_keep_nan_and_inf_for_the_searcher_to_refuse():
    got = vectors_from_proto([pb.Vector(values=[np.nan, np.inf, 1.0])])
    assert np.isnan(got[0, 0]) and np.isinf(got[0, 1]) and got[0, 2] == 1.0


def test_bad_vectors_are_refused():
    with pytest.raises(InvalidInput, match="no query vectors"):
        vectors_from_proto([])
    with pytest.raises(InvalidInput, match="different lengths"):
        vectors_from_proto([pb.Vector(values=[1, 2]), pb.Vector(values=[1, 2, 3])])
    with pytest.raises(InvalidInput, match="dim 2, the index takes 4"):
        vectors_from_proto([pb.Vector(values=[1, 2])], dim=4)


def test_add_hits_skips_missing_results():
    reply = pb.SearchResponse()
    add_hits(reply.hits, np.array([0.9, 0.5, -np.inf], np.float32), np.array([7, 3, -1]),
             np.array([1, 0, 0]), np.array(["a.jpg", "b.jpg", ""], dtype=object))
    assert [(h.id, h.uri, h.shard) for h in reply.hits] == [(7, "a.jpg", 1), (3, "b.jpg", 0)]
    assert reply.hits[0].score == pytest.approx(0.9)
    bare = pb.SearchResponse()
    add_hits(bare.hits, np.array([0.1], np.float32), np.array([4]), np.array([2]), None)
    assert bare.hits[0].uri == "" and bare.hits[0].id == 4


def test_results_pack_and_unpack():
    D = np.array([[0.9, 0.1], [0.8, -np.inf]], np.float32)
    I = np.array([[5, 6], [7, -1]])
    U = np.array([["x", "y"], ["z", ""]], dtype=object)
    reply = pb.ShardSearchResponse.FromString(pb.ShardSearchResponse(**pack_results(D, I, U)).SerializeToString())
    d, i, u = unpack_results(reply, 2)
    np.testing.assert_array_equal(d, D)
    np.testing.assert_array_equal(i, I)
    assert list(u) == U.ravel().tolist()
    reply.uris.pop()
    with pytest.raises(Corrupt, match="3 uris for 4 results"):
        unpack_results(reply, 2)


def test_columns_round_trip_with_missing_results():
    D = np.array([[0.9, -np.inf], [0.7, 0.6]], np.float32)
    I = np.array([[11, -1], [12, 13]])
    S = np.array([[2, 1], [0, 1]], np.int32)
    U = np.array([["a", ""], ["b", "c"]], dtype=object)
    reply = pb.SearchBatchResponse()
    fill_columns(reply.columns, D, I, S, U)
    d, i, s, u = columns_from_proto(pb.SearchBatchResponse.FromString(reply.SerializeToString()).columns)
    np.testing.assert_array_equal(i, I)
    np.testing.assert_array_equal(d, np.array([[0.9, 0.0], [0.7, 0.6]], np.float32))  # missing: 0, not -inf
    assert s.tolist() == [[2, 0], [0, 1]] and u.tolist() == U.tolist()
