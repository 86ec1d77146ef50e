"""Prometheus metrics of the search services (served on IMSEARCH_METRICS_PORT when set)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("imsearch_requests_total", "requests by service, method and status", ["service", "method", "code"])
LATENCY = Histogram("imsearch_request_seconds", "request latency", ["service", "method"],
                    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
CACHE = Counter("imsearch_cache_total", "router cache lookups", ["result"])  # hit | miss
CACHE_REJECTED = Counter("imsearch_cache_rejected_total", "cache values that were not a sealed answer to their key "
                         "(served as a miss, then overwritten)", ["reason"])  # format|truncated|version|checksum|parse
FANOUTS = Counter("imsearch_fanouts_total", "router fan-outs to the shards")
ASSIGNED = Counter("imsearch_router_assigned_total", "fan-outs whose IVF lists the router chose once for all shards")
HEDGES = Counter("imsearch_hedges_total", "shard calls also sent to a second replica (the first was slow)", ["shard"])
EJECTIONS = Counter("imsearch_replica_ejections_total", "replicas taken out of service", ["shard", "replica"])
REPLICA_EJECTED = Gauge("imsearch_replica_ejected", "1 while a replica is out of service", ["shard", "replica"])
SHARD_ERRORS = Counter("imsearch_shard_errors_total", "failed shard calls", ["shard", "code"])
SHARD_VERSION_LAG = Gauge("imsearch_shard_version_lag_seconds", "how long a shard has served an older version than "
                          "CURRENT names (0: up to date)", ["shard"])
SHARD_LOAD_FAILURES = Counter("imsearch_shard_load_failures_total", "published versions a shard could not load",
                              ["shard"])
IMAGES_DECODED = Counter("imsearch_images_decoded_total", "images given to the decoder", ["result"])  # ok | refused
PARTIAL = Counter("imsearch_partial_answers_total", "answers with coverage < 1")
IN_FLIGHT = Gauge("imsearch_in_flight", "calls being handled", ["service"])
QUEUE_DEPTH = Gauge("imsearch_queue_depth", "requests waiting for a batch", ["queue"])  # embed | fanout


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Expose /metrics over HTTP (no-op for port 0)."""
    if port:
        start_http_server(port, addr=host)
