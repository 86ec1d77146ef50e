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


def from_status(code: grpc.StatusCode, details: str, who: str) -> ImsearchError:
    """The domain error for a status a dependency returned (the inverse of grpc_status)."""
    for cls in (InvalidInput, NotFound, TooLarge, Incompatible, Corrupt, NotSupported, DeadlineExceeded):
        if cls.code == code:
            return cls(f"{who}: {details}")
    return Unavailable(f"{who} failed: {code.name} {details}")


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception: domain errors carry theirs, anything else is INTERNAL."""
    return exc.code if isinstance(exc, ImsearchError) else grpc.StatusCode.INTERNAL
