"""OpenTelemetry traces across every hop — gateway (FastAPI) → router → embedder and every shard (gRPC) →
Redis — exported over OTLP/gRPC when IMSEARCH_OTLP_ENDPOINT is set. Unset, nothing here imports the SDK and
every helper is a no-op.

A fan-out the router shares between concurrent requests (DynamicBatcher) belongs to no single request: with
one caller it runs in that caller's trace; with several it is a span of its own that *links* to every
caller's span, instead of hiding under the first request's trace.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

log = logging.getLogger(__name__)
_enabled = False


def enabled() -> bool:
    return _enabled


def setup(service_name: str, settings) -> bool:
    """Export this process's spans (service.name = service_name) and instrument its gRPC servers and
    clients and Redis calls; True when tracing is on. Call before any gRPC server or channel is made."""
    global _enabled
    if not settings.otlp_endpoint or _enabled:
        return _enabled
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint,
                                                                    insecure=not settings.otlp_secure)))
    trace.set_tracer_provider(provider)
    GrpcAioInstrumentorServer().instrument()
    GrpcAioInstrumentorClient().instrument()
    RedisInstrumentor().instrument()
    _enabled = True
    log.info("tracing to %s as %s", settings.otlp_endpoint, service_name)
    return True


def instrument_fastapi(app) -> None:
    if _enabled:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app)


def current():
    """The caller's trace context, to hand to work done elsewhere (None when tracing is off)."""
    if not _enabled:
        return None
    from opentelemetry import context

    return context.get_current()


@contextlib.contextmanager
def for_batch(parents: list, name: str) -> Iterator[None]:
    """Run a batch of several callers' work: in the one caller's trace, or as a span linked to each."""
    parents = [p for p in parents if p is not None]
    if not _enabled or not parents:
        yield
        return
    from opentelemetry import context, trace

    if len(parents) == 1:
        token = context.attach(parents[0])
        try:
            yield
        finally:
            context.detach(token)
        return
    links = [trace.Link(trace.get_current_span(p).get_span_context()) for p in parents]
    with trace.get_tracer("imsearch").start_as_current_span(name, context=context.Context(), links=links,
                                                             attributes={"imsearch.callers": len(parents)}):
        yield


def log_ids() -> dict[str, str]:
    """trace_id / span_id of the current span, for log lines (empty when none)."""
    if not _enabled:
        return {}
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}
