"""Never the same forward twice: identical calls in flight share one computation, and a
bounded cache of results answers repeats.

The key (:class:`CacheKey`) is everything a result depends on: the served model, the
protein's tokens, what is asked (the outputs, hidden layers and output dtype of a
:class:`~esmc_server.calls.LogitsCall`), and the partition: the caller's name, unless the
operator shares the cache between callers (a shared cache tells one caller, by how fast its
answer comes, what another asked). Batch invariance makes a cached answer equal to a fresh
one within the forward's own batch-to-batch tolerance (1e-5 relative in float32).

:class:`ResponseCache` holds results up to ``max_bytes`` (least recently used evicted first;
a result larger than the whole cache is never kept) and counts hits, joins (calls that rode
an identical call in flight), misses, evictions and the bytes held. ``max_bytes=0`` keeps
nothing but still joins identical calls in flight. The computation of a call runs as its
own task: a caller that cancels leaves the others waiting on it, and the computation is
cancelled only when no caller waits any more.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from esmc_server.calls import LogitsCall


@dataclasses.dataclass(frozen=True)
class CacheKey:
    model: str
    partition: str  # the caller's name, or "" when the operator shares the cache
    tokens: str  # sha256 of the int64 token bytes, and their count
    asked: tuple  # outputs, hidden layers, output dtype


def logits_key(call: LogitsCall, model: str, *, shared: bool = False) -> CacheKey:
    """The key of a logits/embedding call on ``model``."""
    tokens = call.tokens.to(torch.int64).contiguous()
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
    asked = (repr(call.config), tuple(call.layers), str(call.dtype))  # attrs: field-wise repr
    partition = "" if shared else call.caller.name
    return CacheKey(model, partition, f"{digest}:{tokens.numel()}", asked)


def result_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, a dataclass, a mapping or a sequence)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(result_bytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(result_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(result_bytes(v) for v in value)
    return 0


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    joins: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class _InFlight:
    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiters = 0


class ResponseCache:
    """Results by :class:`CacheKey`, at most ``max_bytes`` of them; one event loop's object."""

    def __init__(self, max_bytes: int, *, size_of: Callable[[Any], int] = result_bytes):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._size_of = size_of
        self._results: collections.OrderedDict[CacheKey, tuple[Any, int]] = (
            collections.OrderedDict()
        )
        self._in_flight: dict[CacheKey, _InFlight] = {}

    async def get(self, key: CacheKey, compute: Callable[[], Awaitable[Any]]) -> Any:
        """The result for ``key``: cached, joined to an identical call in flight, or computed
        by ``compute()`` (then kept if it fits). An error of ``compute`` reaches every caller
        waiting on it and is not cached."""
        cached = self._results.get(key)
        if cached is not None:
            self._results.move_to_end(key)
            self.stats.hits += 1
            return cached[0]
        flight = self._in_flight.get(key)
        if flight is None:
            self.stats.misses += 1
            flight = _InFlight(asyncio.ensure_future(self._compute(key, compute)))
            self._in_flight[key] = flight
        else:
            self.stats.joins += 1
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.task.done():
                flight.task.cancel()  # nobody waits for it any more

    async def _compute(self, key: CacheKey, compute: Callable[[], Awaitable[Any]]) -> Any:
        try:
            result = await compute()
        finally:
            self._in_flight.pop(key, None)
        self._keep(key, result)
        return result

    def _keep(self, key: CacheKey, result: Any) -> None:
        size = self._size_of(result)
        if size > self.max_bytes:
            return
        self._results[key] = (result, size)
        self.stats.bytes += size
        while self.stats.bytes > self.max_bytes:
            _, (_, evicted) = self._results.popitem(last=False)
            self.stats.bytes -= evicted
            self.stats.evictions += 1
        self.stats.entries = len(self._results)
