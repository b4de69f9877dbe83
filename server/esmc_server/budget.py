"""One memory budget for the whole server: response bytes computed but not yet written.

Every stream has its own window (``embed_window`` requests of an Embed stream, a generation's
steps), but a window per stream does not bound the total: many unread streams each fill
theirs. :class:`ResponseBudget` is shared by every call, stream and generation of the server:
a response's size (an upper bound, known before any work) is reserved before the work is
queued and given back once the response has been handed to gRPC (whose own buffers are
bounded per stream by HTTP/2 flow control). Work whose reservation does not fit waits, first
come first served, so a caller that reads nothing stalls its own streams (and, after
``stream_idle_timeout_s`` of blocked writes, loses them, which frees what they held) without
the server's memory growing.

:class:`StreamIds` bounds, server-wide, the ids that keyed streams remember to keep them
unique within a stream (a 16-byte digest each, whatever the id's length).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
from collections.abc import Callable

from esmc_server.errors import ServiceError


class TooManyStreamIds(ServiceError):
    """The server holds its limit of remembered stream ids; a new stream can go on."""

    code = "RESOURCE_EXHAUSTED"
    retry_pushback_ms = 1000


@dataclasses.dataclass
class Lease:
    """Bytes reserved from a :class:`ResponseBudget`; :meth:`release` gives them back once."""

    budget: ResponseBudget | None
    nbytes: int

    def release(self) -> None:
        if self.budget is not None:
            budget, self.budget = self.budget, None
            budget._give_back(self.nbytes)


@dataclasses.dataclass(frozen=True)
class Leased:
    """A serialized response and the reservation that covers it until it is written."""

    data: bytes
    lease: Lease


class ResponseBudget:
    """At most ``limit`` bytes reserved at once, over the whole server (event-loop only).

    A reservation larger than the limit is cut to the limit (``max_message_bytes`` is never
    above it), so one response always fits once the others are written.
    """

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()
        self._on_change = on_change

    async def reserve(self, nbytes: int) -> Lease:
        """Reserve ``nbytes`` (waiting for room, in arrival order); cancellable."""
        nbytes = max(0, min(nbytes, self.limit))
        if not self._waiting and self.used + nbytes <= self.limit:
            self._take(nbytes)
            return Lease(self, nbytes)
        future = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._give_back(nbytes)  # granted as it was cancelled
            else:
                with contextlib.suppress(ValueError):  # _grant may have dropped it already
                    self._waiting.remove(entry)
                self._grant()
            raise
        return Lease(self, nbytes)

    def _take(self, nbytes: int) -> None:
        self.used += nbytes
        if self._on_change is not None:
            self._on_change(self.used)

    def _give_back(self, nbytes: int) -> None:
        self.used -= nbytes
        if self._on_change is not None:
            self._on_change(self.used)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            nbytes, future = self._waiting.popleft()
            if not future.done():
                self._take(nbytes)
                future.set_result(None)


class StreamIds:
    """The ids keyed streams remember, counted over the whole server: at most ``limit``."""

    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None):
        self.limit = limit
        self.count = 0
        self._on_change = on_change

    def new_set(self) -> StreamIdSet:
        return StreamIdSet(self)

    def _add(self, n: int) -> None:
        self.count += n
        if self._on_change is not None:
            self._on_change(self.count)


class StreamIdSet:
    """One stream's ids (as 16-byte digests); :meth:`close` gives its count back."""

    def __init__(self, ids: StreamIds):
        self._ids = ids
        self._seen: set[bytes] = set()

    def add(self, request_id: str) -> bool:
        """Remember ``request_id``; False if this stream has used it already. Raises
        ResourceExhausted when the server holds its limit of remembered ids."""
        digest = hashlib.blake2b(request_id.encode("utf-8", "surrogatepass"), digest_size=16)
        key = digest.digest()
        if key in self._seen:
            return False
        if self._ids.count >= self._ids.limit:
            raise TooManyStreamIds(
                f"the server remembers its limit of {self._ids.limit} stream ids "
                "(max_stream_ids) across open Embed/PseudoLogLikelihoodStream streams; "
                "end this stream and send the rest on a new one"
            )
        self._seen.add(key)
        self._ids._add(1)
        return True

    def close(self) -> None:
        self._ids._add(-len(self._seen))
        self._seen = set()
