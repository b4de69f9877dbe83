"""gRPC status names and the HTTP status each one maps to: the one table of the contract.

The server's HTTP front answers with these statuses and the esm-SDK adapter of the client
reports them as ``ESMProteinError.error_code``: 429 and 502/504 are what the ``esm`` SDK's
Forge client and batch executor retry.
"""

from __future__ import annotations

HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""HTTP status of each gRPC status name."""


def http_status(code: str) -> int:
    """The HTTP status for a gRPC status name (500 for a name not in the table)."""
    return HTTP_STATUS.get(code, 500)
