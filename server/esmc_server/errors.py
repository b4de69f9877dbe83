"""Service errors: plain exceptions whose ``code`` names the gRPC status the servicer answers.

Messages are shown to clients as they are: they name the field, the size and the limit, and
never carry Python class names, file paths or tokens. ``retry_pushback_ms`` (when set) is sent
as the ``grpc-retry-pushback-ms`` trailer so that clients back off before they retry.

The HTTP status of each code is the contract's (:mod:`esmc_proto.status`), shared with the
client.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service answers with; ``code`` is a grpc.StatusCode name."""

    code: str = "INTERNAL"
    retry_pushback_ms: int | None = None


class InvalidRequest(ServiceError):
    code = "INVALID_ARGUMENT"


class QueueFull(ServiceError):
    code = "RESOURCE_EXHAUSTED"
    retry_pushback_ms = 200


class DeadlineExceeded(ServiceError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(ServiceError):
    code = "CANCELLED"


class Unavailable(ServiceError):
    """Shutting down or not ready."""

    code = "UNAVAILABLE"
    retry_pushback_ms = 1000


class SequenceTooLargeForDevice(InvalidRequest):
    """One sequence alone does not fit in device memory: retrying can never help."""

    code = "INVALID_ARGUMENT"

    def __init__(self, tokens: int):
        super().__init__(
            f"a sequence of {tokens} tokens does not fit in device memory even alone; "
            "send a shorter sequence"
        )
        self.tokens = tokens


class InternalError(ServiceError):
    """A server fault that concerns this request only; the traceback is in the server log.

    The message names the stage that failed and nothing else (no class names, no paths).
    """

    code = "INTERNAL"

    def __init__(self, stage: str):
        super().__init__(f"internal error while {stage}; the server logged the details")
        self.stage = stage


class Unauthenticated(ServiceError):
    """No token, or one the server does not accept (the message never echoes it)."""

    code = "UNAUTHENTICATED"
