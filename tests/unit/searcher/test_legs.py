"""The router's searches of a replica as tagged messages on one stream, against real gRPC servers in this
process: answers paired by tag in any order, a refusal failing alone, failover when the stream ends, a
late answer dropped, unary calls to a replica without the stream, and the server's auth and parse checks."""

import asyncio
import socket

import grpc
import pytest

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import server
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.searcher.legs import METHOD, Outgoing
from services.searcher.replicas import ReplicaSet

SERVICE = pb.DESCRIPTOR.services_by_name["Shard"].full_name


def _answer(request: pb.ShardSearchRequest, name: str) -> pb.ShardSearchResponse:
    """A reply that says which replica answered which request (k is the request's mark)."""
    return pb.ShardSearchResponse(index_version=f"{name}:{request.k}")


class FakeShard(pb_grpc.ShardServicer):
    """A shard replica whose stream answers each message by a rule: reverse pairs, refuse a k, end the
    stream, or answer late."""

    def __init__(self, name: str, rule: str = "", delay: float = 0.0):
        self.name, self.rule, self.delay = name, rule, delay
        self.streams = self.messages = self.unary = 0
        self.late_sent = asyncio.Event()

    async def Search(self, request, context):
        self.unary += 1
        return _answer(request, self.name)

    async def SearchStream(self, messages, context):
        await context.send_initial_metadata(())  # as the shard server does (legs.py waits for it)
        self.streams += 1
        held = []
        async for m in messages:
            self.messages += 1
            if self.rule == "end":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
            if self.rule == "refuse" and m.request.k == 13:
                yield pb.ShardStreamResponse(tag=m.tag, code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                             details="13 is refused")
                continue
            if self.delay:
                await asyncio.sleep(self.delay)
                yield pb.ShardStreamResponse(tag=m.tag, response=_answer(m.request, self.name))
                self.late_sent.set()
                continue
            held.append(m)
            if self.rule != "reverse" or len(held) == 2:  # "reverse": the second message is answered first
                for h in reversed(held):
                    yield pb.ShardStreamResponse(tag=h.tag, response=_answer(h.request, self.name))
                held = []


class UnaryOnly:
    """A replica from before SearchStream: its service has only the unary Search."""

    def __init__(self):
        self.unary = 0

    async def Search(self, request, context):
        self.unary += 1
        return _answer(request, "old")

    async def serve(self) -> tuple[grpc.aio.Server, str]:
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Search": grpc.unary_unary_rpc_method_handler(
            self.Search, pb.ShardSearchRequest.FromString, pb.ShardSearchResponse.SerializeToString)})
        old = grpc.aio.server()
        old.add_generic_rpc_handlers((handler,))
        port = old.add_insecure_port("127.0.0.1:0")
        await old.start()
        return old, f"127.0.0.1:{port}"


async def _serve(servicer, settings: Settings | None = None) -> tuple[server.Running, str]:
    running = await server.start([(pb_grpc.add_ShardServicer_to_server, servicer, SERVICE)], 0,
                                 settings or Settings())
    return running, f"127.0.0.1:{running.port}"


def _search(k: int) -> Outgoing:
    return Outgoing(pb.ShardSearchRequest(k=k, dim=2, queries=b"\0" * 8))


async def _ask(replicas: ReplicaSet, k: int, within: float = 5.0):
    return await replicas.ask("Search", _search(k), asyncio.get_running_loop().time() + within)


def test_searches_of_a_replica_ride_one_stream_and_each_gets_its_own_answer_in_any_order():
    async def scenario():
        shard = FakeShard("a", rule="reverse")
        running, address = await _serve(shard)
        replicas = ReplicaSet(0, [address], Settings(), None)
        try:
            replies = await asyncio.gather(*(_ask(replicas, k) for k in range(1, 7)))
            assert [r.index_version for r in replies] == [f"a:{k}" for k in range(1, 7)]
            assert (shard.streams, shard.messages, shard.unary) == (1, 6, 0)
            assert not replicas.replicas[0].leg.waiting  # nothing left behind
        finally:
            await replicas.close()
            await running.stop(0)

    asyncio.run(scenario())


def test_a_refused_search_fails_alone_with_its_status_and_the_stream_stays_open():
    async def scenario():
        shard = FakeShard("a", rule="refuse")
        running, address = await _serve(shard)
        replicas = ReplicaSet(0, [address], Settings(), None)
        try:
            refused, fine = await asyncio.gather(_ask(replicas, 13), _ask(replicas, 4), return_exceptions=True)
            assert isinstance(refused, InvalidInput) and "13 is refused" in str(refused)
            assert fine.index_version == "a:4"
            assert (await _ask(replicas, 5)).index_version == "a:5"
            assert shard.streams == 1 and replicas.replicas[0].strikes == 0  # a refusal is not the replica's fault
        finally:
            await replicas.close()
            await running.stop(0)

    asyncio.run(scenario())


def test_a_stream_that_ends_fails_its_search_over_to_the_next_replica_at_once_and_is_reopened():
    async def scenario():
        ending, healthy = FakeShard("a", rule="end"), FakeShard("b")
        (r1, a1), (r2, a2) = await _serve(ending), await _serve(healthy)
        replicas = ReplicaSet(0, [a1, a2], Settings(hedge_budget=0.0), None)
        try:
            loop = asyncio.get_running_loop()
            for k in (1, 2, 3):  # round-robin: the first and the third start on the ending replica
                started = loop.time()
                reply = await _ask(replicas, k, within=10.0)
                assert reply.index_version == f"b:{k}"
                assert loop.time() - started < 2.0  # failed over, not after half the 10 s budget
            assert ending.streams == 2  # the ended stream was opened anew for the next search
            assert replicas.replicas[0].strikes == 2
        finally:
            await replicas.close()
            await r1.stop(0)
            await r2.stop(0)

    asyncio.run(scenario())


def test_a_slow_replica_costs_a_hedge_and_its_late_answer_is_dropped():
    async def scenario():
        slow, fast = FakeShard("slow", delay=0.5), FakeShard("fast")
        (r1, a1), (r2, a2) = await _serve(slow), await _serve(fast)
        replicas = ReplicaSet(0, [a1, a2], Settings(hedge_after_ms=20, hedge_budget=1.0), None)
        try:
            reply = await _ask(replicas, 7)
            assert reply.index_version == "fast:7"
            await asyncio.wait_for(slow.late_sent.wait(), 5)  # the slow replica did answer, after the hedge won
            await asyncio.sleep(0.1)
            leg = replicas.replicas[0].leg
            assert not leg.waiting and leg.call is not None  # dropped; the stream is still open
            assert (await _ask(replicas, 8)).index_version == "fast:8"  # round-robin: fast is asked first now
        finally:
            await replicas.close()
            await r1.stop(0)
            await r2.stop(0)

    asyncio.run(scenario())


def test_a_replica_that_accepts_and_never_answers_costs_a_search_only_its_deadline_or_a_hedge():
    """The stream's handshake never completes: searches waiting on it still end at their deadline, and a second
    replica answers them once the hedge delay has passed."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections (the backlog) and never speaks
    address = f"127.0.0.1:{silent.getsockname()[1]}"

    async def scenario():
        fast = FakeShard("fast")
        running, healthy = await _serve(fast)
        alone = ReplicaSet(0, [address], Settings(), None)
        pair = ReplicaSet(0, [address, healthy], Settings(hedge_after_ms=50, hedge_budget=1.0), None)
        loop = asyncio.get_running_loop()
        try:
            started = loop.time()
            assert await _ask(alone, 1, within=0.5) is None
            assert 0.5 <= loop.time() - started < 1.5
            started = loop.time()
            assert (await _ask(pair, 2)).index_version == "fast:2"
            assert loop.time() - started < 1.0
        finally:
            await alone.close()
            await pair.close()
            await running.stop(0)

    try:
        asyncio.run(scenario())
    finally:
        silent.close()


def test_a_replica_without_the_stream_is_searched_with_unary_calls():
    async def scenario():
        old = UnaryOnly()
        running, address = await old.serve()
        replicas = ReplicaSet(0, [address], Settings(), None)
        try:
            replies = await asyncio.gather(*(_ask(replicas, k) for k in (1, 2, 3)))
            assert [r.index_version for r in replies] == ["old:1", "old:2", "old:3"]
            assert (await _ask(replicas, 4)).index_version == "old:4"
            assert old.unary == 4 and replicas.replicas[0].leg.streams is False
        finally:
            await replicas.close()
            await running.stop(None)

    asyncio.run(scenario())


def test_streams_off_every_search_is_a_unary_call():
    async def scenario():
        shard = FakeShard("a")
        running, address = await _serve(shard)
        replicas = ReplicaSet(0, [address], Settings(shard_streams=False), None)
        try:
            assert (await _ask(replicas, 3)).index_version == "a:3"
            assert (shard.unary, shard.streams) == (1, 0)
        finally:
            await replicas.close()
            await running.stop(0)

    asyncio.run(scenario())


def test_a_stream_without_the_token_is_unauthenticated_and_with_it_answers():
    async def scenario():
        shard = FakeShard("a")
        running, address = await _serve(shard, Settings(auth_token="s3cret"))
        strangers = ReplicaSet(0, [address], Settings(), None)
        members = ReplicaSet(0, [address], Settings(), server.bearer_metadata("s3cret"))
        try:
            with pytest.raises(Exception) as refused:
                await _ask(strangers, 1)
            assert "UNAUTHENTICATED" in str(refused.value)
            assert shard.messages == 0
            assert (await _ask(members, 2)).index_version == "a:2"
        finally:
            await strangers.close()
            await members.close()
            await running.stop(0)

    asyncio.run(scenario())


def test_a_message_that_does_not_parse_ends_the_stream_as_invalid_argument():
    async def scenario():
        shard = FakeShard("a")
        running, address = await _serve(shard)
        channel = grpc.aio.insecure_channel(address)
        try:
            call = channel.stream_stream(METHOD, request_serializer=None, response_deserializer=None)()
            await call.write(b"\xff\xff\xff")
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await call.read()
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in ended.value.details() and shard.messages == 0
        finally:
            await channel.close()
            await running.stop(0)

    asyncio.run(scenario())


def test_a_stopping_shard_server_ends_its_idle_streams_at_once_instead_of_holding_the_stop_for_its_grace(tmp_path):
    """Before: the router's open stream was an in-flight call, and a shard server's stop waited its whole grace
    (5 s) for it on every restart."""
    from services.common.convert import pack_queries
    from services.eval.synthetic import write_embeddings
    from services.indexer.build import build_index
    from services.searcher import shard as shard_server
    from tests.helpers import random_unit_vectors

    settings = Settings(home=tmp_path / "home")
    write_embeddings(tmp_path / "emb", random_unit_vectors(400, 8, seed=1))
    build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=settings)
    data, dim = pack_queries(random_unit_vectors(2, 8, seed=2))

    async def scenario():
        running = await shard_server.serve(str(tmp_path / "idx"), 0, settings=settings)
        replicas = ReplicaSet(0, [f"127.0.0.1:{running.port}"], settings, None)
        loop = asyncio.get_running_loop()
        try:
            request = Outgoing(pb.ShardSearchRequest(queries=data, dim=dim, k=3))
            assert (await replicas.ask("Search", request, loop.time() + 5)).shard == 0
            leg = replicas.replicas[0].leg
            assert leg.call is not None  # the stream is open, and idle
            started = loop.time()
            await running.stop(5.0)
            stopped = loop.time() - started
            await asyncio.sleep(0.1)
            return stopped, leg.call
        finally:
            await replicas.close()

    stopped, call = asyncio.run(scenario())
    assert stopped < 2.0, f"the stop took {stopped:.1f} s: the open stream held it"
    assert call is None  # the router saw its stream end


def test_a_callers_short_deadline_is_not_a_strike_against_healthy_replicas_and_the_routers_own_is():
    """Before: a replica still answering when a client's 5 ms deadline passed took a strike, so a client sending
    short deadlines could eject every healthy replica of a shard."""

    async def scenario():
        servers = [await _serve(FakeShard(name, delay=0.05)) for name in ("a", "b")]
        settings = Settings(eject_after=3, hedge_budget=0.0)
        replicas = ReplicaSet(0, [address for _, address in servers], settings, None)
        loop = asyncio.get_running_loop()
        try:
            for k in range(25):  # warm: the shard's p95 is known (strikes for slowness count from here)
                assert await replicas.ask("Search", _search(k), loop.time() + 5) is not None
            for k in range(10):  # a client's deadline: the router's budget cut short
                assert await replicas.ask("Search", _search(k), loop.time() + 0.005, own_deadline=False) is None
            hurried = [(r.strikes, r.ejected) for r in replicas.replicas]
            for k in range(10):  # the router's own deadline passing: the replicas are at fault
                await replicas.ask("Search", _search(k), loop.time() + 0.005)
            return hurried, [r.ejected for r in replicas.replicas]
        finally:
            await replicas.close()
            for running, _ in servers:
                await running.stop(0)

    hurried, own = asyncio.run(scenario())
    assert hurried == [(0, False), (0, False)]
    assert any(own)
