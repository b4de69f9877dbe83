"""Service errors: plain exceptions whose ``code`` names the gRPC status the servicer answers."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service answers with; ``code`` is a grpc.StatusCode name."""

    code: str = "INTERNAL"


class InvalidRequest(ServiceError):
    code = "INVALID_ARGUMENT"


class QueueFull(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class Unavailable(ServiceError):
    """Shutting down or not ready."""

    code = "UNAVAILABLE"


class DeviceOutOfMemory(ServiceError):
    """One sequence alone does not fit on the device."""

    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(ServiceError):
    """No token, or one the server does not accept (the message never echoes it)."""

    code = "UNAUTHENTICATED"
