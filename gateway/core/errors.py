"""Errors of the gateway, one status table for gRPC and REST.

GatewayError                 carries a gRPC status code (and the HTTP status derived from it)
 ├── InvalidArgument         INVALID_ARGUMENT   400 (413/415 with an http_status override)
 ├── Unauthenticated         UNAUTHENTICATED    401 (message is always "Unauthorized"; ``why`` says why)
 ├── PermissionDenied        PERMISSION_DENIED  403
 ├── NotFound                NOT_FOUND          404
 ├── ResourceExhausted       RESOURCE_EXHAUSTED 429 (may carry retry_after seconds)
 ├── FailedPrecondition      FAILED_PRECONDITION 400 (the call needs something this gateway lacks)
 ├── Unavailable             UNAVAILABLE        503 (the broker cannot be reached)
 └── DeadlineExceeded        DEADLINE_EXCEEDED  504

Anything else raised by a servicer becomes INTERNAL (500) with a request id; the
exception is logged once and never shown to the client.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

# gRPC status -> HTTP status (grpc-gateway's runtime.HTTPStatusFromCode).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


class GatewayError(Exception):
    """An error meant for the client: its message is shown as it is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        detail: Message | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail  # a proto message sent as status detail / REST body
        if code is not None:
            self.code = code
        self.http_status = http_status or HTTP_STATUS.get(self.code, 500)
        self.retry_after = retry_after


class InvalidArgument(GatewayError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(GatewayError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, reason: str = "", *, why: str = "invalid token") -> None:
        super().__init__("Unauthorized")
        self.reason = reason  # for the log only (may name the user)
        # For the caller: a short fixed phrase that reveals nothing ("token expired", "no token", ...):
        # REST's WWW-Authenticate error_description and body "reason", gRPC's status message.
        self.why = why


class PermissionDenied(GatewayError):
    code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(GatewayError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(GatewayError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(GatewayError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(GatewayError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(GatewayError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(GatewayError):
    code = grpc.StatusCode.INTERNAL
