"""Which pending work rides in the next forward: pure functions over made-up-able entries.

Fair order. Each entry carries its caller and a start tag that :class:`FairClock` gave it
when it was queued (start-time fair queueing by tokens over callers): a caller's entries get
consecutive tags, each its length after the previous one, starting no earlier than the
clock's virtual time (the largest tag served so far). One-shot work and each step of a
generation are tagged alike, so a caller with forty generations, a thousand queued requests or
one 16k-token PLL advances its own tags, not everyone's wait. The service order is by tag,
then (ties) generation steps in flight first, then by arrival (FIFO); the batch is the longest
prefix of that order that fits the token budget and the size cap, so a long entry is never
skipped in favour of later short ones (one over the budget runs alone at its turn, and its
whole length is charged to its caller's tags).

The bound. Let M be the longest entry (tokens, at most the per-protein limit), B the budget
and C the callers with work queued. Every queued tag is at least the virtual time V, and an
entry whose caller had nothing else queued gets a tag S <= V + M. Only entries tagged <= S
go before it, at most S - V + M <= 2M tokens of each other caller; so it rides in one of the
next ``ceil(2M (C-1) / (B - M)) + 1`` forwards when M < B (each earlier forward carries more
than B - M tokens, or is full by count), and in one of the next ``2 (C-1) + 1`` forwards
when every other entry is a single one over the budget (each runs alone) -- whatever the other
callers queue. An entry of a caller with more queued waits in addition for its own caller's
earlier entries. (``tests/test_policy.py`` checks both bounds on simulated attacks.)

A batch is cut when:

- the budget or the size cap is filled (the next entry in order would not fit, or nothing
  more could: a single entry over the budget runs alone at once), or
- an entry of priority > 0 is pending (a generation step in flight: the loop is already
  running, waiting for company would only slow every active generation), or
- the oldest entry has waited ``max_wait_ms``.

Otherwise nothing is cut and :func:`next_wakeup` says when to look again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from esmc_server.config import BatchingConfig


@dataclasses.dataclass(frozen=True)
class PendingEntry:
    key: int  # opaque id
    length: int  # tokens incl. BOS/EOS
    arrival: float  # monotonic seconds when it (or its current generation step) became ready
    priority: int = 0  # generation steps in flight get 1 (first among equal tags), new work 0
    caller: str = "anonymous"  # whom it is charged to
    start: float = 0.0  # its fair start tag (:meth:`FairClock.tag`)


class FairClock:
    """Start tags of start-time fair queueing over callers, by tokens (see the module
    docstring). Plain state, no threads: the pending set calls it under its lock."""

    def __init__(self) -> None:
        self.vtime = 0.0  # the largest start tag served so far
        self._finish: dict[str, float] = {}  # caller -> the tag after its last queued entry

    def tag(self, caller: str, tokens: int) -> float:
        """The start tag of ``caller``'s next entry of ``tokens`` tokens (charged now)."""
        start = max(self.vtime, self._finish.get(caller, 0.0))
        self._finish[caller] = start + tokens
        return start

    def served(self, starts: Sequence[float]) -> None:
        """A batch with these start tags ran: advance the virtual time, and forget callers
        whose last tag it passed (they start again from the virtual time)."""
        if starts and max(starts) > self.vtime:
            self.vtime = max(starts)
        for caller in [c for c, finish in self._finish.items() if finish <= self.vtime]:
            del self._finish[caller]

    @property
    def callers(self) -> int:
        """Callers with a tag ahead of the virtual time."""
        return len(self._finish)


@dataclasses.dataclass(frozen=True)
class Batch:
    keys: tuple[int, ...]  # run order: FIFO when packed, by length when padded
    tokens: int  # as the backend pays: sum of lengths packed, count * max length padded


def batch_cost(lengths: Sequence[int], packed: bool) -> int:
    """Tokens one forward over ``lengths`` costs: packed pays each token, padded the rectangle."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def service_order(pending: Sequence[PendingEntry]) -> list[PendingEntry]:
    """Smallest start tag first; among equal tags higher priority, then oldest first."""
    return sorted(pending, key=lambda e: (e.start, -e.priority, e.arrival, e.key))


def select_batch(
    pending: Sequence[PendingEntry], limits: BatchingConfig, now: float
) -> Batch | None:
    """The batch to run now, or None to keep waiting (see the module docstring)."""
    if not pending:
        return None
    order = service_order(pending)
    chosen = _fitting_prefix(order, limits)
    tokens = batch_cost([e.length for e in chosen], limits.packed)
    full = (
        len(chosen) < len(order)
        or len(chosen) >= limits.max_batch_size
        or tokens >= limits.max_batch_tokens
    )
    in_flight = any(e.priority > 0 for e in order)
    if not (full or in_flight or _waited_enough(order, limits, now)):
        return None
    if not limits.packed:
        chosen = sorted(chosen, key=lambda e: e.length)  # stable: FIFO among equal lengths
    return Batch(keys=tuple(e.key for e in chosen), tokens=tokens)


def next_wakeup(
    pending: Sequence[PendingEntry], limits: BatchingConfig, now: float
) -> float | None:
    """Monotonic time at which the oldest entry's wait bound expires (None: nothing pending)."""
    if not pending:
        return None
    if any(e.priority > 0 for e in pending):
        return now
    return min(e.arrival for e in pending) + limits.max_wait_ms / 1000.0


def _fitting_prefix(order: list[PendingEntry], limits: BatchingConfig) -> list[PendingEntry]:
    """Longest prefix within budget and cap; a first entry over the budget runs alone."""
    chosen = [order[0]]
    lengths = [order[0].length]
    for entry in order[1:]:
        if len(chosen) >= limits.max_batch_size:
            break
        if batch_cost([*lengths, entry.length], limits.packed) > limits.max_batch_tokens:
            break
        chosen.append(entry)
        lengths.append(entry.length)
    return chosen


def _waited_enough(order: list[PendingEntry], limits: BatchingConfig, now: float) -> bool:
    oldest = min(e.arrival for e in order)
    return now - oldest >= limits.max_wait_ms / 1000.0
