"""A server's Prometheus endpoint read back over HTTP, and the request counts in it."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple], float]
"""``{(sample name, sorted (label, value) pairs): value}``."""


def scrape_metrics(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:PORT/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def requests_by_code(metrics_port: int, method: str) -> dict[str, float]:
    """``esmc_requests_total`` of ``method``: status code -> count."""
    counts: dict[str, float] = defaultdict(float)
    for (name, labels), value in scrape_metrics(metrics_port).items():
        labels = dict(labels)
        if name == "esmc_requests_total" and labels.get("method") == method:
            counts[labels["code"]] += value
    return counts


def requests_served(metrics: Samples, method: str) -> float:
    """How many ``method`` calls (any status) a server's metrics counted."""
    return sum(
        value
        for (name, labels), value in metrics.items()
        if name == "esmc_requests_total" and ("method", method) in labels
    )
