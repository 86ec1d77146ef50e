import grpc

from services.common import errors


def test_each_domain_error_has_its_status_code():
    assert errors.grpc_status(errors.InvalidInput("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.grpc_status(errors.NotFound("x")) == grpc.StatusCode.NOT_FOUND
    assert errors.grpc_status(errors.TooLarge("x")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.grpc_status(errors.DeadlineExceeded("x")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert errors.grpc_status(errors.Unavailable("x")) == grpc.StatusCode.UNAVAILABLE
    assert errors.grpc_status(errors.Incompatible("x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert errors.grpc_status(errors.Corrupt("x")) == grpc.StatusCode.DATA_LOSS
    assert errors.grpc_status(errors.NotSupported("x")) == grpc.StatusCode.UNIMPLEMENTED


def test_unknown_exceptions_are_internal():
    assert errors.grpc_status(ValueError("boom")) == grpc.StatusCode.INTERNAL
