"""HTTP/JSON gateway in front of the router (gRPC), and the search web page.

POST /v1/search (multipart image, or JSON vector / id / uri, with optional relevance feedback),
POST /v1/search/batch, GET /v1/images/{id} (thumbnail from the Store), GET /v1/index, /healthz,
/readyz, /metrics, /docs (OpenAPI) and / (the page). Errors: {"error": {"code", "message"}} with the
HTTP status of the domain error (errors.http_status).

The routes are module-level functions over one `Gateway` (the app's state): the router client, the
catalogue, the limits. `create_app` wires them with the middleware and the error handlers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import grpc
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos.imsearch.v1 import imsearch_pb2 as pb
from services.common import tracing
from services.common.config import Settings
from services.common.convert import hits_from_proto
from services.common.errors import (
    DeadlineExceeded,
    ImsearchError,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthenticated,
    http_status,
)
from services.common.validate import (
    INT64_MAX,
    INT64_MIN,
    UINT32_MAX,
    check_id,
    check_k,
    check_nprobe,
    check_qe,
    check_range,
    quote,
)
from services.gateway.catalogue import Catalogue
from services.gateway.limits import (
    AUTH_FAILURE_BURST,
    AUTH_FAILURES_PER_S,
    RateLimit,
    caller_id,
    check_collection,
    key_of,
    nprobe_caps,
    parse_keys,
)
from services.index.filters import MAX_FILTER_CHARS, MAX_LIST, MAX_NODES
from services.searcher.client import RouterClient, batch_request, search_request
from services.searcher.collections import parse_collections
from services.searcher.feedback import MAX_FEEDBACK

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
REQUESTS = Counter("imsearch_gateway_requests_total", "HTTP requests", ["path", "status"])
LATENCY = Histogram("imsearch_gateway_latency_seconds", "HTTP request latency", ["path"])
ROUTER_CALLS = Counter("imsearch_gateway_router_calls_total", "requests that reached the router (a protobuf request "
                       "built from the HTTP one)", ["method"])
STORAGE_THREADS = 8  # catalogue and thumbnail reads in flight at once
MAX_VECTOR_DIM = 8192  # the widest query vector taken (the models here make 1,280 at most; ResNet-50 2,048)


# Every number is checked against its protobuf field's range here: out of range is a 400 naming the field.
Id = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
UInt32 = Annotated[int, Field(ge=0, le=UINT32_MAX)]


class Feedback(BaseModel):
    relevant: list[Id] = Field(default_factory=list, max_length=MAX_FEEDBACK)
    not_relevant: list[Id] = Field(default_factory=list, max_length=MAX_FEEDBACK)


class Query(BaseModel):
    """One of: vector, id (catalogue id), uri (of a catalogue image), image_b64 (encoded image)."""
    vector: list[float] | None = Field(None, max_length=MAX_VECTOR_DIM)
    id: Id | None = None
    uri: str | None = None
    image_b64: str | None = None


class Filtered(BaseModel):
    """Only catalogue rows matching a filter: `filter` a JSON filter ({"in_stock": true, "price": {"lt": 120}}),
    or `where` the same as an expression ('in_stock and price < 120'). The router parses and checks it."""
    filter: dict | None = None
    where: str | None = Field(None, max_length=MAX_FILTER_CHARS)

    def filter_text(self) -> str:
        return filter_text(self.filter, self.where)


class SearchBody(Query, Filtered):
    k: UInt32 = 10
    nprobe: UInt32 = 0
    qe: UInt32 | None = None  # αQE neighbours (unset: gated, the index's default; 0: off; N: always)
    feedback: Feedback = Field(default_factory=Feedback)


class BatchBody(Filtered):
    queries: list[Query]
    k: UInt32 = 10
    nprobe: UInt32 = 0
    qe: UInt32 | None = None


def filter_text(obj: dict | str | None, where: str | None) -> str:
    """The filter as the gRPC API takes it (JSON text or an expression); "" for none."""
    if obj is not None and where:
        raise InvalidInput("give a filter as 'filter' (JSON) or as 'where' (an expression), not both")
    text = where or ("" if obj is None else obj if isinstance(obj, str) else json.dumps(obj))
    if len(text) > MAX_FILTER_CHARS:
        raise TooLarge(f"filter of {len(text)} characters; the limit is {MAX_FILTER_CHARS}")
    return text


@dataclass
class Gateway:
    """Everything the routes share: one per app."""
    settings: Settings
    router_address: str
    catalogue: Catalogue  # the default collection's (the router's first)
    keys: dict[str, frozenset[str] | None]  # API key -> the collections it may use (None: all)
    nprobe_caps: dict[str, int]  # API key -> the most nprobe it may ask, below IMSEARCH_MAX_NPROBE
    limit: RateLimit
    failures: RateLimit  # failed key attempts per address: guesses cannot run at line speed
    max_upload: int  # bytes: an upload travels on to the router in one gRPC message
    client: RouterClient | None = None  # opened with the app's event loop (lifespan)
    storage: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(STORAGE_THREADS, "storage"))
    catalogues: dict[str, Catalogue] = field(default_factory=dict)  # named collections' (IMSEARCH_COLLECTIONS)

    def catalogue_of(self, collection: str) -> Catalogue:
        """The catalogue (uris, thumbnails) of a collection ("" = the default one), its index root read from
        the collections file the router follows (re-read for a collection not seen yet)."""
        if not collection:
            return self.catalogue
        if collection not in self.catalogues and self.settings.collections:
            specs = parse_collections(self.settings.collections.read_text(), str(self.settings.collections))
            for spec in specs:
                if spec.index and spec.name not in self.catalogues:
                    self.catalogues[spec.name] = Catalogue(spec.index, self.settings)
        if collection not in self.catalogues:
            raise NotFound(f"no collection {collection!r}")
        return self.catalogues[collection]

    @classmethod
    def from_settings(cls, router_address: str, index_url: str, settings: Settings) -> "Gateway":
        return cls(settings, router_address, Catalogue(index_url, settings), parse_keys(settings.gateway_api_keys),
                   nprobe_caps(settings.gateway_api_keys),
                   RateLimit(settings.gateway_rate_per_s, settings.gateway_burst, settings.limits_redis_url()),
                   RateLimit(AUTH_FAILURES_PER_S, AUTH_FAILURE_BURST, settings.limits_redis_url()),
                   min(settings.max_image_bytes, settings.max_message_bytes - 64 * 1024))

    @property
    def max_body(self) -> int:
        return self.max_upload + 64 * 1024  # the image plus form fields

    async def guard(self, request: Request) -> None:
        """Keys, rate limit and upload size of a /v1 call, before any body is read. A failed key attempt is
        charged to the caller's address (in the rate limit, and in a limit of its own), and an address past its
        limit of failed attempts is refused whatever key it sends until its window passes: were the right key let
        through, the answer would tell a guesser when it hit. The address is the forwarded one only behind a
        trusted proxy (IMSEARCH_GATEWAY_TRUSTED_PROXIES, applied by uvicorn)."""
        address = request.client.host if request.client else "?"
        if self.keys:
            await self.failures.check(f"failed key from {address}")
        try:
            caller = key_of(request.headers, self.keys)
        except Unauthenticated:
            await self.failures.take(f"failed key from {address}")
            await self.limit.take(caller_id(None, address))
            raise
        path = request.url.path
        if path.startswith(("/v1/search", "/v1/images/", "/v1/collections/")):  # /v1/index lists what a key may use
            check_collection(self.keys, caller, collection_of(path))
        request.state.api_key = caller  # for the routes (what /v1/index lists)
        await self.limit.take(caller_id(caller, address))
        size = request.headers.get("content-length") or "0"
        if not size.isdigit():
            raise InvalidInput(f"content-length {quote(size)} is not a byte count")
        if int(size) > self.max_body:
            raise TooLarge(f"request body of {size} bytes over the upload limit of {self.max_upload} bytes")

    async def stored(self, fn, *args):
        """A storage read (catalogue, thumbnails) in the gateway's own bounded thread pool, never on the event
        loop, and waited for at most the gateway's deadline: a hung store costs those calls a 504, nothing
        else (searches by image, vector or id and /healthz never touch storage)."""
        future = asyncio.get_running_loop().run_in_executor(self.storage, fn, *args)
        try:
            return await asyncio.wait_for(future, self.settings.gateway_timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the index storage did not answer within {self.settings.gateway_timeout_s} s") \
                from None

    async def query(self, q: Query, collection: str = "") -> pb.Query:
        """The protobuf query; only a uri the loaded catalogue does not know goes to storage (the pool)."""
        if q.uri is not None and (collection or self.catalogue.known(q.uri) is None):
            return await self.stored(self.to_query, q, collection)
        return self.to_query(q)

    def to_query(self, q: Query, collection: str = "") -> pb.Query:
        given = [name for name in ("vector", "id", "uri", "image_b64") if getattr(q, name) is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of vector, id, uri, image_b64 (got {given or 'none'})")
        if q.vector is not None:
            return pb.Query(vector=pb.Vector(values=q.vector))
        if q.id is not None:
            return pb.Query(id=q.id)
        if q.uri is not None:
            return pb.Query(id=self.uri_to_id(q.uri, collection))
        try:
            return pb.Query(image=base64.b64decode(q.image_b64, validate=True))
        except ValueError:
            raise InvalidInput("image_b64 is not valid base64") from None

    def uri_to_id(self, uri: str, collection: str = "") -> int:
        """A catalogue uri, or a link to one of this gateway's thumbnails (/v1/images/ID)."""
        tail = uri.rstrip("/").rsplit("/v1/images/", 1)
        if len(tail) == 2 and tail[1].split("?")[0].isdigit():
            return int(tail[1].split("?")[0])
        return self.catalogue_of(collection).id_of(uri)

    def nprobe_cap(self, caller: str | None) -> int:
        """The most nprobe this caller may ask: IMSEARCH_MAX_NPROBE, or its key's lower cap (`KEY:nprobe=N`)."""
        return min(self.settings.max_nprobe, self.nprobe_caps.get(caller or "", self.settings.max_nprobe))

    async def search(self, query: pb.Query, k: int, nprobe: int, feedback: Feedback, qe: int | None = None,
                     where: str = "", collection: str = "", caller: str | None = None) -> dict:
        check_k(k, self.settings.max_k)
        check_nprobe(nprobe, self.nprobe_cap(caller))
        if qe is not None:
            check_qe(qe)
        start = time.perf_counter()
        request = search_request(query, k, nprobe, feedback.relevant, feedback.not_relevant, qe, where)
        request.collection = collection
        ROUTER_CALLS.labels("Search").inc()
        reply = await self.client.call("Search", request)
        out = answer(reply, k, start, collection)
        if query.WhichOneof("query") == "id":  # a catalogue image: the page shows it as the query
            out["query"] = {"id_str": str(query.id),
                            "thumbnail": thumbnail_link(query.id, reply.index_version, collection)}
        return out


def answer(reply: pb.SearchResponse, k: int, start: float, collection: str = "") -> dict:
    hits = hits_from_proto(pb.HitList(hits=reply.hits))
    version = reply.index_version
    return {"k": k, "index_version": version, "coverage": reply.coverage, **({"collection": collection}
                                                                          if collection else {}),
            "partial": reply.coverage < 1.0, "missing_shards": list(reply.missing_shards),
            "cached": reply.cached, "expanded": reply.expanded,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
            # id_str: 64-bit ids lose digits as JavaScript numbers; a thumbnail comes from the version that answered
            "results": [{**h.as_dict(), "id_str": str(h.id), "thumbnail": thumbnail_link(h.id, version, collection)}
                        for h in hits]}


def thumbnail_link(id_: int, version: str = "", collection: str = "") -> str:
    base = f"/v1/collections/{collection}/images/{id_}" if collection else f"/v1/images/{id_}"
    return base + (f"?version={version}" if version else "")


def collection_of(path: str) -> str | None:
    """The collection a /v1/collections/NAME[/...] path names (None: a route of the default collection)."""
    parts = path.split("/")
    return parts[3] if len(parts) > 3 and parts[1:3] == ["v1", "collections"] and parts[3] else None


def error_response(exc: BaseException) -> JSONResponse:
    status, code = http_status(exc)
    message = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
    headers = {"Retry-After": str(getattr(exc, "retry_after", 1))} if status == 429 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class JsonShape:
    """What a JSON search body may hold: the objects and arrays its queries and its filter can — a batch one object
    and one vector per query (at most max_batch: IMSEARCH_MAX_BATCH), a filter two objects and an array per part
    (filters.MAX_NODES) — and the values (commas) of a vector of at most MAX_VECTOR_DIM per query, an in-list and
    feedback ids. More is refused before it is parsed, counted as the body arrives: a parser makes a Python object
    of each, and a body of many tiny ones cost the gateway many times its size before anything could count its
    queries. Brackets and commas inside strings count too: the bound is generous, never short."""

    def __init__(self, path: str, max_batch: int):
        self.queries = max_batch if path.endswith("/search/batch") else 1
        self.allowed = {b"{": 2 + self.queries + 2 * MAX_NODES, b"[": 3 + self.queries + MAX_NODES,
                        b",": 16 + self.queries * (MAX_VECTOR_DIM + 4) + MAX_LIST + 2 * MAX_FEEDBACK + 4 * MAX_NODES}
        self.seen = dict.fromkeys(self.allowed, 0)

    def add(self, chunk: bytes) -> None:
        """Count a chunk of the body; TooLarge once a count goes past its bound."""
        for mark, most in self.allowed.items():
            self.seen[mark] += chunk.count(mark)
            if self.seen[mark] > most:
                raise TooLarge(f"a JSON search body holds at most {self.queries} quer"
                               f"{'ies' if self.queries > 1 else 'y'} (IMSEARCH_MAX_BATCH) and one filter: this one "
                               f"has over {most} '{mark.decode()}'")


class BodyLimit:
    """ASGI middleware: a /v1 request body is read up to `limit` bytes, chunked or not, and answered 413
    the moment it goes past — without reading the rest; so is a JSON search body the moment it holds more than its
    queries and filter can (JsonShape). A body within the limits is handed on whole."""

    def __init__(self, app, limit: int, max_batch: int):
        self.app, self.limit, self.max_batch = app, limit, max_batch

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        json_search = scope["path"].endswith(("/search", "/search/batch")) and any(
            name == b"content-type" and value.startswith(b"application/json") for name, value in scope["headers"])
        shape = JsonShape(scope["path"], self.max_batch) if json_search else None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            try:
                if size > self.limit:
                    raise TooLarge(f"request body over the upload limit of {self.limit} bytes")
                if shape is not None:
                    shape.add(chunk)
            except TooLarge as error:
                return await error_response(error)(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body, handed = b"".join(chunks), False

        async def replay():
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


routes = APIRouter()


@routes.post("/v1/search", summary="Search by an uploaded image (multipart) or a JSON query")
@routes.post("/v1/collections/{collection}/search", summary="Search one named collection")
async def search_endpoint(request: Request, collection: str = "", gw: Gateway = Depends(gateway)) -> dict:
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=12)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("multipart search needs a file field named 'image'")
        data = await upload.read(gw.max_upload + 1)
        if len(data) > gw.max_upload:
            raise TooLarge(f"image over the upload limit of {gw.max_upload} bytes")
        if not data:
            raise InvalidInput("empty file (0 bytes)")
        try:
            feedback = Feedback(relevant=_ids(form.get("relevant")), not_relevant=_ids(form.get("not_relevant")))
        except ValidationError as e:
            raise InvalidInput(field_error(e.errors())) from None
        k, nprobe, qe = (_int(name, form.get(name), default) for name, default in (("k", 10), ("nprobe", 0),
                                                                                     ("qe", None)))
        where = filter_text(_text(form.get("filter")), _text(form.get("where")))
        return await gw.search(pb.Query(image=data), k, nprobe, feedback, qe, where, collection,
                               request.state.api_key)
    if kind.startswith("application/json"):
        try:
            body = SearchBody.model_validate_json(await request.body())
        except ValidationError as e:
            raise InvalidInput(field_error(e.errors())) from None
        query = await gw.query(body, collection)
        return await gw.search(query, body.k, body.nprobe, body.feedback, body.qe, body.filter_text(), collection,
                               request.state.api_key)
    raise InvalidInput(f"content type {quote(kind) if kind else 'missing'}: send multipart/form-data "
                       "(field 'image') or JSON")


@routes.post("/v1/search/batch", summary="Several JSON queries in one call")
@routes.post("/v1/collections/{collection}/search/batch", summary="Several JSON queries in one named collection")
async def batch_endpoint(request: Request, body: BatchBody, collection: str = "",
                         gw: Gateway = Depends(gateway)) -> dict:
    start = time.perf_counter()
    if not body.queries:
        raise InvalidInput("a batch needs at least one query")
    check_k(body.k, gw.settings.max_k)
    check_nprobe(body.nprobe, gw.nprobe_cap(request.state.api_key))
    if body.qe is not None:
        check_qe(body.qe)
    queries = [await gw.query(q, collection) for q in body.queries]
    request = batch_request(queries, body.k, body.nprobe, qe=body.qe, where=body.filter_text())
    request.collection = collection
    ROUTER_CALLS.labels("SearchBatch").inc()
    reply = await gw.client.call("SearchBatch", request)
    return {"index_version": reply.index_version, "coverage": reply.coverage, "partial": reply.coverage < 1.0,
            "missing_shards": list(reply.missing_shards), "latency_ms": round((time.perf_counter() - start) * 1000, 2),
            "results": [answer(r, body.k, start, collection)["results"] for r in reply.results],
            "expanded": [r.expanded for r in reply.results]}


@routes.get("/v1/images/{id_}", summary="Thumbnail of a catalogue image (JPEG, at most 256 px), of the published "
                                        "version or of `version`")
@routes.get("/v1/collections/{collection}/images/{id_}", summary="Thumbnail of an image of a named collection")
async def image_endpoint(id_: Id, version: str | None = None, collection: str = "",
                         gw: Gateway = Depends(gateway)) -> Response:
    catalogue = await gw.stored(gw.catalogue_of, collection)
    data = await gw.stored(catalogue.thumbnail, id_, version)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@routes.get("/v1/index", summary="The served index (the default collection): version, size, model, shards, "
                                  "filterable fields, and the collections the router serves")
@routes.get("/v1/collections/{collection}", summary="One named collection, as /v1/index describes the default")
async def index_endpoint(request: Request, collection: str = "", gw: Gateway = Depends(gateway)) -> dict:
    info = await gw.client.call("Info", pb.InfoRequest(collection=collection))
    allowed = gw.keys.get(request.state.api_key or "") if gw.keys else None
    names = [c for c in info.collections if allowed is None or c in allowed]
    if allowed is not None and not collection:
        # A key limited to collections reads each of them by name (/v1/collections/NAME), never the default one's
        # version, size, fields or model unnamed: here it learns only which it may use.
        return {"collections": names}
    return {"collection": info.collection, "index_version": info.index_version, "count": info.count,
            "factory": info.factory, "nprobe": info.nprobe, "metric": info.metric, "created_at": info.created_at,
            "model": {"name": info.model.name, "dim": info.model.dim, "fingerprint": info.model.fingerprint},
            "fields": dict(info.fields),
            # A search without qe expands with qe_neighbours when its best hit scores below tau (null: never)
            "query_expansion": {"neighbours": info.qe_neighbours, "tau": info.qe_gate if info.has_qe_gate else None,
                                "tau_from": info.qe_gate_from},
            "shards": [{"shard": s.shard, "count": s.count, "index_version": s.index_version} for s in info.shards],
            "collections": names}


@routes.get("/healthz", include_in_schema=False)
async def healthz() -> dict:
    return {"status": "ok"}


@routes.get("/readyz", include_in_schema=False)
async def readyz(gw: Gateway = Depends(gateway)) -> JSONResponse:
    """Ready while the router answers; "degraded" (still 200: searches work) while storage fails, so
    thumbnails and searches by uri may not."""
    try:
        await gw.client.info(timeout=2.0)
    except grpc.RpcError as e:
        return JSONResponse({"status": "unavailable", "router": e.code().name}, status_code=503)
    if gw.catalogue.storage_error:
        return JSONResponse({"status": "degraded", "storage": gw.catalogue.storage_error})
    return JSONResponse({"status": "ready"})


@routes.get("/metrics", include_in_schema=False)
async def metrics_endpoint() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@routes.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html")


def path_label(path: str) -> str:
    """The metrics label of a path: image ids and collection names never become label values."""
    name = collection_of(path)
    if name is not None:
        path = path.replace(f"/v1/collections/{name}", "/v1/collections/{name}", 1)
    head, sep, tail = path.rpartition("/images/")
    return head + sep + "{id}" if sep and tail else path


async def guard(request: Request, call_next):
    """Keys, rate limit and upload size before any body is read; metrics for every request."""
    start, path = time.perf_counter(), request.url.path
    label = path_label(path)
    try:
        if path.startswith("/v1/"):
            await request.app.state.gateway.guard(request)
        response = await call_next(request)
    except (ImsearchError, grpc.RpcError) as e:
        response = error_response(e)
    REQUESTS.labels(label, str(response.status_code)).inc()
    LATENCY.labels(label).observe(time.perf_counter() - start)
    return response


async def domain_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def field_error(errors) -> str:
    """'field.path: what is wrong' of the first validation error (never the input itself)."""
    first = errors[0] if errors else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    return f"{where or 'JSON body'}: {first.get('msg', 'invalid request')}"


async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(InvalidInput(field_error(exc.errors())))


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: logged whole, answered as JSON like every other error (never a plain-text 500)."""
    log.exception("unhandled error on %s", request.url.path)
    return JSONResponse({"error": {"code": "INTERNAL", "message": "internal error"}}, status_code=500)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)


@asynccontextmanager
async def lifespan(app: FastAPI):
    gw: Gateway = app.state.gateway
    gw.client = RouterClient.from_settings(gw.router_address, gw.settings)
    loading = asyncio.get_running_loop().run_in_executor(gw.storage, gw.catalogue.refresh)  # not waited for:
    loading.add_done_callback(lambda f: f.exception() and log.warning("catalogue not loaded yet: %s", f.exception()))
    yield  # a slow or hung store must not hold the gateway's start
    await gw.client.close()
    gw.storage.shutdown(wait=False, cancel_futures=True)


def create_app(router_address: str, index_url: str, settings: Settings) -> FastAPI:
    app = FastAPI(title="imsearch gateway", version="1", lifespan=lifespan,
                  description="Search a catalogue of images by image, vector or catalogue id.")
    app.state.gateway = gw = Gateway.from_settings(router_address, index_url, settings)
    # innermost: after the guard's key and rate checks
    app.add_middleware(BodyLimit, limit=gw.max_body, max_batch=settings.max_batch)
    app.middleware("http")(guard)
    origins = [o.strip() for o in settings.gateway_cors_origins.split(",") if o.strip()]
    if origins:  # added last, so outermost: preflights and the guard's 401/429 answers get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])
    app.add_exception_handler(ImsearchError, domain_error)
    app.add_exception_handler(grpc.RpcError, domain_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(routes)
    tracing.instrument_fastapi(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _int(name: str, value, default: int | None) -> int | None:
    """A form field as a 32-bit unsigned integer (the protobuf field it goes into)."""
    if value in (None, ""):
        return default
    try:
        return check_range(name, int(value), 0, UINT32_MAX)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name}: expected an integer, got {quote(value)}") from None


def _text(value) -> str | None:
    """A text form field (None when absent; a file where text belongs is refused)."""
    if value is None or isinstance(value, str):
        return value or None
    raise InvalidInput("filter and where are text fields, not files")


def _ids(value) -> list[int]:
    """'12,40' -> [12, 40] (form fields of the feedback): 64-bit catalogue ids."""
    out = []
    for v in str(value or "").replace(" ", ",").split(","):
        if v:
            try:
                out.append(check_id("feedback id", int(v)))
            except ValueError:
                raise InvalidInput(f"feedback id: expected an integer, got {quote(v)}") from None
    return out
