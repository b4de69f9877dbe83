"""Memory bounded in total: one budget of response bytes not yet written, shared by every
call and stream of the server, and a server-wide bound on the ids keyed streams remember.

The budget itself is tested without a server; the attacks run against real servers (an
``esmc serve`` subprocess for RSS, in-process ones on port 0 for counts). No timings.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from helpers.inprocess import running_server, server_config
from helpers.metrics import scrape_metrics
from helpers.models import seeded_model
from helpers.processes import ServeProcess
from test_limits import reset_peak_rss, rss_mb

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.budget import ResponseBudget

RSS_BOUND_MB = 300


# -- the budget alone ------------------------------------------------------------------------


@pytest.mark.unit
async def test_budget_waits_in_arrival_order_and_gives_back_on_cancel():
    seen: list[int] = []
    budget = ResponseBudget(100, on_change=seen.append)
    first = await budget.reserve(70)
    waiting = [asyncio.create_task(budget.reserve(n)) for n in (50, 10)]
    await asyncio.sleep(0)
    assert budget.used == 70 and not any(t.done() for t in waiting)  # 10 fits, but waits its turn
    first.release()
    first.release()  # once only
    leases = await asyncio.gather(*waiting)
    assert budget.used == 60
    blocked = asyncio.create_task(budget.reserve(80))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    for lease in leases:
        lease.release()
    assert budget.used == 0
    huge = await budget.reserve(10_000)  # cut to the limit: one response always fits
    assert budget.used == 100
    huge.release()
    assert seen[-1] == 0 and max(seen) == 100


# -- many unread Embed streams ---------------------------------------------------------------


def _unread_embed_streams(target: str, streams: int, per_stream: int, length: int):
    """Open ``streams`` Embed streams sending unpooled requests and reading nothing; returns
    the calls (cancel them to end the attack)."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.ESMCStub(channel)
    sequence = "ACDEFGHIKLMNPQRSTVWY" * (length // 20)

    def requests(s: int):
        for i in range(per_stream):
            yield pb.EmbedRequest(
                id=f"s{s}-{i}", protein=pb.ESMProtein(sequence=sequence),
                pooling=pb.POOLING_NONE,
            )

    calls = [stub.Embed(requests(s), timeout=600) for s in range(streams)]
    return channel, calls


def _read_embed_items(target: str, count: int, length: int) -> None:
    """Embed ``count`` proteins of ``length`` residues at once and read every answer: the
    server's forwards of that size (their activations) before the attack is measured, so the
    bound is on what unread responses add, not on how the attack's requests share forwards."""
    sequence = "ACDEFGHIKLMNPQRSTVWY" * (length // 20)
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.ESMCStub(channel)
        requests = [pb.EmbedRequest(id=f"warm-{i}", protein=pb.ESMProtein(sequence=sequence),
                                    pooling=pb.POOLING_NONE) for i in range(count)]
        answers = list(stub.Embed(iter(requests), timeout=600))
    assert sorted(a.id for a in answers) == sorted(r.id for r in requests)
    assert not any(a.HasField("error") for a in answers)


def test_unread_embed_streams_stay_within_the_memory_budget():
    """Eight Embed streams of 2,000-residue unpooled requests, none read (before: +930 MB and
    rising): the server computes until the shared budget is reserved, then waits; peak RSS
    stays within the bound; once the streams go, the budget is free and others are served."""
    limit = 64 * 1024 * 1024
    options = ["--threads", "1", "--max-unread-response-bytes", str(limit)]
    with ServeProcess("esmc-tiny", options) as served:
        pid = served.process.pid
        _read_embed_items(served.target, 8, 2000)  # the working set of full-budget forwards
        warm = _embed_items(served.metrics())
        before = rss_mb(pid)
        reset_peak_rss(pid)
        channel, calls = _unread_embed_streams(served.target, 8, 100, 2000)
        try:
            reserved = 0.0
            for _ in range(600):  # until the budget is (nearly) all reserved
                reserved = _gauge(served.metrics(), "esmc_unread_response_bytes")
                if reserved > limit - 2 * 2002 * 192 * 4:
                    break
                threading.Event().wait(0.2)
            assert reserved <= limit
            threading.Event().wait(3.0)  # more time does not compute more: the budget holds
            # every computed answer is unread and reserved: at most the budget's worth of
            # them, plus one per stream reserved just before the budget filled
            item_bytes = 2002 * 192 * 4
            computed = _embed_items(served.metrics()) - warm
            assert computed <= limit // item_bytes + 8, computed
            peak = rss_mb(pid, "VmHWM")
            assert peak - before < RSS_BOUND_MB, (before, peak)
        finally:
            for call in calls:
                call.cancel()
            channel.close()
        for _ in range(300):
            if _gauge(served.metrics(), "esmc_unread_response_bytes") == 0:
                break
            threading.Event().wait(0.1)
        assert _gauge(served.metrics(), "esmc_unread_response_bytes") == 0
        assert _gauge(served.metrics(), "esmc_stream_ids") == 0
        with grpc.insecure_channel(served.target) as reader:
            replies = list(pb_grpc.ESMCStub(reader).Embed(iter([
                pb.EmbedRequest(id=str(i), protein=pb.ESMProtein(sequence="MKTAYIAK"))
                for i in range(5)
            ]), timeout=120))
        assert sorted(r.id for r in replies) == [str(i) for i in range(5)]
        assert not any(r.HasField("error") for r in replies)


def _gauge(samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def _embed_items(samples) -> float:
    return sum(
        v for (n, labels), v in samples.items()
        if n == "esmc_requests_total" and ("method", "Embed") in labels
    )


# -- ids remembered by keyed streams -------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=1, n_layers=2, seed=4)


async def test_stream_ids_are_bounded_server_wide_and_counted(model):
    """Cheap invalid requests with long distinct ids (before: 200,000 of them grew one
    stream's id set by 257 MB): at most max_stream_ids are remembered, the rest answer a
    per-id RESOURCE_EXHAUSTED; the count is a metric and is given back when the stream ends."""
    config = server_config(settings=dict(max_stream_ids=300))
    async with running_server(model, config) as running:
        long_id = "x" * 1000

        async def requests():
            for i in range(400):
                yield pb.EmbedRequest(id=f"{i:04d}{long_id}", protein=pb.ESMProtein(sequence=""))

        call = running.stub.Embed(requests(), timeout=120)
        codes: dict[str, int] = {}
        counted = 0.0
        async for reply in call:
            codes[reply.error.code] = codes.get(reply.error.code, 0) + 1
            if sum(codes.values()) == 300:
                counted = _gauge(running.scrape(), "esmc_stream_ids")
        assert codes == {"INVALID_ARGUMENT": 300, "RESOURCE_EXHAUSTED": 100}, codes
        assert counted == 300
        assert _gauge(running.scrape(), "esmc_stream_ids") == 0
        # a duplicate is still refused within a stream, by its digest
        replies = [r async for r in running.stub.Embed(_twice("dup"), timeout=60)]
        assert sorted(r.error.message for r in replies)[1].startswith("id 'dup' was already used")


async def _twice(request_id: str):
    for _ in range(2):
        yield pb.EmbedRequest(id=request_id, protein=pb.ESMProtein(sequence="MKT"))


@pytest.mark.unit
async def test_many_waiters_cancelled_together_leave_the_budget_consistent():
    """Waiters cancelled while others are granted (a stream ending with requests waiting)
    end cancelled, nothing else, and the budget counts exactly what is held."""
    budget = ResponseBudget(100)
    held = await budget.reserve(100)
    waiters = [asyncio.create_task(budget.reserve(30)) for _ in range(20)]
    await asyncio.sleep(0)
    for task in waiters[:10]:
        task.cancel()  # their futures are cancelled before the tasks resume
    held.release()  # _grant runs past the cancelled entries
    await asyncio.sleep(0)
    cancelled = await asyncio.gather(*waiters[:10], return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in cancelled)
    granted = [t for t in waiters[10:] if t.done()]
    assert len(granted) == 3 and budget.used == 90
    for task in waiters[13:]:
        task.cancel()
    await asyncio.gather(*waiters[13:], return_exceptions=True)
    for task in granted:
        task.result().release()
    assert budget.used == 0 and not budget._waiting
