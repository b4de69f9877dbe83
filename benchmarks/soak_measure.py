"""Measurement every few seconds: each replica's resident memory and open descriptors (from
``/proc``) and what its ``/metrics`` says (queue depth, active generations, batch sizes,
requests by method and status code)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.soak_fleet import Replica, process_sample


@dataclasses.dataclass(frozen=True)
class Sample:
    t: float  # run clock, seconds
    replica: int
    pid: int
    rss_mb: float
    fds: int
    queue_depth: float | None = None
    active_generations: float | None = None
    batch_sequences_sum: float | None = None  # counters since the process started
    batch_sequences_count: float | None = None
    requests: tuple[tuple[str, str, float], ...] = ()  # (method, code, count)


def scrape(port: int, timeout: float = 3.0) -> dict:
    """The replica's metrics we follow (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    found: dict = {"requests": []}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "esmc_queue_depth":
                found["queue_depth"] = s.value
            elif s.name == "esmc_active_generations":
                found["active_generations"] = s.value
            elif s.name == "esmc_batch_size_sequences_sum":
                found["batch_sequences_sum"] = s.value
            elif s.name == "esmc_batch_size_sequences_count":
                found["batch_sequences_count"] = s.value
            elif s.name == "esmc_requests_total":
                found["requests"].append((s.labels["method"], s.labels["code"], s.value))
    found["requests"] = tuple(found["requests"])
    return found


async def sample_replica(replica: Replica, clock) -> Sample | None:
    pid = replica.pid
    if pid is None or not replica.alive():
        return None
    at = clock()
    memory = process_sample(pid)
    if memory is None:
        return None
    try:
        metrics = await asyncio.to_thread(scrape, replica.metrics_port)
    except OSError:  # starting, draining or just killed: memory only
        metrics = {}
    return Sample(at, replica.index, pid, memory[0], memory[1], **metrics)


def driver_sample(clock) -> dict:
    """The driver process itself (the clients): memory, descriptors and asyncio tasks, so
    that a leak on the client side shows too."""
    rss_mb, fds = process_sample(os.getpid()) or (None, None)
    return {"t": round(clock(), 1), "rss_mb": rss_mb, "fds": fds,
            "tasks": len(asyncio.all_tasks())}


async def sample_loop(replicas: list[Replica], clock, interval_s: float, stop: asyncio.Event,
                      samples: list[Sample], driver: list[dict], supervise) -> None:
    """Sample every replica and the driver each ``interval_s`` until ``stop``;
    ``supervise()`` restarts replicas that exited on their own."""
    while not stop.is_set():
        found = await asyncio.gather(*(sample_replica(r, clock) for r in replicas))
        samples.extend(s for s in found if s is not None)
        driver.append(driver_sample(clock))
        await supervise()
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass
