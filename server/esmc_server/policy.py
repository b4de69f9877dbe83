"""Which pending work rides in the next forward: a pure function over made-up-able entries.

The engine calls :func:`select_batch` whenever the device is free. Entries are served by
priority (generation steps in flight first), then by arrival (FIFO): the batch is the longest
prefix of that order that fits the token budget and the size cap, so a long entry is never
skipped in favour of later short ones. A batch is cut when:

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
    priority: int = 0  # generation steps in flight get 1 (served first), new work 0


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
    """Higher priority first, then oldest first."""
    return sorted(pending, key=lambda e: (-e.priority, e.arrival, e.key))


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
    in_flight = order[0].priority > 0
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
