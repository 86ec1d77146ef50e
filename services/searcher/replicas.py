"""One shard's replicas as the router sees them: which to ask first, when to hedge, which to leave out.

A replica that accepts calls and never answers (a stopped process, a full GC pause, a dead disk) must not
cost the shard its answer. So a call that is slower than the shard's recent p95 (or a floor) is *hedged*:
the same call goes to the next replica, the first answer wins and the other call is cancelled; hedges are
paid from a token budget so they stay a small fraction of calls. A replica that fails, times out or loses
to a hedge several times in a row is *ejected* — asked only when no other replica is left — and probed
back in with the standard gRPC health check after a back-off that doubles while it keeps failing.

Hand-written, not gRPC service config: grpcio's C-core implements `retryPolicy` but not `hedgingPolicy`
(gRFC A6: hedging exists in Java only), a service-config hedge delay is fixed rather than the shard's
recent p95, and ejection per replica needs the per-replica channels this fan-out already has.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server, tracing
from services.common.config import Settings
from services.common.errors import from_status
from services.searcher.legs import Outgoing, StreamLeg

log = logging.getLogger(__name__)
# Errors that mean "this replica cannot answer now": try the next one.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
MAX_BACKOFF_S = 30.0
PROBE_TIMEOUT_S = 0.5
LATENCY_WINDOW = 256
WARM = 20  # answered calls before the shard's p95 is trusted


@dataclass
class Replica:
    shard: int
    index: int
    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.ShardStub = field(init=False)
    strikes: int = 0  # failures, timeouts and lost hedges in a row
    ejected: bool = False
    retry_at: float = 0.0  # monotonic: when an ejected replica is probed again
    backoff: float = 0.0
    probing: bool = False
    timer: asyncio.TimerHandle | None = None  # the next probe of an ejected replica
    leg: StreamLeg | None = None  # searches on one stream (IMSEARCH_SHARD_STREAMS), else unary calls

    def __post_init__(self):
        self.stub = pb_grpc.ShardStub(self.channel)

    def call(self, method: str, request, timeout: float, metadata):
        """The awaitable answer of this replica to `method` (a search: an Outgoing, on the stream if any)."""
        if isinstance(request, Outgoing):
            if self.leg is not None:
                return self.leg.search(request, timeout)
            request = request.request
        return getattr(self.stub, method)(request, timeout=timeout, metadata=metadata)

    def label(self) -> dict[str, str]:
        return {"shard": str(self.shard), "replica": self.address}


class ReplicaSet:
    def __init__(self, shard: int, addresses: list[str], settings: Settings, metadata):
        self.shard, self.settings, self.metadata = shard, settings, metadata
        self.replicas = [Replica(shard, i, a, server.channel(a, settings)) for i, a in enumerate(addresses)]
        # Traced, every search stays a call of its own: a stream would be one span for the process's life.
        if settings.shard_streams and not tracing.enabled():
            for r in self.replicas:
                r.leg = StreamLeg(r.channel, r.stub, metadata, settings.max_message_bytes)
        self.turn = itertools.count()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # seconds of recent answered calls
        self.tokens = self.max_tokens = max(2.0, 100 * settings.hedge_budget)  # a reserve for a bad minute
        metrics.HEDGES.labels(str(shard))  # every series exists from the start: a dashboard shows 0, not nothing
        for r in self.replicas:
            metrics.REPLICA_EJECTED.labels(**r.label()).set(0)

    def hedge_delay(self) -> float:
        """How long a call may take before the next replica is asked too: the shard's recent p95, at least
        the floor (IMSEARCH_HEDGE_AFTER_MS)."""
        floor = self.settings.hedge_after_ms / 1000
        if len(self.latencies) < WARM:
            return floor
        return max(floor, float(np.percentile(np.fromiter(self.latencies, float), 95)))

    def order(self) -> list[Replica]:
        """Replicas to ask, in turn: the ones in service round-robin, the ejected ones last (a shard whose
        replicas are all ejected still tries them). Starts the probes that are due."""
        now = time.monotonic()
        start = next(self.turn)
        turn = [self.replicas[(start + i) % len(self.replicas)] for i in range(len(self.replicas))]
        for r in turn:
            if r.ejected and now >= r.retry_at:  # due (its timer has not fired yet): probe now
                self._start_probe(r)
        return [r for r in turn if not r.ejected] + [r for r in turn if r.ejected]

    def _schedule_probe(self, r: Replica) -> None:
        """Probe an ejected replica at its retry time whether or not calls come: a quiet shard's replica
        comes back too (and its gauge with it)."""
        if r.timer is not None:
            r.timer.cancel()
        r.timer = asyncio.get_running_loop().call_later(max(0.0, r.retry_at - time.monotonic()),
                                                        self._start_probe, r)

    def _start_probe(self, r: Replica) -> None:
        if r.ejected and not r.probing:
            r.probing = True
            asyncio.get_running_loop().create_task(self._probe(r))

    def may_hedge(self) -> bool:
        return self.tokens >= 1.0

    def paid_call(self) -> None:
        """Every call earns a fraction of a hedge (IMSEARCH_HEDGE_BUDGET), up to a small reserve."""
        self.tokens = min(self.max_tokens, self.tokens + self.settings.hedge_budget)

    def hedged(self) -> None:
        self.tokens -= 1.0
        metrics.HEDGES.labels(str(self.shard)).inc()

    def answered(self, r: Replica, seconds: float) -> None:
        r.strikes = 0
        self.latencies.append(seconds)

    def failed(self, r: Replica, why: str) -> None:
        """A failure, a timeout, or a loss to a hedge: enough in a row and the replica is ejected."""
        r.strikes += 1
        if not r.ejected and r.strikes >= self.settings.eject_after:
            r.ejected, r.backoff = True, self.settings.eject_s
            r.retry_at = time.monotonic() + r.backoff
            self._schedule_probe(r)
            metrics.EJECTIONS.labels(**r.label()).inc()
            metrics.REPLICA_EJECTED.labels(**r.label()).set(1)
            log.warning("shard %d replica %s ejected after %d %s in a row", self.shard, r.address, r.strikes, why)

    async def _probe(self, r: Replica) -> None:
        """Health-check an ejected replica: SERVING re-admits it, anything else doubles its back-off."""
        try:
            reply = await health_pb2_grpc.HealthStub(r.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S, metadata=self.metadata)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            ok = False
        finally:
            r.probing = False
        if ok:
            r.ejected, r.strikes, r.backoff = False, 0, 0.0
            metrics.REPLICA_EJECTED.labels(**r.label()).set(0)
            log.info("shard %d replica %s re-admitted", self.shard, r.address)
        else:
            r.backoff = min(MAX_BACKOFF_S, max(r.backoff, self.settings.eject_s) * 2)
            r.retry_at = time.monotonic() + r.backoff
            self._schedule_probe(r)

    async def ask(self, method: str, request, deadline: float, own_deadline: bool = True):
        """The first answer of the shard's replicas to `method`, hedged; None when none answered in time.
        A request the replica refuses as wrong (INVALID_ARGUMENT…) is raised: every replica would say so.
        own_deadline False: the deadline is a caller's, shorter than the router's own shard budget — a replica
        that has not answered by then is no slower than it may be, and is not struck for it (else any client
        sending 1 ms deadlines could eject every healthy replica)."""
        loop = asyncio.get_running_loop()
        candidates, pending = self.order(), {}
        self.paid_call()

        def launch() -> None:
            r = candidates[len(pending_started)]
            pending_started.append(r)
            call = r.call(method, request, max(0.001, deadline - loop.time()), self.metadata)
            pending[asyncio.ensure_future(call)] = (r, loop.time())

        pending_started: list[Replica] = []
        launch()
        blame = True  # whether calls still pending at the end count against their replicas
        won = False  # a replica answered: the ones still pending lost to it
        try:
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                more = len(pending_started) < len(candidates)
                hedge = more and self.may_hedge()
                # Out of hedge budget, the next replica is still asked once half the time left has gone: a
                # failover before the deadline rather than a partial answer.
                wait = self.hedge_delay() if hedge else remaining / 2 if more else remaining
                done, _ = await asyncio.wait(pending, timeout=min(remaining, wait),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    if more and loop.time() < deadline:  # slower than the shard's p95: ask the next replica too
                        if hedge:
                            self.hedged()
                        launch()
                    continue
                for task in done:
                    r, started = pending.pop(task)
                    try:
                        reply = task.result()
                    except grpc.aio.AioRpcError as e:
                        metrics.SHARD_ERRORS.labels(str(self.shard), e.code().name).inc()
                        if e.code() not in RETRYABLE:
                            blame = False
                            raise from_status(e.code(), e.details(), f"shard {self.shard}") from None
                        if own_deadline or e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                            self.failed(r, e.code().name)
                        log.warning("shard %d replica %s failed: %s %s", self.shard, r.address, e.code().name,
                                    e.details())
                        if len(pending_started) < len(candidates):  # fail over at once, no hedge budget needed
                            launch()
                        continue
                    self.answered(r, loop.time() - started)
                    won = True
                    return reply
            return None
        finally:
            for task, (r, _) in pending.items():  # lost to a faster replica, or still silent at the deadline
                task.cancel()
                # A lost hedge counts once the shard's p95 is known: cold-start calls are all slow. Silence until a
                # caller's own (shorter) deadline does not.
                if blame and len(self.latencies) >= WARM and (won or own_deadline):
                    self.failed(r, "slow calls")

    async def close(self) -> None:
        for r in self.replicas:
            if r.timer is not None:
                r.timer.cancel()
        await asyncio.gather(*(r.leg.close() for r in self.replicas if r.leg is not None))
        await asyncio.gather(*(r.channel.close() for r in self.replicas))
