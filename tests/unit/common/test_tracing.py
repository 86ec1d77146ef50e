"""A fan-out shared by concurrent requests: with one caller it runs in that caller's trace; with several it is a
span of its own linked to every caller's span (never hidden under the first request's trace)."""

import asyncio

import numpy as np
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tracing
from services.common.batching import DynamicBatcher

EXPORTER = InMemorySpanExporter()


@pytest.fixture()
def spans(monkeypatch):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    monkeypatch.setattr(trace, "get_tracer", provider.get_tracer)  # this test's provider, not the process's
    monkeypatch.setattr(tracing, "_enabled", True)
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def run_batch(callers: int) -> None:
    tracer = trace.get_tracer("test")

    async def work(rows):
        with tracer.start_as_current_span("work"):
            await asyncio.sleep(0.01)
        return rows

    async def caller(batcher, i):
        with tracer.start_as_current_span(f"request-{i}"):
            return await batcher.submit(np.array([[i]]))

    async def main():
        batcher = DynamicBatcher(work, max_batch=8, max_wait_s=0.05, max_queue=8, name="fanout")
        batcher.start()
        await asyncio.gather(*(caller(batcher, i) for i in range(callers)))
        await batcher.stop()

    asyncio.run(main())


def test_one_caller_the_batch_runs_in_its_trace(spans):
    run_batch(1)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert by_name["work"].parent.span_id == by_name["request-0"].context.span_id
    assert by_name["work"].context.trace_id == by_name["request-0"].context.trace_id


def test_several_callers_the_batch_is_its_own_span_linked_to_each(spans):
    run_batch(3)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    batch, work = by_name["fanout batch"], by_name["work"]
    assert work.parent.span_id == batch.context.span_id and batch.parent is None  # a root of its own
    callers = {by_name[f"request-{i}"].context.span_id for i in range(3)}
    assert {link.context.span_id for link in batch.links} == callers
    assert all(by_name[f"request-{i}"].context.trace_id != batch.context.trace_id for i in range(3))


def test_off_it_costs_nothing():
    assert not tracing.enabled() and tracing.current() is None and tracing.log_ids() == {}
    with tracing.for_batch([None, None], "x"):
        pass
