"""Client retry and stream-window behaviour against a real gRPC server on port 0.

The server here is a small stand-in ``ESMC`` servicer (no model) whose answers are
scripted per sequence, because busy (``RESOURCE_EXHAUSTED``) and broken-stream
(``UNAVAILABLE``) answers cannot be produced on demand by the real server.
Sequences: ``"BUSY..."`` is answered RESOURCE_EXHAUSTED on its first attempt, ``"BAD..."``
always INVALID_ARGUMENT, ``"DROP..."`` breaks the whole stream (UNAVAILABLE) on its first
attempt; anything else gets the embedding ``[len(sequence), attempt]``.
"""

import asyncio
import collections
import contextlib
import gc
import logging
import threading
import time

import grpc
import grpc.aio
import numpy as np
import pytest

from esmc_client import AsyncESMCClient, ESMCClient, ESMCError, RetryPolicy
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_client.responses import rpc_error
from esmc_client.retry import retryable
from esmc_client.tensors import from_numpy

pytestmark = pytest.mark.e2e

FAST = RetryPolicy(max_retries=3, initial_backoff_s=0.01, max_backoff_s=0.05)


class ScriptedServicer(pb_grpc.ESMCServicer):
    def __init__(self):
        self.attempts = collections.Counter()  # sequence -> times seen
        self.times = collections.defaultdict(list)  # sequence -> arrival times (Encode)
        self.answered = 0  # Embed answers sent
        self.info_calls = 0
        self.outstanding = 0
        self.max_outstanding = 0

    async def Info(self, request, context):
        self.info_calls += 1
        if self.info_calls <= 2:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.InfoResponse(model_name="scripted", d_model=2)

    async def Encode(self, request, context):
        """``PUSH<ms>``: RESOURCE_EXHAUSTED with that pushback on the first attempt;
        ``STOP``: always RESOURCE_EXHAUSTED with pushback -1 ("do not retry")."""
        sequence = request.protein.sequence
        self.attempts[sequence] += 1
        self.times[sequence].append(time.monotonic())
        if sequence == "STOP" or self.attempts[sequence] == 1:
            pushback = "-1" if sequence == "STOP" else sequence.removeprefix("PUSH")
            context.set_trailing_metadata((("grpc-retry-pushback-ms", pushback),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return pb.EncodeResponse(tokens=pb.ESMProteinTensor(sequence=[0, 2]))

    async def Embed(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()

        async def read():
            with contextlib.suppress(Exception):  # the stream was aborted below
                async for request in request_iterator:
                    self.outstanding += 1
                    self.max_outstanding = max(self.max_outstanding, self.outstanding)
                    await queue.put(request)
            await queue.put(None)

        reader = asyncio.create_task(read())
        while (request := await queue.get()) is not None:
            await asyncio.sleep(0.002)  # answer later than the next request can arrive
            self.outstanding -= 1
            sequence = request.protein.sequence
            self.attempts[sequence] += 1
            if sequence.startswith("DROP") and self.attempts[sequence] == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
            yield self._answer(request.id, sequence, self.attempts[sequence])
            self.answered += 1
        await reader

    @staticmethod
    def _answer(wire_id: str, sequence: str, attempt: int) -> pb.EmbedResponse:
        if sequence.startswith("BAD"):
            error = pb.Error(code="INVALID_ARGUMENT", message=f"{sequence} is not a protein")
            return pb.EmbedResponse(id=wire_id, error=error)
        if sequence.startswith("BUSY") and attempt == 1:
            busy = pb.Error(code="RESOURCE_EXHAUSTED", message="queue full")
            return pb.EmbedResponse(id=wire_id, error=busy)
        embedding = from_numpy(np.float32([len(sequence), attempt]))
        return pb.EmbedResponse(id=wire_id, embedding=embedding)


@pytest.fixture()
def scripted():
    """(servicer, port) of a scripted server running on its own event loop thread."""
    loop = asyncio.new_event_loop()
    servicer = ScriptedServicer()
    started = threading.Event()
    holder = {}

    async def start():
        server = grpc.aio.server()
        pb_grpc.add_ESMCServicer_to_server(servicer, server)
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["server"] = server
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert started.wait(30)
    yield servicer, holder["port"]
    asyncio.run_coroutine_threadsafe(holder["server"].stop(None), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


SEQUENCES = [("a", "MK"), ("b", "BUSY1"), ("c", "BAD1"), ("d", "LLV"), ("e", "BUSY22")]


def _check_results(results):
    assert [r.id for r in results] == ["a", "b", "c", "d", "e"]
    by_id = {r.id: r for r in results}
    assert by_id["c"].error.code == "INVALID_ARGUMENT"  # reported, not retried
    assert by_id["c"].attempts == 1 and by_id["c"].embedding is None
    for uid, length, attempt in [("a", 2, 1), ("b", 5, 2), ("d", 3, 1), ("e", 6, 2)]:
        assert by_id[uid].ok
        np.testing.assert_array_equal(by_id[uid].embedding, [length, attempt])
        assert by_id[uid].attempts == attempt


def test_sync_embed_retries_busy_sequences_and_reports_bad_ones(scripted):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
        results = client.embed(SEQUENCES, batch_size=2, concurrency=2, max_in_flight=2)
    _check_results(results)
    assert servicer.attempts["BAD1"] == 1


async def test_async_embed_retries_busy_sequences_and_reports_bad_ones(scripted):
    servicer, port = scripted
    async with AsyncESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
        results = await client.embed(SEQUENCES, batch_size=3, concurrency=2, max_in_flight=2)
    _check_results(results)


@pytest.mark.parametrize("use_async", [False, True])
def test_a_broken_stream_is_resent_without_the_answered_sequences(scripted, use_async):
    servicer, port = scripted
    sequences = ["MK", "LV", "DROP", "MKV"]
    if use_async:
        async def run():
            async with AsyncESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
                return await client.embed(sequences, batch_size=4, max_in_flight=1)

        results = asyncio.run(run())
    else:
        with ESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
            results = client.embed(sequences, batch_size=4, max_in_flight=1)
    assert all(r.ok for r in results)
    assert [r.id for r in results] == ["0", "1", "2", "3"]
    assert servicer.attempts == {"MK": 1, "LV": 1, "DROP": 2, "MKV": 1}
    np.testing.assert_array_equal(results[2].embedding, [4, 2])


def test_retries_exhausted_report_the_last_error(scripted):
    servicer, port = scripted
    no_retry = RetryPolicy(max_retries=0)
    with ESMCClient(f"127.0.0.1:{port}", retry=no_retry) as client:
        (result,) = client.embed(["BUSY"])
    assert result.error.code == "RESOURCE_EXHAUSTED" and result.attempts == 1


def test_requests_in_flight_never_exceed_the_window(scripted):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
        results = client.embed(["MK"] * 40, batch_size=40, max_in_flight=3)
    assert len(results) == 40 and all(r.ok for r in results)
    assert 1 <= servicer.max_outstanding <= 3


def test_unary_calls_retry_unavailable_through_the_channel_policy(scripted):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
        assert client.info(timeout=30).model_name == "scripted"
    assert servicer.info_calls == 3


def test_unary_errors_raise_esmc_error_with_the_status_name(scripted):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(ESMCError) as error:
            client.info()
        assert error.value.code == "UNAVAILABLE" and error.value.message == "warming up"
        with pytest.raises(ESMCError) as error:
            client.logits("MK")  # not implemented by the scripted servicer
        assert error.value.code == "UNIMPLEMENTED"


def test_progress_bar_counts_every_sequence(scripted, capsys):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
        results = client.embed(SEQUENCES, progress=True)
    assert len(results) == 5
    assert "5/5" in capsys.readouterr().err


def test_server_pushback_sets_the_wait_and_negative_pushback_stops(scripted):
    servicer, port = scripted
    with ESMCClient(f"127.0.0.1:{port}", retry=RetryPolicy(initial_backoff_s=0.001)) as client:
        client.encode("PUSH300", timeout=30)
        with pytest.raises(ESMCError) as error:
            client.encode("STOP", timeout=30)
    first, second = servicer.times["PUSH300"]
    assert second - first >= 0.3  # the server's 300 ms, not the client's 1 ms backoff
    assert servicer.attempts["STOP"] == 1 and error.value.pushback_ms == -1
    assert error.value.code == "RESOURCE_EXHAUSTED" and error.value.attempts == 1


@pytest.mark.parametrize("use_async", [False, True])
def test_bulk_embed_rides_out_a_restart_on_the_same_port(use_async):
    """The server stops mid-run and a new one binds the same port 1 s later: every sequence
    gets its answer, the definitive error is not sent again."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servicer = ScriptedServicer()

    async def start(port: int):
        server = grpc.aio.server()
        pb_grpc.add_ESMCServicer_to_server(servicer, server)
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        return server, bound

    def run(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    server, port = run(start(0))
    sequences = [("bad", "BAD1")] + [(f"p{i}", "MK" + "L" * (i % 7)) for i in range(300)]
    outcome = {}

    def embed():
        target = f"127.0.0.1:{port}"
        if use_async:
            async def go():
                async with AsyncESMCClient(target, retry=FAST) as client:
                    return await client.embed(sequences, batch_size=50, max_in_flight=2)

            outcome["results"] = asyncio.run(go())
        else:
            with ESMCClient(target, retry=FAST) as client:
                outcome["results"] = client.embed(sequences, batch_size=50, max_in_flight=2)

    worker = threading.Thread(target=embed)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while servicer.answered < 40:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        run(server.stop(None))
        time.sleep(1.0)
        server, _ = run(start(port))
        worker.join(60)
        assert not worker.is_alive()
    finally:
        run(server.stop(None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
    results = outcome["results"]
    assert [r.id for r in results] == [uid for uid, _ in sequences]
    assert results[0].error.code == "INVALID_ARGUMENT" and servicer.attempts["BAD1"] == 1
    failed = [(r.id, str(r.error), r.attempts) for r in results[1:] if not r.ok]
    assert not failed, f"{len(failed)} failed, e.g. {failed[:3]}"
    assert any(r.attempts > 1 for r in results)  # the restart cut streams short


def test_aio_write_failure_is_a_transport_failure():
    """grpc.aio marks a client stream whose request write the transport failed (the server
    went away under it) INTERNAL "Internal error from Core": retried as UNAVAILABLE, what it
    is; an INTERNAL sent by a server stays definitive."""
    def aio_error(code, details):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    local = rpc_error(aio_error(grpc.StatusCode.INTERNAL, "Internal error from Core"))
    assert local.code == "UNAVAILABLE" and retryable(local.code, local.message)
    assert "the connection failed while sending" in local.message
    sent = rpc_error(aio_error(grpc.StatusCode.INTERNAL, "handling this call (log reference 1)"))
    assert sent.code == "INTERNAL" and not retryable(sent.code, sent.message)


def test_async_embed_leaves_no_task_pending_when_a_stream_breaks(scripted, caplog):
    """A stream the server ends while requests wait for the window: the request writer
    finishes with the stream (no pending task, nothing logged by asyncio, even after the
    garbage collector ran)."""
    servicer, port = scripted
    sequences = ["MK", "DROP", "LV", "MKV", "MKVL", "MKVLA"]
    noticed = []  # what asyncio would log: "Task was destroyed but it is pending!"...

    async def run():
        asyncio.get_running_loop().set_exception_handler(lambda _, found: noticed.append(found))
        async with AsyncESMCClient(f"127.0.0.1:{port}", retry=FAST) as client:
            results = await client.embed(sequences, batch_size=6, max_in_flight=1)
            for _ in range(3):
                gc.collect()
                await asyncio.sleep(0.05)
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        gc.collect()
        await asyncio.sleep(0.05)
        return results, left

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        results, left = asyncio.run(run())
        gc.collect()
    assert all(r.ok for r in results) and servicer.attempts["DROP"] == 2
    assert not left, [t.get_coro() for t in left]
    assert not noticed, noticed
    assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
