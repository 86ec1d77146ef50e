"""gRPC server bootstrap shared by every service: limits, auth, health, reflection,
domain errors -> status codes (the one place), graceful stop on SIGTERM."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import metrics, tracing
from services.common.config import Settings
from services.common.errors import ImsearchError

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def rpc(fn):
    """Wrap an async servicer method: a domain error aborts with its status code and message."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        reply, code, details = await settle(type(self).__name__, fn.__name__, fn(self, request, context))
        if code != grpc.StatusCode.OK:
            await context.abort(code, details)
        return reply

    return wrapper


async def settle(service: str, method: str, work: Awaitable) -> tuple[object, grpc.StatusCode, str]:
    """Run one request's work with what every request gets (in-flight gauge, count by status, latency):
    (reply, OK, "") or (None, status, message) — the one place errors become status codes, for a unary call
    (rpc) and for a message on a stream alike."""
    code = "OK"
    start = time.perf_counter()
    metrics.IN_FLIGHT.labels(service).inc()
    try:
        return await work, grpc.StatusCode.OK, ""
    except ImsearchError as e:
        code = e.code.name
        return None, e.code, str(e)
    except asyncio.CancelledError:  # the client went away, or a stop outlasted its grace
        code = "CANCELLED"
        log.warning("%s.%s cancelled while running", service, method)
        raise
    except Exception:
        code = "INTERNAL"
        log.exception("unhandled error in %s", method)
        return None, grpc.StatusCode.INTERNAL, f"internal error in {method}"
    finally:
        metrics.IN_FLIGHT.labels(service).dec()
        metrics.REQUESTS.labels(service, method, code).inc()
        metrics.LATENCY.labels(service, method).observe(time.perf_counter() - start)


def channel_options(settings: Settings) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes)]


def open_channel(address: str, tls_ca: Path | str | None = None, options=(), aio: bool = True):
    """A client channel: TLS verified against the CA file tls_ca when given, else plaintext."""
    kind = grpc.aio if aio else grpc
    if tls_ca:
        creds = grpc.ssl_channel_credentials(Path(tls_ca).read_bytes())
        return kind.secure_channel(address, creds, options=list(options))
    return kind.insecure_channel(address, options=list(options))


def channel(address: str, settings: Settings, aio: bool = True):
    """A client channel with the message limits, TLS when settings.tls_ca is set."""
    return open_channel(address, settings.tls_ca, channel_options(settings), aio)


def bearer_metadata(token: str | None) -> tuple | None:
    """The call metadata that carries a bearer token (None: no token, no metadata)."""
    return (("authorization", f"Bearer {token}"),) if token else None


class BearerAuth(grpc.aio.ServerInterceptor):
    """Calls must carry `authorization: Bearer <token>`; health checks stay open for probes."""

    def __init__(self, token: str):
        self.expected = f"Bearer {token}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        # A refusal of the method's own kind: a unary refusal of a stream leaves its caller an INTERNAL error.
        self.deny = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health.v1.Health/"):
            return handler
        given = str(dict(details.invocation_metadata or ()).get("authorization", "")).encode()
        if not hmac.compare_digest(given, self.expected):  # constant time: no timing oracle on the token
            return self.deny_stream if handler.stream_stream else self.deny
        return handler


class DecodeErrors(grpc.aio.ServerInterceptor):
    """A request whose bytes do not parse is INVALID_ARGUMENT (grpc itself would answer UNKNOWN); on a stream,
    the stream ends so."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode, method = handler.request_deserializer, details.method

        async def parse(data: bytes, context):
            try:
                return decode(data)
            except Exception:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method}: the request does not parse")

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def checked(data: bytes, context):
                return await behavior(await parse(data, context), context)

            return grpc.unary_unary_rpc_method_handler(checked, response_serializer=handler.response_serializer)
        if handler.stream_stream is not None:
            streaming = handler.stream_stream

            async def checked_stream(messages, context):
                async def parsed():
                    async for data in messages:
                        yield await parse(data, context)

                async for reply in streaming(parsed(), context):
                    yield reply

            return grpc.stream_stream_rpc_method_handler(checked_stream,
                                                         response_serializer=handler.response_serializer)
        return handler


@dataclass
class Running:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    names: list[str]
    tasks: list[asyncio.Task] = field(default_factory=list)  # background work, cancelled on stop
    # Called when the stop begins: a servicer ends its long-lived streams (idle ones at once, busy ones after
    # their answer), which would otherwise hold the stop for the whole grace.
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        for name in self.names + [""]:
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new calls (health NOT_SERVING), finish in-flight ones for up to `grace` seconds."""
        await self.set_serving(False)
        for task in self.tasks:
            task.cancel()
        for end_streams in self.on_stop:
            end_streams()
        await self.server.stop(grace)


async def start(add: list[tuple[Callable, object, str]], port: int, settings: Settings,
                host: str = "127.0.0.1", serving: bool = True) -> Running:
    """add: (add_XServicer_to_server, servicer, full service name). port 0 picks a free port."""
    interceptors = [BearerAuth(settings.token())] if settings.token() else []
    server = grpc.aio.server(options=channel_options(settings), interceptors=[*interceptors, DecodeErrors()])
    for add_fn, servicer, _ in add:
        add_fn(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [name for _, _, name in add]
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{host}:{port}"
    if settings.tls_cert and settings.tls_key:
        creds = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    running = Running(server, health_servicer, bound, names)
    await running.set_serving(serving)
    return running


def run_service(start: Callable[[], Awaitable[tuple[Running, Callable[[], Awaitable[None]] | None]]],
                what: str, host: str) -> None:
    """The body of every service's main(): logs from settings, start, serve until SIGTERM, clean up."""
    from services.common.config import get_settings
    from services.common.logs import setup_logging

    settings = get_settings()
    setup_logging("info" if settings.log_level == "warning" else settings.log_level, settings.log_format)
    tracing.setup(what.replace(" ", "-"), settings)  # "shard 3" -> service "shard-3"; before any server or channel
    async def run() -> None:
        try:
            running, cleanup = await start()
        except ImsearchError as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{what} serving on {host}:{running.port}", flush=True)
        await wait_for_signal(running)
        if cleanup is not None:
            await cleanup()

    asyncio.run(run())


async def wait_for_signal(running: Running, grace: float = 5.0) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining for up to %.1fs", grace)
    await running.stop(grace)
