"""Domain errors. Each maps to one gRPC status code, here and nowhere else."""

from __future__ import annotations

import grpc


class ImsearchError(Exception):
    """Base class: a problem the user can act on; shown as one line, never a traceback."""

    code = grpc.StatusCode.INTERNAL


class InvalidInput(ImsearchError):
    """Bad argument: undecodable image, wrong dimension, k out of range..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ImsearchError):
    """Unknown id, missing index, missing object."""

    code = grpc.StatusCode.NOT_FOUND


class TooLarge(ImsearchError):
    """Over a size limit (image bytes, pixels, message size, batch)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Incompatible(ImsearchError):
    """Index and query disagree (model, dimension, format version)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Conflict(ImsearchError):
    """Another writer changed the same thing first (a compare-and-swap lost): nothing was changed."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NoSpace(ImsearchError):
    """The destination is full (ENOSPC, a quota, a file-size limit): what was there before is intact."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http = 507


class ReadOnly(ImsearchError):
    """The destination cannot be written (read-only filesystem, no permission)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Forbidden(ImsearchError):
    """A known caller asking for something it may not have (an API key limited to other collections)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Corrupt(ImsearchError):
    """Stored data fails its checksum or cannot be parsed."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(ImsearchError):
    """A dependency (store, shard, embedder) cannot be reached."""

    code = grpc.StatusCode.UNAVAILABLE


class NotSupported(ImsearchError):
    """A valid request this deployment cannot serve (e.g. images sent to a router without embedder)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(ImsearchError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ImsearchError):
    """A missing or wrong API key / bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


class RateLimited(ImsearchError):
    """Too many requests for one key: retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http = 429


# HTTP status of each gRPC status (the gateway's answers); RateLimited (429) and NoSpace (507) override
# RESOURCE_EXHAUSTED's 413.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNIMPLEMENTED: 501, grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.INTERNAL: 500,
}


def http_status(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, gRPC code name) of a domain error, or of a gRPC error a dependency returned."""
    code = exc.code() if isinstance(exc, grpc.RpcError) else grpc_status(exc)
    return getattr(exc, "http", None) or HTTP_STATUS.get(code, 502), code.name


def from_status(code: grpc.StatusCode, details: str, who: str) -> ImsearchError:
    """The domain error for a status a dependency returned (the inverse of grpc_status)."""
    for cls in (InvalidInput, NotFound, TooLarge, Incompatible, Corrupt, NotSupported, DeadlineExceeded):
        if cls.code == code:
            return cls(f"{who}: {details}")
    return Unavailable(f"{who} failed: {code.name} {details}")


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: domain errors carry theirs, anything else is INTERNAL."""
    return exc.code if isinstance(exc, ImsearchError) else grpc.StatusCode.INTERNAL
