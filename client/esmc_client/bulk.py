"""Bookkeeping of a bulk ``Embed`` run, shared by the sync and async clients (no I/O).

The sequences are cut into chunks; each chunk is sent over one bidirectional stream, and
again over a new stream for the sequences still without a final answer:

- ``UNAVAILABLE`` (the stream broke, the server is restarting or not ready yet, or a sequence
  was answered so): the chunk waits for the channel to reconnect and resends its unanswered
  sequences, for as long as the server makes no progress for less than
  ``RetryPolicy.ride_out_s`` seconds (30 by default). A server restart is ridden out. A
  stream the server ended with a ``grpc-retry-pushback-ms`` trailer is resent after that wait.
- ``RESOURCE_EXHAUSTED`` (the server's queue is full): the sequence is resent after a backoff,
  at most ``max_retries`` times, each retry paid from the client's :class:`RetryBudget`; the
  chunk halves its in-flight window for the next stream.
- Anything else (a sequence's own ``INVALID_ARGUMENT``, a deadline...) is that sequence's
  final result: it is never sent again.

Requests carry the sequence's position as their wire id, so duplicate caller ids are fine.
Pseudo-log-likelihood streams follow the same rules (:class:`esmc_client.scoring.PllChunk`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.requests import ProteinLike, embed_request
from esmc_client.responses import check_model, parse_embed
from esmc_client.retry import RetryBudget, RetryPolicy, retryable
from esmc_client.types import EmbedResult, ESMCError, ResponseMetadata


@dataclass
class _Entry:
    index: int
    id: str  # the caller's id
    request: pb.EmbedRequest  # request.id == str(index)
    attempts: int = 0
    busy_retries: int = 0


class EmbedChunk:
    """The sequences of one stream, across its retries."""

    def __init__(
        self,
        entries: list[tuple[int, str, pb.EmbedRequest]],
        retry: RetryPolicy,
        budget: RetryBudget | None = None,
        window: int = 64,
    ):
        self._retry = retry
        self._budget = budget or RetryBudget(retry.budget_ratio, retry.budget_burst)
        self._waiting = {str(i): _Entry(i, uid, req) for i, uid, req in entries}
        self._sent: dict[str, _Entry] = {}
        self._outage_since: float | None = None  # first UNAVAILABLE since the last progress
        self._outage_rounds = 0
        self._busy_rounds = 0
        self._busy = False  # a sequence of the current stream was refused for a full queue
        self._pushback_ms: int | None = None  # the last broken stream's grpc-retry-pushback-ms
        self.window = max(1, window)  # requests ahead of their answers on the next stream

    def to_send(self) -> list[pb.EmbedRequest]:
        """Requests for the next stream (all still waiting), counting one attempt each."""
        self._sent = dict(self._waiting)
        self._busy = False
        for entry in self._sent.values():
            if entry.attempts == 0:
                self._budget.deposit()
            entry.attempts += 1
        return [entry.request for entry in self._sent.values()]

    def on_response(self, message: pb.EmbedResponse) -> tuple[int, EmbedResult] | None:
        """``(position, final result)`` this response gives, or None (resend later, unknown id)."""
        entry = self._sent.pop(message.id, None)
        if entry is None:
            return None
        if not message.HasField("error"):
            check_model(entry.request.model, message.metadata.model)
        result = self._parse(message, entry)
        if result.error is None or result.error.code != "UNAVAILABLE":
            self._outage_since = None  # the server answers: progress
            self._outage_rounds = 0
        if result.error is not None and self._resend(entry, result.error):
            return None
        del self._waiting[message.id]
        return entry.index, result

    def on_stream_end(self, error: ESMCError | None) -> list[tuple[int, EmbedResult]]:
        """Close one stream; sequences it left unanswered are resent or fail with ``error``."""
        self._pushback_ms = error.pushback_ms if error is not None else None
        error = error or ESMCError("UNKNOWN", "the stream ended without answering this sequence")
        results = []
        for key, entry in self._sent.items():
            if self._resend(entry, error):
                continue
            del self._waiting[key]
            results.append((entry.index, self._failed(entry, error)))
        self._sent = {}
        if self._busy:
            self.window = max(1, self.window // 2)
        return results

    def next_wait(self) -> tuple[float, bool] | None:
        """``(seconds to sleep, wait for the channel to be ready)`` before the next stream, or
        None when every sequence has its final result."""
        if not self._waiting:
            return None
        if self._outage_since is not None:
            self._outage_rounds += 1
            left = self._retry.ride_out_s - (time.monotonic() - self._outage_since)
            delay = self._retry.delay(self._outage_rounds)
            if self._pushback_ms is not None and self._pushback_ms >= 0:  # the server says when
                delay = self._pushback_ms / 1000 * (1 + 0.2 * random.random())
            return max(0.0, min(delay, left)), True
        if self._busy:
            self._busy_rounds += 1
            return self._retry.delay(self._busy_rounds), False
        return 0.0, False

    def ride_out_left(self) -> float:
        """Seconds the current outage may still last before unanswered sequences fail."""
        if self._outage_since is None:
            return self._retry.ride_out_s
        return max(0.0, self._retry.ride_out_s - (time.monotonic() - self._outage_since))

    def _parse(self, message, entry: _Entry):
        """The result a response gives (anything with an ``error``)."""
        return parse_embed(message, entry.id, entry.attempts)

    def _failed(self, entry: _Entry, error: ESMCError):
        """The final result of a sequence that failed with ``error``."""
        return EmbedResult(entry.id, None, error, ResponseMetadata(), entry.attempts)

    def _resend(self, entry: _Entry, error: ESMCError) -> bool:
        """Whether ``entry`` goes out again after ``error`` (False: the error is final)."""
        if not retryable(error.code, error.message):
            return False
        if error.code == "UNAVAILABLE":
            now = time.monotonic()
            if self._outage_since is None:
                self._outage_since = now
            return now - self._outage_since < self._retry.ride_out_s
        if entry.busy_retries >= self._retry.max_retries or not self._budget.withdraw():
            return False
        entry.busy_retries += 1
        self._busy = True
        return True


def make_chunks(
    items: list[tuple[str, ProteinLike]],
    batch_size: int,
    retry: RetryPolicy,
    budget: RetryBudget | None = None,
    window: int = 64,
    **request_options,
) -> list[EmbedChunk]:
    """Cut ``(caller id, protein)`` pairs into chunks of ``batch_size`` sequences.

    ``request_options`` go to :func:`esmc_client.requests.embed_request` (layer, pool,
    output_dtype).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    budget = budget or RetryBudget(retry.budget_ratio, retry.budget_burst)
    numbered = [
        (i, uid, embed_request(str(i), protein, **request_options))
        for i, (uid, protein) in enumerate(items)
    ]
    return [
        EmbedChunk(numbered[start : start + batch_size], retry, budget, window)
        for start in range(0, len(numbered), batch_size)
    ]


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress_bar(enabled: bool, total: int | None = None, desc: str = "embed"):
    """A tqdm bar counting sequences (``total`` None: unknown), or a silent stand-in."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc=desc)
