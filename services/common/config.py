"""Settings, declared once. Every value can be set by env var `IMSEARCH_<NAME>`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The named crash points of the write protocols (services/common/faults.py): the values IMSEARCH_CRASH_AT takes.
CRASH_POINTS = {
    "index.shards-written": "every shard, docs and quantizer file of a new version written; no manifest yet",
    "index.manifest-written": "the new version's manifest written; CURRENT not yet flipped",
    "index.before-flip": "CURRENT read and the new pointer ready; the compare-and-swap not yet sent",
    "index.after-flip": "CURRENT flipped; the command has not yet said so",
    "index.shard-built": "a Ray build's driver has the first finished shard's marker; other shards still building",
    "index.part-split": "a Ray build's driver has the first split part's marker; other parts still splitting, no "
                        "shard built",
    "gc.marked": "gc has marked the versions it removes in CURRENT; none deleted yet",
    "gc.mid-delete": "gc deleted the first file of the first version it removes",
    "embed.part-written": "an embeddings part written; its done marker not yet",
    "embed.marker-written": "a part and its done marker written; later chunks not yet",
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMSEARCH_", env_file=None, extra="ignore")

    # --- logs
    log_level: str = Field("warning", pattern="^(debug|info|warning|error)$")
    log_format: str = Field("text", pattern="^(text|json)$")

    # --- storage
    home: Path = Field(Path(".imsearch"), description="local root for the embedded default")
    s3_endpoint: str = Field("localhost:9000", description="host:port of the S3/MinIO server")
    s3_access_key: SecretStr = SecretStr("minioadmin")
    s3_secret_key: SecretStr = SecretStr("minioadmin")
    s3_secure: bool = False
    s3_region: str | None = None
    s3_retry_s: float = Field(30.0, ge=0, description="an S3 operation, retries with backoff included, ends within "
                                                      "this (a down, hung or throttling server)")
    s3_timeout_s: float = Field(10.0, gt=0, description="connect and read timeout of one S3 request")

    # --- images
    max_image_pixels: int = Field(64_000_000, gt=0, description="decompression-bomb limit")
    max_image_bytes: int = Field(50 * 1024 * 1024, gt=0)

    # --- embedding
    # Lite1 over Lite0: more category mAP on real photos for some ingestion speed (README Quality, "Backbones")
    model: str = "lite1-gem"
    model_weights: Path | None = Field(None, description="weights file for non-default backbones")
    device: str = Field("auto", pattern="^(auto|cpu|cuda)$")
    runtime: str = Field("auto", pattern="^(auto|openvino|onnxruntime|torch)$", description="what runs the "
                         "model: auto (on the CPU the faster of OpenVINO and ONNX Runtime as timed on the machine, "
                         "when installed and the model exports, else torch; torch on a GPU), openvino or "
                         "onnxruntime (refuse rather than fall back) or torch")
    model_cache_dir: Path | None = Field(None, description="where models exported for the inference runtime are "
                                                           "kept (default: IMSEARCH_HOME/models)")
    batch_size: int = Field(32, gt=0, le=4096)
    ray_address: str | None = None
    ray_min_images: int = Field(2000, ge=0, description="catalogues at least this big go through Ray")
    ray_actors: int = Field(0, ge=0, description="Ray model actors; 0: one per GPU, or one single-threaded "
                                                 "actor per CPU of the cluster")
    part_rows: int = Field(5000, gt=0, description="rows per embeddings parquet part (a resumable chunk)")
    part_seconds: float = Field(30.0, gt=0, description="a chunk in progress is written at least this often "
                                                        "(in pieces): what a killed embed run can lose")

    # --- indexing / search
    memory_budget_gb: float = Field(8.0, gt=0)
    disk_rerank: bool = Field(True, description="index build: when not even SQ8 codes fit the memory budget, "
                              "re-rank IVF-PQ candidates from the full vectors on disk (memory-mapped by the "
                              "searcher) rather than use PQ codes alone, which lose most of the recall at the "
                              "models' width (README Performance, 'memory against recall')")
    flat_max: int = Field(20_000, ge=0, description="below this N, shards are exact Flat indexes")
    target_recall: float = Field(0.95, gt=0, le=1)
    pca_dim: int = Field(256, ge=0, description="index build: learn a mean-centred PCA of the catalogue to this "
                                                "many dimensions (0: index the model's vectors as they are)")
    whiten_power: float = Field(0.0, ge=0, le=1, description="index build: shrinkage whitening of the PCA, "
                                                             "eigenvalue power 0..1 (1 = full whitening)")
    dba: int = Field(0, ge=0, description="index build: database-side augmentation, each vector re-weighted "
                                          "with this many nearest neighbours (0: off; it helps category search "
                                          "and hurts near-duplicate search, README Quality)")
    dba_max: int = Field(200_000, ge=0, description="DBA by default only up to this many vectors (its exact "
                                                    "neighbour search grows with N^2); --dba asks for it anyway")
    filterable: str = Field("*", description="index build: metadata fields to filter on, comma-separated; '*' "
                                             "every scalar column (skipping unique strings such as titles), '' none")
    filter_cache_mb: float = Field(256, ge=0, description="memory for the matching rows of recent filters, per "
                                                            "searcher (least recently used dropped first)")
    index_ray_min_vectors: int = Field(2_000_000, ge=0, description="index build: catalogues of at least this "
                                       "many vectors build their shards in parallel on Ray (as does any build "
                                       "when IMSEARCH_RAY_ADDRESS is set)")
    max_k: int = Field(1000, gt=0)
    max_nprobe: int = Field(1024, gt=0, description="the most inverted lists a request may ask each shard to probe "
                                                    "(nprobe; 0 asks for the index's tuned value): any caller could "
                                                    "otherwise make every search an exhaustive scan")
    # Gated αQE (README Quality, "Query expansion, gated"): a query whose best hit scores below the index's τ is
    # searched again re-weighted by its top neighbours; a copy's best hit is itself, so it stays above τ and plain.
    qe_neighbours: int = Field(10, ge=0, le=50, description="αQE neighbours of a search that does not say `qe` "
                               "(0: no expansion unless a request asks for it)")
    qe_gate: float | None = Field(None, ge=-1, le=2, description="expand a query only when its best hit scores "
                                  "below this (cosine); unset: the τ each index version learned at build from "
                                  "synthetic copies of its catalogue; -1 never, 2 always")
    qe_gate_sample: int = Field(256, ge=0, le=10_000, description="embed: catalogue images copied (crop, JPEG, "
                                "rotation, colour, blur, ...) and embedded to learn the expansion gate τ from "
                                "(0: none; the index then expands only when IMSEARCH_QE_GATE says)")
    # Rocchio relevance feedback weights: query, mean of relevant hits, mean of not relevant hits
    feedback_alpha: float = Field(1.0, ge=0)
    feedback_beta: float = Field(0.75, ge=0)
    feedback_gamma: float = Field(0.15, ge=0)
    mmap_index: bool = Field(False, description="memory-map shard files instead of loading them into RAM")
    write_retries: int = Field(5, ge=0, description="an add/delete that loses the race to another writer is "
                                                    "redone on top of the winner this many times")
    gc_grace_s: float = Field(3600.0, ge=0, description="gc never removes a version (or a killed build's files) "
                                                        "younger than this")

    # --- serving
    max_message_bytes: int = Field(16 * 1024 * 1024, gt=1024, description="gRPC message size limit")

    max_batch: int = Field(256, gt=0, description="most queries in one SearchBatch / Embed call")
    auth_token: SecretStr | None = Field(None, description="bearer token every call must carry")
    tls_cert: Path | None = Field(None, description="server certificate (PEM): with tls_key, gRPC servers speak "
                                                    "TLS only")
    tls_key: Path | None = Field(None, description="server private key (PEM), e.g. a mounted secret file")
    tls_ca: Path | None = Field(None, description="CA (PEM) clients verify servers with: when set, every client "
                                                  "channel (router, gateway, health checks, CLI) uses TLS")
    # 1: fewer slots, fuller shared fan-outs. Each gRPC call costs CPU on both sides, so on a loaded host the calls
    # a query takes decide the rate (README Performance, the router rows: bench_transport compares slot counts).
    router_fanouts: int = Field(1, gt=0, description="fan-outs in flight at once; requests arriving while all "
                                                     "are busy share the next one")
    # A fan-out's searches ride one long-lived gRPC stream per shard replica: a message costs a shard server less
    # CPU than a unary call (README Performance, bench_shard's row). Off: a unary call each (always when tracing:
    # a span a call).
    shard_streams: bool = Field(True, description="router-to-shard searches as messages on one stream per "
                                                  "replica instead of a unary call each")
    router_queue: int = Field(4096, gt=0, description="requests waiting for a fan-out before RESOURCE_EXHAUSTED")
    collections: Path | None = Field(None, description="a collections file (JSON: name -> index and shards) the "
                                                           "router and gateway serve, followed while serving")
    reload_interval_s: float = Field(2.0, gt=0, description="shard servers look for a new published version")
    max_version_lag_s: float = Field(600.0, gt=0, description="a shard serving an older version than CURRENT names "
                                                              "for longer reports NOT_SERVING (to be replaced)")
    shard_timeout_s: float = Field(2.0, gt=0, description="default deadline of a shard call")
    hedge_after_ms: float = Field(20.0, gt=0, description="a shard call slower than this (or the shard's recent "
                                                          "p95, if longer) is also sent to the next replica")
    hedge_budget: float = Field(0.1, ge=0, le=1, description="hedges per shard call, at most (a token budget)")
    eject_after: int = Field(5, gt=0, description="failures, timeouts or lost hedges in a row that take a replica "
                                                  "out of service")
    eject_s: float = Field(1.0, gt=0, description="first back-off of an ejected replica before a health probe "
                                                  "(doubles while it fails, up to 30 s)")
    embed_batch: int = Field(32, gt=0, description="online embedder: images per model batch")
    embed_max_wait_ms: float = Field(5.0, ge=0, description="online embedder: wait this long to fill a batch")
    embed_timeout_s: float = Field(10.0, gt=0, description="router -> embedder call deadline")
    embed_queue: int = Field(64, gt=0, description="online embedder: requests queued before RESOURCE_EXHAUSTED")
    redis_url: str | None = Field(None, description="query cache, e.g. redis://localhost:6379/0")
    cache_secret: SecretStr | None = Field(None, description="key of the query cache's seal (an HMAC of each "
                                           "entry), the same for every router sharing a Redis: without it whoever "
                                           "can write Redis could forge answers. Unset: a random key per router on "
                                           "loopback; a router listening beyond loopback refuses to start")
    cache_ttl_s: int = Field(3600, gt=0)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0: off)")
    otlp_endpoint: str | None = Field(None, description="host:port of an OTLP/gRPC collector: traces are exported "
                                                        "there (unset: no tracing)")
    otlp_secure: bool = Field(False, description="TLS to the OTLP collector")

    # --- HTTP gateway
    gateway_port: int = Field(8080, ge=0, le=65535)
    gateway_api_keys: SecretStr | None = Field(None, description="comma-separated API keys; unset: no keys needed")
    gateway_rate_per_s: float = Field(0.0, ge=0, description="requests per second per key (or client); 0: no limit")
    gateway_burst: int = Field(20, gt=0, description="requests a key may make at once before the rate applies")
    gateway_cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty: none")
    gateway_trusted_proxies: str = Field("", description="comma-separated addresses / networks of proxies (an "
                                                         "ingress) whose X-Forwarded-For is believed; empty: none")
    gateway_timeout_s: float = Field(10.0, gt=0, description="deadline of one search through the router")
    gateway_limits_redis_url: str | None = Field(None, description="Redis of the gateways' rate-limit windows: an "
                                                 "instance of its own whose maxmemory-policy is noeviction (cache "
                                                 "pressure must not evict a window); unset: IMSEARCH_REDIS_URL's")

    def limits_redis_url(self) -> str | None:
        """Where the gateways count rate limits (IMSEARCH_GATEWAY_LIMITS_REDIS_URL, else the cache's Redis)."""
        return self.gateway_limits_redis_url or self.redis_url

    def model_cache(self) -> Path:
        """Where models exported for the inference runtime are kept (embedder/runtime.py)."""
        return self.model_cache_dir or self.home / "models"

    def file_cache(self) -> Path:
        """Where local copies of an object store's shard files are kept (filecache.verified_file)."""
        return self.home / "cache"

    def token(self) -> str | None:
        """The bearer token gRPC calls carry and servers demand (None: no auth)."""
        return self.auth_token.get_secret_value() if self.auth_token else None

    @field_validator("auth_token", "gateway_api_keys", "tls_cert", "tls_key", "tls_ca", "cache_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, v):
        """An empty variable (compose's ${VAR:-}) means unset, not the empty token or the current folder."""
        return None if v is None or (isinstance(v, str) and not v.strip()) else v

    # --- tests
    crash_at: str | None = Field(None, description="test only: die (SIGKILL) at this named crash point "
                                                   "(services/common/faults.py)")

    @field_validator("crash_at")
    @classmethod
    def _known_point(cls, v: str | None) -> str | None:
        if v and v not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {v!r}; known: {', '.join(CRASH_POINTS)}")
        return v or None

    @field_validator("s3_endpoint")
    @classmethod
    def _no_scheme(cls, v: str) -> str:
        if "://" in v:
            raise ValueError("s3_endpoint is host:port without a scheme; use IMSEARCH_S3_SECURE for https")
        return v

    @model_validator(mode="after")
    def _tls_files(self):
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        for path in (self.tls_cert, self.tls_key, self.tls_ca):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self


SECRETS_DIR = "IMSEARCH_SECRETS_DIR"  # not a setting itself: the folder the settings' secret files are read from


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings read and validated once per process (tests call get_settings.cache_clear()). Secrets may
    also come as files in IMSEARCH_SECRETS_DIR, one per setting (e.g. imsearch_auth_token), as mounted
    Kubernetes/Docker secrets are."""
    return Settings(_secrets_dir=os.environ.get(SECRETS_DIR) or None)
