"""One search's trace across real processes: the gateway, the router, its Redis cache lookup and every shard,
exported over OTLP to a receiver this test runs, with the right parents."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from services.common.config import Settings
from services.indexer.build import build_index
from tests.helpers import random_unit_vectors, write_fake_embeddings


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span with the service that sent it."""

    def __init__(self):
        self.spans: list[tuple[str, Span]] = []
        self.server = grpc.server(ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request, context):
        for rs in request.resource_spans:
            service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
            self.spans.extend((service, span) for ss in rs.scope_spans for span in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def tree(spans: list[tuple[str, Span]], trace_id: bytes) -> tuple[dict, list[str]]:
    """The spans of one trace by id, and the tree drawn as lines (for the failure message and the notes)."""
    mine = {s.span_id: (svc, s) for svc, s in spans if s.trace_id == trace_id}
    lines = []

    def draw(span_id, depth):
        svc, s = mine[span_id]
        lines.append(f"{'  ' * depth}{svc}: {s.name} ({Span.SpanKind.Name(s.kind)[10:].lower()})")
        for child in sorted((c for c in mine.values() if c[1].parent_span_id == span_id),
                            key=lambda c: c[1].start_time_unix_nano):
            draw(child[1].span_id, depth + 1)

    for svc, s in mine.values():
        if s.parent_span_id not in mine:
            draw(s.span_id, 0)
    return mine, lines


def ancestors(mine: dict, span: Span) -> list[tuple[str, Span]]:
    out = []
    while span.parent_span_id in mine:
        svc, span = mine[span.parent_span_id]
        out.append((svc, span))
    return out


def test_one_search_is_one_trace_through_gateway_router_cache_and_every_shard(tmp_path, start_stack):
    receiver = Receiver()
    try:
        x = random_unit_vectors(400, 16, seed=2)
        write_fake_embeddings(tmp_path / "emb", x)
        build_index(str(tmp_path / "emb"), str(tmp_path / "idx"), shards=2, settings=Settings(home=tmp_path / "h"))
        env = {"IMSEARCH_HOME": str(tmp_path / "h"), "IMSEARCH_OTLP_ENDPOINT": f"127.0.0.1:{receiver.port}",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}  # export within 0.1 s
        stack = start_stack(tmp_path / "idx", redis=True, router_index=False, gateway=True, env=env)
        answer = httpx.post(stack.gateway.url + "/v1/search", json={"vector": x[3].tolist(), "k": 3}, timeout=30)
        assert answer.status_code == 200, answer.text

        def root():
            return next((s for svc, s in receiver.spans if svc == "gateway" and s.kind == Span.SPAN_KIND_SERVER
                         and s.name.startswith("POST /v1/search") and not s.parent_span_id), None)

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            top = root()
            shards = {svc for svc, s in receiver.spans if top and s.trace_id == top.trace_id
                      and svc.startswith("shard-")}
            if top and shards == {"shard-0", "shard-1"}:
                break
            time.sleep(0.2)
        top = root()
        assert top is not None, [svc for svc, _ in receiver.spans]
        mine, lines = tree(receiver.spans, top.trace_id)
        drawn = "\n".join(lines)
        print("\n" + drawn)
        router = [s for svc, s in mine.values() if svc == "router" and s.kind == Span.SPAN_KIND_SERVER
                  and s.name == "/imsearch.v1.Searcher/Search"]
        assert len(router) == 1, drawn
        parent_svc, parent = mine[router[0].parent_span_id]
        assert parent_svc == "gateway" and parent.kind == Span.SPAN_KIND_CLIENT, drawn  # the gateway's call
        for shard in ("shard-0", "shard-1"):
            served = [s for svc, s in mine.values() if svc == shard and s.name == "/imsearch.v1.Shard/Search"]
            assert len(served) == 1, drawn
            caller_svc, caller = mine[served[0].parent_span_id]
            assert caller_svc == "router" and caller.kind == Span.SPAN_KIND_CLIENT, drawn
            assert router[0].span_id in {s.span_id for _, s in ancestors(mine, caller)}, drawn
        cache = [s for svc, s in mine.values() if svc == "router" and any(
            a.key == "db.system" and a.value.string_value == "redis" for a in s.attributes)]
        assert cache and all(router[0].span_id in {p.span_id for _, p in ancestors(mine, s)} for s in cache), drawn
        assert np.all([s.end_time_unix_nano >= s.start_time_unix_nano for _, s in mine.values()])
    finally:
        receiver.server.stop(0)
