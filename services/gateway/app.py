"""HTTP/JSON gateway in front of the router (gRPC), and the search web page.

POST /v1/search (multipart image, or JSON vector / id / uri, with optional relevance feedback),
POST /v1/search/batch, GET /v1/images/{id} (thumbnail from the Store), GET /v1/index, /healthz,
/readyz, /metrics, /docs (OpenAPI) and / (the page). Errors: {"error": {"code", "message"}} with the
HTTP status of the domain error (errors.http_status).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import server
from services.common.config import Settings
from services.common.convert import hits_from_proto
from services.common.errors import ImsearchError, InvalidInput, TooLarge, http_status
from services.gateway.catalogue import Catalogue
from services.gateway.limits import RateLimit, key_of, parse_keys

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/static", "/favicon.ico")
REQUESTS = Counter("imsearch_gateway_requests_total", "HTTP requests", ["path", "status"])
LATENCY = Histogram("imsearch_gateway_latency_seconds", "HTTP request latency", ["path"])


class Feedback(BaseModel):
    relevant: list[int] = Field(default_factory=list)
    not_relevant: list[int] = Field(default_factory=list)


class Query(BaseModel):
    """One of: vector, id (catalogue id), uri (of a catalogue image), image_b64 (encoded image)."""
    vector: list[float] | None = None
    id: int | None = None
    uri: str | None = None
    image_b64: str | None = None


class SearchBody(Query):
    k: int = 10
    nprobe: int = 0
    feedback: Feedback = Field(default_factory=Feedback)


class BatchBody(BaseModel):
    queries: list[Query]
    k: int = 10
    nprobe: int = 0


def error_response(exc: BaseException) -> JSONResponse:
    status, code = http_status(exc)
    message = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
    headers = {"Retry-After": "1"} if status == 429 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(router_address: str, index_url: str, settings: Settings) -> FastAPI:
    keys = parse_keys(settings.gateway_api_keys)
    # An upload travels on to the router in one gRPC message: the smaller of the two limits applies.
    max_upload = min(settings.max_image_bytes, settings.max_message_bytes - 64 * 1024)
    limit = RateLimit(settings.gateway_rate_per_s, settings.gateway_burst)
    catalogue = Catalogue(index_url, settings)
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["channel"] = server.channel(router_address, settings)
        state["stub"] = pb_grpc.SearcherStub(state["channel"])
        await asyncio.to_thread(catalogue.refresh)
        yield
        await state["channel"].close()

    app = FastAPI(title="imsearch gateway", version="1", lifespan=lifespan,
                  description="Search a catalogue of images by image, vector or catalogue id.")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Keys, rate limit and upload size before any body is read; metrics for every request."""
        start, path = time.perf_counter(), request.url.path
        label = path if not path.startswith("/v1/images/") else "/v1/images/{id}"
        try:
            if path.startswith("/v1/"):
                caller = key_of(request.headers, keys) or (request.client.host if request.client else "?")
                limit.take(caller)
                size = int(request.headers.get("content-length") or 0)
                if size > max_upload + 64 * 1024:  # the image plus form fields
                    raise TooLarge(f"request body of {size} bytes over the upload limit of {max_upload} bytes")
            response = await call_next(request)
        except (ImsearchError, grpc.RpcError) as e:
            response = error_response(e)
        REQUESTS.labels(label, str(response.status_code)).inc()
        LATENCY.labels(label).observe(time.perf_counter() - start)
        return response

    origins = [o.strip() for o in settings.gateway_cors_origins.split(",") if o.strip()]
    if origins:  # added last, so outermost: preflights and the guard's 401/429 answers get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"])

    @app.exception_handler(ImsearchError)
    async def domain_error(request: Request, exc: ImsearchError):
        return error_response(exc)

    @app.exception_handler(grpc.RpcError)
    async def router_error(request: Request, exc: grpc.RpcError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error_response(InvalidInput(f"{where}: {first.get('msg', 'invalid request')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    def to_query(q: Query) -> pb.Query:
        given = [name for name in ("vector", "id", "uri", "image_b64") if getattr(q, name) is not None]
        if len(given) != 1:
            raise InvalidInput(f"give exactly one of vector, id, uri, image_b64 (got {given or 'none'})")
        if q.vector is not None:
            return pb.Query(vector=pb.Vector(values=q.vector))
        if q.id is not None:
            return pb.Query(id=q.id)
        if q.uri is not None:
            return pb.Query(id=uri_to_id(q.uri))
        try:
            return pb.Query(image=base64.b64decode(q.image_b64, validate=True))
        except ValueError:
            raise InvalidInput("image_b64 is not valid base64") from None

    def uri_to_id(uri: str) -> int:
        """A catalogue uri, or a link to one of this gateway's thumbnails (/v1/images/ID)."""
        tail = uri.rstrip("/").rsplit("/v1/images/", 1)
        if len(tail) == 2 and tail[1].split("?")[0].isdigit():
            return int(tail[1].split("?")[0])
        return catalogue.id_of(uri)

    def answer(reply: pb.SearchResponse, k: int, start: float) -> dict:
        hits = hits_from_proto(pb.HitList(hits=reply.hits))
        return {"k": k, "index_version": reply.index_version, "coverage": reply.coverage,
                "partial": reply.coverage < 1.0, "missing_shards": list(reply.missing_shards),
                "cached": reply.cached, "latency_ms": round((time.perf_counter() - start) * 1000, 2),
                "results": [{**h.as_dict(), "id_str": str(h.id), "thumbnail": f"/v1/images/{h.id}"}
                            for h in hits]}  # id_str: 64-bit ids lose digits as JavaScript numbers

    async def search(query: pb.Query, k: int, nprobe: int, feedback: Feedback) -> dict:
        start = time.perf_counter()
        request = pb.SearchRequest(query=query, k=k, nprobe=nprobe, feedback=pb.Feedback(
            relevant=feedback.relevant, not_relevant=feedback.not_relevant))
        reply = await state["stub"].Search(request, timeout=settings.gateway_timeout_s, metadata=metadata)
        out = answer(reply, k, start)
        if query.WhichOneof("query") == "id":  # a catalogue image: the page shows it as the query
            out["query"] = {"id_str": str(query.id), "thumbnail": f"/v1/images/{query.id}"}
        return out

    @app.post("/v1/search", summary="Search by an uploaded image (multipart) or a JSON query")
    async def search_endpoint(request: Request) -> dict:
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=10)
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                raise InvalidInput("multipart search needs a file field named 'image'")
            data = await upload.read(max_upload + 1)
            if len(data) > max_upload:
                raise TooLarge(f"image over the upload limit of {max_upload} bytes")
            if not data:
                raise InvalidInput("empty file (0 bytes)")
            feedback = Feedback(relevant=_ids(form.get("relevant")), not_relevant=_ids(form.get("not_relevant")))
            return await search(pb.Query(image=data), _int(form.get("k"), 10), _int(form.get("nprobe"), 0),
                                feedback)
        if kind.startswith("application/json"):
            try:
                body = SearchBody.model_validate_json(await request.body())
            except ValueError as e:
                raise InvalidInput(f"bad JSON query: {str(e).splitlines()[0]}") from None
            return await search(to_query(body), body.k, body.nprobe, body.feedback)
        raise InvalidInput(f"content type {kind or 'missing'}: send multipart/form-data (field 'image') or JSON")

    @app.post("/v1/search/batch", summary="Several JSON queries in one call")
    async def batch_endpoint(body: BatchBody) -> dict:
        start = time.perf_counter()
        if not body.queries:
            raise InvalidInput("a batch needs at least one query")
        request = pb.SearchBatchRequest(queries=[to_query(q) for q in body.queries], k=body.k, nprobe=body.nprobe)
        reply = await state["stub"].SearchBatch(request, timeout=settings.gateway_timeout_s, metadata=metadata)
        return {"index_version": reply.index_version, "coverage": reply.coverage, "partial": reply.coverage < 1.0,
                "missing_shards": list(reply.missing_shards),
                "latency_ms": round((time.perf_counter() - start) * 1000, 2),
                "results": [answer(r, body.k, start)["results"] for r in reply.results]}

    @app.get("/v1/images/{id_}", summary="Thumbnail of a catalogue image (JPEG, at most 256 px)")
    async def image_endpoint(id_: int) -> Response:
        data = await asyncio.to_thread(catalogue.thumbnail, id_)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/v1/index", summary="The served index: version, size, model, shards")
    async def index_endpoint() -> dict:
        info = await state["stub"].Info(pb.InfoRequest(), timeout=settings.gateway_timeout_s, metadata=metadata)
        return {"index_version": info.index_version, "count": info.count, "factory": info.factory,
                "nprobe": info.nprobe, "metric": info.metric, "created_at": info.created_at,
                "model": {"name": info.model.name, "dim": info.model.dim, "fingerprint": info.model.fingerprint},
                "shards": [{"shard": s.shard, "count": s.count, "index_version": s.index_version}
                           for s in info.shards]}

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        try:
            await state["stub"].Info(pb.InfoRequest(), timeout=2.0, metadata=metadata)
        except grpc.RpcError as e:
            return JSONResponse({"status": "unavailable", "router": e.code().name}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _int(value, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"expected an integer, got {value!r}") from None


def _ids(value) -> list[int]:
    """'12,40' -> [12, 40] (form fields of the feedback)."""
    return [_int(v, 0) for v in str(value or "").replace(" ", ",").split(",") if v]
