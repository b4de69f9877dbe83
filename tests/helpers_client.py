"""Helpers for client tests: an in-process server on its own event-loop thread (so blocking
clients, asyncio clients and the CLI all reach it over real channels), and the server's own
count of the requests it answered."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict

from esmc import ESMC
from esmc_server.app import create_server
from esmc_server.config import ServerConfig
from helpers_server import scrape_metrics


def requests_by_code(metrics_port: int, method: str) -> dict[str, float]:
    """``esmc_requests_total`` of ``method``: status code -> count."""
    counts: dict[str, float] = defaultdict(float)
    for (name, labels), value in scrape_metrics(metrics_port).items():
        labels = dict(labels)
        if name == "esmc_requests_total" and labels.get("method") == method:
            counts[labels["code"]] += value
    return counts


class ThreadServer:
    """An in-process server on its own event-loop thread (clients of any kind can call it)."""

    def __init__(self, model: ESMC, config: ServerConfig):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = self._run(create_server(config, model=model), 120)

    def _run(self, coroutine, timeout: float):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self._run(self.server.stop(2), 60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
