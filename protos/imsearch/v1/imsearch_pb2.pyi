from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Hit(_message.Message):
    __slots__ = ("id", "uri", "score", "shard")
    ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    id: int
    uri: str
    score: float
    shard: int
    def __init__(self, id: _Optional[int] = ..., uri: _Optional[str] = ..., score: _Optional[float] = ..., shard: _Optional[int] = ...) -> None: ...

class HitList(_message.Message):
    __slots__ = ("hits",)
    HITS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("vectors", "model", "dim")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[Vector]
    model: str
    dim: int
    def __init__(self, vectors: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., model: _Optional[str] = ..., dim: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "dim", "fingerprint", "image_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    fingerprint: str
    image_size: int
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ...) -> None: ...

class ShardSearchRequest(_message.Message):
    __slots__ = ("queries", "dim", "k", "nprobe", "index_version", "assign", "assign_scores", "filter")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    ASSIGN_SCORES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    queries: bytes
    dim: int
    k: int
    nprobe: int
    index_version: str
    assign: bytes
    assign_scores: bytes
    filter: str
    def __init__(self, queries: _Optional[bytes] = ..., dim: _Optional[int] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., index_version: _Optional[str] = ..., assign: _Optional[bytes] = ..., assign_scores: _Optional[bytes] = ..., filter: _Optional[str] = ...) -> None: ...

class ShardSearchResponse(_message.Message):
    __slots__ = ("scores", "ids", "uris", "index_version", "shard", "latest_version")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    scores: bytes
    ids: bytes
    uris: _containers.RepeatedScalarFieldContainer[str]
    index_version: str
    shard: int
    latest_version: str
    def __init__(self, scores: _Optional[bytes] = ..., ids: _Optional[bytes] = ..., uris: _Optional[_Iterable[str]] = ..., index_version: _Optional[str] = ..., shard: _Optional[int] = ..., latest_version: _Optional[str] = ...) -> None: ...

class ShardStreamRequest(_message.Message):
    __slots__ = ("tag", "request")
    TAG_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    tag: int
    request: ShardSearchRequest
    def __init__(self, tag: _Optional[int] = ..., request: _Optional[_Union[ShardSearchRequest, _Mapping]] = ...) -> None: ...

class ShardStreamResponse(_message.Message):
    __slots__ = ("tag", "response", "code", "details")
    TAG_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    tag: int
    response: ShardSearchResponse
    code: int
    details: str
    def __init__(self, tag: _Optional[int] = ..., response: _Optional[_Union[ShardSearchResponse, _Mapping]] = ..., code: _Optional[int] = ..., details: _Optional[str] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard", "count", "sha256", "index_version", "file", "dim", "model_fingerprint", "published_version", "failed_version", "failed_error", "version_lag_seconds")
    SHARD_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILED_ERROR_FIELD_NUMBER: _ClassVar[int]
    VERSION_LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    shard: int
    count: int
    sha256: str
    index_version: str
    file: str
    dim: int
    model_fingerprint: str
    published_version: str
    failed_version: str
    failed_error: str
    version_lag_seconds: float
    def __init__(self, shard: _Optional[int] = ..., count: _Optional[int] = ..., sha256: _Optional[str] = ..., index_version: _Optional[str] = ..., file: _Optional[str] = ..., dim: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., published_version: _Optional[str] = ..., failed_version: _Optional[str] = ..., failed_error: _Optional[str] = ..., version_lag_seconds: _Optional[float] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("vectors", "found", "index_version")
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    vectors: _containers.RepeatedCompositeFieldContainer[Vector]
    found: _containers.RepeatedScalarFieldContainer[bool]
    index_version: str
    def __init__(self, vectors: _Optional[_Iterable[_Union[Vector, _Mapping]]] = ..., found: _Optional[_Iterable[bool]] = ..., index_version: _Optional[str] = ...) -> None: ...

class Query(_message.Message):
    __slots__ = ("image", "vector", "id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    vector: Vector
    id: int
    def __init__(self, image: _Optional[bytes] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., id: _Optional[int] = ...) -> None: ...

class Feedback(_message.Message):
    __slots__ = ("relevant", "not_relevant")
    RELEVANT_FIELD_NUMBER: _ClassVar[int]
    NOT_RELEVANT_FIELD_NUMBER: _ClassVar[int]
    relevant: _containers.RepeatedScalarFieldContainer[int]
    not_relevant: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, relevant: _Optional[_Iterable[int]] = ..., not_relevant: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("query", "k", "nprobe", "feedback", "qe", "filter", "collection")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    QE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    query: Query
    k: int
    nprobe: int
    feedback: Feedback
    qe: int
    filter: str
    collection: str
    def __init__(self, query: _Optional[_Union[Query, _Mapping]] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., feedback: _Optional[_Union[Feedback, _Mapping]] = ..., qe: _Optional[int] = ..., filter: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "index_version", "coverage", "missing_shards", "cached", "expanded")
    HITS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[Hit]
    index_version: str
    coverage: float
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    cached: bool
    expanded: bool
    def __init__(self, hits: _Optional[_Iterable[_Union[Hit, _Mapping]]] = ..., index_version: _Optional[str] = ..., coverage: _Optional[float] = ..., missing_shards: _Optional[_Iterable[int]] = ..., cached: _Optional[bool] = ..., expanded: _Optional[bool] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries", "k", "nprobe", "columnar", "qe", "filter", "collection")
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    COLUMNAR_FIELD_NUMBER: _ClassVar[int]
    QE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[Query]
    k: int
    nprobe: int
    columnar: bool
    qe: int
    filter: str
    collection: str
    def __init__(self, queries: _Optional[_Iterable[_Union[Query, _Mapping]]] = ..., k: _Optional[int] = ..., nprobe: _Optional[int] = ..., columnar: _Optional[bool] = ..., qe: _Optional[int] = ..., filter: _Optional[str] = ..., collection: _Optional[str] = ...) -> None: ...

class HitColumns(_message.Message):
    __slots__ = ("k", "ids", "scores", "uris", "shards")
    K_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    URIS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    k: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    uris: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, k: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., uris: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[int]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("results", "columns", "index_version", "coverage", "missing_shards", "expanded")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    MISSING_SHARDS_FIELD_NUMBER: _ClassVar[int]
    EXPANDED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    columns: HitColumns
    index_version: str
    coverage: float
    missing_shards: _containers.RepeatedScalarFieldContainer[int]
    expanded: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, results: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ..., columns: _Optional[_Union[HitColumns, _Mapping]] = ..., index_version: _Optional[str] = ..., coverage: _Optional[float] = ..., missing_shards: _Optional[_Iterable[int]] = ..., expanded: _Optional[_Iterable[bool]] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("index_version", "model", "metric", "factory", "count", "nprobe", "shards", "created_at", "collection", "collections", "fields", "has_qe_gate", "qe_gate", "qe_neighbours", "qe_gate_from")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    FACTORY_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    HAS_QE_GATE_FIELD_NUMBER: _ClassVar[int]
    QE_GATE_FIELD_NUMBER: _ClassVar[int]
    QE_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    QE_GATE_FROM_FIELD_NUMBER: _ClassVar[int]
    index_version: str
    model: ModelInfo
    metric: str
    factory: str
    count: int
    nprobe: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    created_at: str
    collection: str
    collections: _containers.RepeatedScalarFieldContainer[str]
    fields: _containers.ScalarMap[str, str]
    has_qe_gate: bool
    qe_gate: float
    qe_neighbours: int
    qe_gate_from: str
    def __init__(self, index_version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., metric: _Optional[str] = ..., factory: _Optional[str] = ..., count: _Optional[int] = ..., nprobe: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., created_at: _Optional[str] = ..., collection: _Optional[str] = ..., collections: _Optional[_Iterable[str]] = ..., fields: _Optional[_Mapping[str, str]] = ..., has_qe_gate: _Optional[bool] = ..., qe_gate: _Optional[float] = ..., qe_neighbours: _Optional[int] = ..., qe_gate_from: _Optional[str] = ...) -> None: ...
