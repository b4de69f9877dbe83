"""Bounded memory whatever the client does: unread streams stop being computed, idle ones end.

A real server on port 0 with a tiny random model. An Embed stream that sends 5,000 proteins
with ``POOLING_NONE`` and never reads gets only about ``embed_window`` of them computed (plus
what gRPC's transport buffers hold) and is cancelled after the idle timeout; twenty Generate
streams that are never read keep the process RSS within the stated margin; a fresh ``Logits``
call keeps its latency meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import numpy as np
import pytest
from helpers.inprocess import running_server, server_config
from helpers.models import random_sequence, seeded_model
from helpers.wire import protein_request

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

WINDOW = 16
IDLE_S = 6.0
EMBED_REQUESTS = 5000
RESIDUES = 300
STEPS = 40
RSS_MARGIN_MB = 150
"""Allowed RSS growth while the unread streams are parked; computing all 5,000 unread Embed
responses alone would hold 5,000 x 302 x 64 x 4 bytes = 387 MB."""


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


async def settle(read, at_least: int, quiet_s: float = 2.0, timeout: float = 60.0) -> int:
    """Wait until ``read()`` reached ``at_least`` and then stopped changing for ``quiet_s``."""
    end = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() < end:
        await asyncio.sleep(0.1)
        now = read()
        if now != value or now < at_least:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"never settled: {value}")


async def logits_latency(running) -> float:
    started = time.perf_counter()
    response = await running.stub.Logits(protein_request("MKTAYIAKQR", sequence=True), timeout=30)
    assert tuple(response.logits.sequence.shape) == (12, 64)
    return time.perf_counter() - started


async def test_unread_embed_stream_is_bounded_then_cancelled_when_idle():
    model = seeded_model(d_model=64, n_heads=2, n_layers=2, seed=4)
    settings = dict(embed_window=WINDOW, stream_idle_timeout_s=IDLE_S)
    async with running_server(model, server_config(max_wait_ms=2, settings=settings)) as srv:
        rng = np.random.default_rng(11)
        sequences = [random_sequence(rng, RESIDUES) for _ in range(64)]
        for _ in range(3):  # warm the allocator and the channel
            await logits_latency(srv)
        baseline_rss = rss_mb()
        before = srv.engine.stats.sequences

        async def embed_requests():
            for i in range(EMBED_REQUESTS):
                yield pb.EmbedRequest(
                    id=f"p{i}",
                    protein=pb.ESMProtein(sequence=sequences[i % 64]),
                    pooling=pb.POOLING_NONE,
                )

        embed = srv.stub.Embed(embed_requests())  # never read
        computed = await settle(lambda: srv.engine.stats.sequences, before + WINDOW) - before
        parked_rss = rss_mb()
        latency = max([await logits_latency(srv) for _ in range(5)])
        print(
            f"\nunread Embed: {computed} of {EMBED_REQUESTS} computed, RSS {baseline_rss:.0f} -> "
            f"{parked_rss:.0f} MB, fresh Logits {latency * 1000:.0f} ms"
        )
        # the window plus what gRPC's transport buffers hold (about 4 MB: ~50 responses)
        assert WINDOW <= computed <= WINDOW + 100
        assert parked_rss - baseline_rss < RSS_MARGIN_MB
        assert latency < 2.0  # generous: not a speed test, the queue is simply not full
        # nobody reads for IDLE_S: the server cancels the stream (counted as CANCELLED)
        key = ("esmc_requests_total", (("code", "CANCELLED"), ("method", "Embed")))
        await settle(lambda: srv.scrape().get(key, 0) >= 1, 1, quiet_s=0.1, timeout=IDLE_S + 30)
        assert srv.engine.stats.sequences - before == computed + 5  # + the Logits probes
        received = 0  # what the transport held is still delivered, then the status
        with pytest.raises(grpc.aio.AioRpcError) as error:
            async for _ in embed:
                received += 1
        assert error.value.code() == grpc.StatusCode.CANCELLED
        assert f"read nothing for {IDLE_S:g} s (stream_idle_timeout_s)" in error.value.details()
        assert received < computed
        await srv.assert_serving()


async def test_unread_generate_streams_stop_being_computed_then_are_cancelled():
    """Twenty 400-step Generate streams nobody reads. The engine takes a stream's next step
    only once its previous message was written, and gRPC completes a write only within the
    client's HTTP/2 flow-control window: this client keeps gRPC's initial 64 KiB window (BDP
    probing off; gRPC's default probing grows it to ~4 MiB per stream, measured in the
    README), so each stream gets about 64 KiB of steps (~145 of 400) computed, then waits
    until the idle timeout cancels it. Memory stays flat and Logits keeps its latency."""
    model = seeded_model(d_model=64, n_heads=2, n_layers=2, seed=4)
    settings = dict(stream_idle_timeout_s=IDLE_S)
    streams, residues, steps = 20, 400, 400
    async with running_server(model, server_config(max_wait_ms=2, settings=settings)) as srv:
        for _ in range(3):
            await logits_latency(srv)
        baseline_rss = rss_mb()
        options = [("grpc.http2.bdp_probe", 0)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}", options=options) as ch:
            stub = pb_grpc.ESMCStub(ch)
            calls = [
                stub.Generate(
                    pb.GenerateRequest(
                        protein=pb.ESMProtein(sequence="_" * residues),
                        config=pb.GenerationConfig(num_steps=steps),
                        seed=i,
                    )
                )
                for i in range(streams)
            ]  # never read
            step_bytes = len(
                pb.GenerateResponse(step=1, num_steps=steps, positions=[0], tokens=[5],
                                    probabilities=[0.5], entropies=[1.0], temperature=1.0,
                                    sequence="A" * residues).SerializeToString()
            )
            latencies, peak_rss = [], baseline_rss
            await asyncio.sleep(0.5)
            while srv.engine.stats.active_generations > 0:  # parked until cancelled (idle)
                latencies.append(await logits_latency(srv))
                peak_rss = max(peak_rss, rss_mb())
                await asyncio.sleep(0.5)
                assert len(latencies) < 300, "the unread generations never ended"
            computed = srv.engine.stats.generation_steps
            outcomes = []
            for call in calls:  # read them now: what the transport held, then the status
                received = 0
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    async for _ in call:
                        received += 1
                outcomes.append((received, error.value.code(), error.value.details()))
        latencies.sort()
        print(
            f"\nunread Generate: {computed} of {streams * steps} steps computed "
            f"({step_bytes} B per step message), RSS {baseline_rss:.0f} -> peak "
            f"{peak_rss:.0f} MB, fresh Logits p50 {latencies[len(latencies) // 2] * 1000:.0f} ms,"
            f" max {latencies[-1] * 1000:.0f} ms, received per stream "
            f"{sorted({o[0] for o in outcomes})}"
        )
        window_steps = 65536 // step_bytes + 1  # what one 64 KiB window holds
        per_stream_bound = window_steps + srv.server.config.batching.generation_window + 2
        assert computed <= streams * per_stream_bound < streams * steps // 2
        for received, code, details in outcomes:
            assert code == grpc.StatusCode.CANCELLED
            assert f"read nothing for {IDLE_S:g} s (stream_idle_timeout_s)" in details
            assert window_steps // 2 <= received <= window_steps
        assert peak_rss - baseline_rss < RSS_MARGIN_MB
        assert latencies[len(latencies) // 2] < 3.0  # generous: not a speed test
        await srv.assert_serving()


async def test_a_reading_embed_stream_gets_every_response():
    """The window only delays: 500 requests through a window of 4, all answered in order."""
    model = seeded_model(d_model=64, n_heads=2, n_layers=2, seed=4)
    async with running_server(model, server_config(settings=dict(embed_window=4))) as srv:

        async def requests():
            for i in range(500):
                yield pb.EmbedRequest(id=str(i), protein=pb.ESMProtein(sequence="MKTAYIAKQR"))

        ids = [r.id async for r in srv.stub.Embed(requests(), timeout=120) if not r.error.code]
        assert sorted(ids, key=int) == [str(i) for i in range(500)]
