"""The gRPC bearer-token check: the right token passes, every other is refused, compared in constant time."""

import asyncio
from types import SimpleNamespace

import grpc

from services.common import server


async def _echo(request, context):
    return request


UNARY = grpc.unary_unary_rpc_method_handler(_echo)
STREAM = grpc.stream_stream_rpc_method_handler(_echo)


def _call(auth: server.BearerAuth, metadata, handler=UNARY):
    details = SimpleNamespace(method="/imsearch.v1.Searcher/Search", invocation_metadata=metadata)

    async def continuation(d):
        return handler

    return asyncio.run(auth.intercept_service(continuation, details))


def test_the_token_is_compared_in_constant_time_and_only_the_right_one_passes(monkeypatch):
    compared = []
    real = server.hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    auth = server.BearerAuth("s3cret")
    assert _call(auth, (("authorization", "Bearer s3cret"),)) is UNARY
    for wrong in ((("authorization", "Bearer s3cre"),), (("authorization", "Bearer s3cretX"),), (), None):
        assert _call(auth, wrong) is auth.deny
    assert len(compared) == 5 and all(b == b"Bearer s3cret" for _, b in compared)  # every check went through it


def test_a_stream_without_the_token_is_refused_by_a_stream_handler():
    auth = server.BearerAuth("s3cret")
    assert _call(auth, (("authorization", "Bearer s3cret"),), STREAM) is STREAM
    assert _call(auth, (), STREAM) is auth.deny_stream  # a unary refusal would leave the caller INTERNAL


def test_health_checks_need_no_token():
    auth = server.BearerAuth("s3cret")
    details = SimpleNamespace(method="/grpc.health.v1.Health/Check", invocation_metadata=())

    async def continuation(d):
        return "health"

    assert asyncio.run(auth.intercept_service(continuation, details)) == "health"
