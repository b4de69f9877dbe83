"""Bookkeeping of a bulk ``Embed`` run, shared by the sync and async clients (no I/O).

The sequences are cut into chunks; each chunk is sent over one bidirectional stream. A
sequence answered with ``UNAVAILABLE`` or ``RESOURCE_EXHAUSTED`` (its own error, or the
stream's when the stream broke before answering it) is sent again on a new stream after an
exponential backoff, up to ``RetryPolicy.max_retries`` times. Any other error (for example
the sequence's own ``INVALID_ARGUMENT``) is its final result.

Requests carry the sequence's position as their wire id, so duplicate user ids are fine.
"""

from __future__ import annotations

from dataclasses import dataclass

from esmc_client._proto.esmc.v1 import esmc_pb2 as pb
from esmc_client.channel import RETRYABLE_CODES, RetryPolicy
from esmc_client.requests import ProteinLike, embed_request
from esmc_client.responses import parse_embed
from esmc_client.types import EmbedResult, ESMCError, ResponseMetadata


@dataclass
class _Entry:
    index: int
    id: str  # the caller's id
    request: pb.EmbedRequest  # request.id == str(index)
    attempts: int = 0


class EmbedChunk:
    """The sequences of one stream, across its retries."""

    def __init__(self, entries: list[tuple[int, str, pb.EmbedRequest]], retry: RetryPolicy):
        self._retry = retry
        self._waiting = {str(i): _Entry(i, uid, req) for i, uid, req in entries}
        self._sent: dict[str, _Entry] = {}

    def to_send(self) -> list[pb.EmbedRequest]:
        """Requests for the next stream (all still waiting), counting one attempt each."""
        self._sent = dict(self._waiting)
        for entry in self._sent.values():
            entry.attempts += 1
        return [entry.request for entry in self._sent.values()]

    def on_response(self, message: pb.EmbedResponse) -> tuple[int, EmbedResult] | None:
        """``(position, final result)`` this response gives, or None (retry later, unknown id)."""
        entry = self._sent.pop(message.id, None)
        if entry is None:
            return None
        result = parse_embed(message, entry.id, entry.attempts)
        if result.error is not None and self._retryable(entry, result.error):
            return None
        del self._waiting[message.id]
        return entry.index, result

    def on_stream_end(self, error: ESMCError | None) -> list[tuple[int, EmbedResult]]:
        """Close one stream; sequences it left unanswered are retried or fail with ``error``."""
        error = error or ESMCError("UNKNOWN", "the stream ended without answering this sequence")
        results = []
        for key, entry in self._sent.items():
            if self._retryable(entry, error):
                continue
            del self._waiting[key]
            results.append((entry.index, _failed(entry, error)))
        self._sent = {}
        return results

    def retry_delay(self) -> float | None:
        """Seconds to wait before the next stream, or None when every sequence has its result."""
        if not self._waiting:
            return None
        return self._retry.delay(max(e.attempts for e in self._waiting.values()))

    def _retryable(self, entry: _Entry, error: ESMCError) -> bool:
        return error.code in RETRYABLE_CODES and entry.attempts <= self._retry.max_retries


def _failed(entry: _Entry, error: ESMCError) -> EmbedResult:
    return EmbedResult(entry.id, None, error, ResponseMetadata(), entry.attempts)


def make_chunks(
    items: list[tuple[str, ProteinLike]],
    batch_size: int,
    retry: RetryPolicy,
    **request_options,
) -> list[EmbedChunk]:
    """Cut ``(caller id, protein)`` pairs into chunks of ``batch_size`` sequences.

    ``request_options`` go to :func:`esmc_client.requests.embed_request` (layer, pool,
    output_dtype).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    numbered = [
        (i, uid, embed_request(str(i), protein, **request_options))
        for i, (uid, protein) in enumerate(items)
    ]
    return [
        EmbedChunk(numbered[start : start + batch_size], retry)
        for start in range(0, len(numbered), batch_size)
    ]
