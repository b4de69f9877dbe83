"""Connections of the HTTP front, and running out of file descriptors, handled quietly.

- :class:`CappedListener` is the HTTP front's protocol factory: up to ``limit`` connections
  are served by aiohttp; one more gets :class:`_OverCapacity`, which answers ``GET /health``
  (probes keep working) and anything else ``503`` with ``Connection: close``, then closes.
  Idle connections (no complete request) are closed by aiohttp's keep-alive timeout, which
  also runs from the moment a connection opens, so it bounds the time to send headers.
- :class:`Every` says something at most once per interval, with how many times it happened.
- :func:`quiet_descriptor_errors` turns asyncio's "out of system resource" accept errors
  (EMFILE: no descriptor left; asyncio pauses accepting for a second each time) into one
  warning per interval, instead of a traceback per attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
"""Each kind of refusal is logged at most once per this many seconds."""
_OVER_CAPACITY_WAIT_S = 2.0
"""A connection over the cap gets this long to send its request line and headers."""
_MAX_HEADER_BYTES = 8192


class Every:
    """``note(message)`` logs ``message`` at most once per ``interval_s``, with the count of
    notes since the last line (so a flood is one line per interval, not one per event)."""

    def __init__(self, logger: logging.Logger, level: int, interval_s: float = LOG_INTERVAL_S):
        self.logger, self.level, self.interval_s = logger, level, interval_s
        self._last = -float("inf")
        self._count = 0

    def note(self, message: str, *args) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self.logger.log(
            self.level, message + " (%d time(s) since the last such line, at most one per %g s)",
            *args, self._count, self.interval_s,
        )
        self._last, self._count = now, 0


class CappedListener:
    """A protocol factory around aiohttp's ``web.Server`` that keeps at most ``limit``
    connections; ``health()`` returns ``(status, payload)`` for probes beyond the cap."""

    def __init__(self, server, limit: int, health: Callable[[], tuple[int, dict]]):
        self.server = server  # aiohttp.web.Server: the factory of RequestHandlers
        self.limit = limit
        self.health = health
        self.refused = Every(log, logging.WARNING)

    def __call__(self) -> asyncio.Protocol:
        if len(self.server.connections) < self.limit:
            return self.server()
        self.refused.note(
            "HTTP connection limit of %d reached (max_connections): new connections get 503",
            self.limit,
        )
        return _OverCapacity(self)


class _OverCapacity(asyncio.Protocol):
    """One connection over the cap: reads one request head, answers it, closes."""

    def __init__(self, listener: CappedListener):
        self.listener = listener
        self.head = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(_OVER_CAPACITY_WAIT_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.head += data
        if b"\r\n\r\n" in self.head or len(self.head) > _MAX_HEADER_BYTES:
            self._answer()

    def _answer(self) -> None:
        line = self.head.split(b"\r\n", 1)[0]
        if line.startswith(b"GET /health "):
            status, payload = self.listener.health()
        else:
            status, payload = 503, {
                "detail": f"the server holds its limit of {self.listener.limit} HTTP "
                "connections (max_connections); retry later or on another replica",
                "code": "UNAVAILABLE",
            }
        body = json.dumps(payload).encode()
        reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Error")
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


def quiet_descriptor_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's accept failures for lack of descriptors once per interval (the listener
    pauses and retries by itself); every other loop error goes to the previous handler."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiet_descriptor_errors", False):
        return  # installed by an earlier server on this loop
    out_of_descriptors = Every(log, logging.ERROR)

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "out of system resource" in context.get("message", ""):
            error = context.get("exception")
            out_of_descriptors.note(
                "cannot accept connections: %s; accepting pauses and retries. Lower "
                "--max-connections or raise the descriptor limit (ulimit -n)",
                error if error is not None else "no file descriptor left",
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handle.quiet_descriptor_errors = True
    loop.set_exception_handler(handle)
