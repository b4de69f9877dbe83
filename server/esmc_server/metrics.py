"""Prometheus metrics on their own registry and port; also the engine's observer.

The engine calls the ``on_*`` methods (plain numbers, from its device thread: prometheus
client objects are thread-safe); the servicer records each request's latency and status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from esmc_server.certs import certificate_expiry

log = logging.getLogger(__name__)

_MS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
_FRACTION_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    """All service metrics, registered in a private :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, queue_capacity: int = 0):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_start_time_seconds (restarts), open fds, CPU
        ProcessCollector(registry=r)
        self.serving = Gauge(
            "esmc_health_serving",
            "1 while health says SERVING, 0 while it says NOT_SERVING (draining or failed)",
            registry=r,
        )
        self.engine_failed = Gauge(
            "esmc_engine_failed",
            "1 once the engine has failed (the process exits soon after), else 0",
            registry=r,
        )
        self.queue_capacity = Gauge(
            "esmc_queue_capacity",
            "Waiting requests accepted before RESOURCE_EXHAUSTED (max_queue)",
            registry=r,
        )
        self.queue_capacity.set(queue_capacity)
        self.queue_depth = Gauge("esmc_queue_depth", "Requests waiting for a forward", registry=r)
        self.caller_requests = Counter(
            "esmc_caller_requests",
            "Requests answered, by caller (the token's name, or anonymous) and status code",
            ["caller", "code"],
            registry=r,
        )
        self.unread_response_bytes = Gauge(
            "esmc_unread_response_bytes",
            "Response bytes reserved and not yet written, all calls and streams together "
            "(bounded by max_unread_response_bytes)",
            registry=r,
        )
        self.stream_ids = Gauge(
            "esmc_stream_ids",
            "Ids remembered by open keyed streams (bounded by max_stream_ids)",
            registry=r,
        )
        self.active_generations = Gauge(
            "esmc_active_generations", "Generations in progress", registry=r
        )
        self.batch_sequences = Histogram(
            "esmc_batch_size_sequences", "Sequences per forward", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "esmc_batch_size_tokens",
            "Tokens per forward (padded tokens when padding)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.padding_efficiency = Histogram(
            "esmc_batch_padding_efficiency",
            "Real tokens / tokens computed, per forward",
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "esmc_queue_time_seconds",
            "Arrival to the start of the serving forward",
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "esmc_compute_time_seconds", "Duration of one forward", buckets=_MS_BUCKETS, registry=r
        )
        self.forwards = Counter("esmc_forwards", "Model forwards", registry=r)
        self.sequences = Counter("esmc_sequences", "Sequences computed", registry=r)
        self.tokens = Counter(
            "esmc_tokens", "Tokens computed (padded tokens when padding)", registry=r
        )
        self.real_tokens = Counter(
            "esmc_real_tokens", "Tokens of real sequences computed", registry=r
        )
        self.generation_steps = Counter(
            "esmc_generation_steps",
            "Generation steps taken (rate() gives steps per second)",
            registry=r,
        )
        self.steps_per_forward = Histogram(
            "esmc_generation_steps_per_forward",
            "Generation steps sharing one forward (forwards with at least one step)",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "esmc_request_latency_seconds",
            "Request latency by method (a stream: its whole duration)",
            ["method"],
            buckets=_MS_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "esmc_requests",
            "Requests answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.errors = Counter(
            "esmc_errors",
            "Errors answered, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.caller_token_forwards = Counter(
            "esmc_caller_token_forwards",
            "Cost admitted (tokens x forwards of each call), by caller", ["caller"], registry=r,
        )
        self.caller_tokens = Counter(
            "esmc_caller_tokens", "Tokens forwarded, by caller", ["caller"], registry=r
        )
        self.caller_queue_time = Histogram(
            "esmc_caller_queue_time_seconds", "Time waiting for a forward, by caller",
            ["caller"], buckets=_MS_BUCKETS, registry=r,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def watch_certificate(self, path: str) -> None:
        """Export the expiry of the TLS certificate file at ``path``, read at each scrape."""
        self.registry.register(CertificateExpiry(path))

    # -- EngineObserver --------------------------------------------------------------------

    def on_batch(
        self,
        sequences: int,
        tokens: int,
        real_tokens: int,
        queue_ms_list: Sequence[float],
        compute_ms: float,
        generation_steps: int,
    ) -> None:
        self.forwards.inc()
        self.sequences.inc(sequences)
        self.tokens.inc(tokens)
        self.real_tokens.inc(real_tokens)
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)
        if tokens:
            self.padding_efficiency.observe(real_tokens / tokens)
        for queue_ms in queue_ms_list:
            self.queue_time.observe(queue_ms / 1000)
        self.compute_time.observe(compute_ms / 1000)
        if generation_steps:
            self.generation_steps.inc(generation_steps)
            self.steps_per_forward.observe(generation_steps)

    def on_serving(self, serving: bool) -> None:
        self.serving.set(1 if serving else 0)

    def on_engine_failed(self) -> None:
        self.engine_failed.set(1)

    def on_unread_response_bytes(self, n: int) -> None:
        self.unread_response_bytes.set(n)

    def on_stream_ids(self, n: int) -> None:
        self.stream_ids.set(n)

    def on_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    def on_active_generations(self, n: int) -> None:
        self.active_generations.set(n)

    def on_call(self, caller: str, token_forwards: int) -> None:
        self.caller_token_forwards.labels(caller).inc(token_forwards)

    def on_served(self, caller: str, tokens: int, queue_ms: float) -> None:
        self.caller_tokens.labels(caller).inc(tokens)
        self.caller_queue_time.labels(caller).observe(queue_ms / 1000)

    # -- requests --------------------------------------------------------------------------

    def on_caller_request(self, caller: str, code: str) -> None:
        """One finished request of ``caller`` (a bounded set of names, never an address)."""
        self.caller_requests.labels(caller, code).inc()

    def on_request(self, method: str, code: str, seconds: float) -> None:
        """One finished request (or one item of an Embed stream) and its status code name."""
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.request_latency.labels(method).observe(seconds)

    # -- HTTP endpoint ---------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` over HTTP in a background thread; returns the bound port."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return server.server_port

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class CertificateExpiry(Collector):
    """``esmc_tls_certificate_expiry_timestamp_seconds``: ``notAfter`` of the certificate file,
    read at each scrape (a renewed file shows at once; the server serves it after SIGHUP). No
    sample while the file cannot be read or parsed (logged once per distinct error)."""

    NAME = "esmc_tls_certificate_expiry_timestamp_seconds"
    HELP = "Unix time at which the server's TLS certificate (the file) expires"

    def __init__(self, path: str):
        self.path = path
        self._last_error: str | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, self.HELP)
        try:
            family.add_metric([], certificate_expiry(self.path))
            self._last_error = None
        except (OSError, ValueError) as e:
            if str(e) != self._last_error:
                log.warning("tls_cert %s: expiry not exported: %s", self.path, e)
            self._last_error = str(e)
        yield family
