"""Fault containment and the watchdog, by fault injection into the real engine over real
channels: a tiny model or pass step that fails on a poison protein (tests/helpers/faults.py).

An Exception at a stage fails only the request it concerns, with INTERNAL and a message that
names the stage (no class names, no paths); its batch-mates get their exact outputs and the
server stays SERVING. A BaseException or a hung forward is fatal: every call in flight or
queued fails with UNAVAILABLE, health turns NOT_SERVING, new calls get UNAVAILABLE at once,
and ``esmc serve`` exits with status 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.faults import POISON, RELEASE, FaultyExecutor, FaultyModel
from helpers.inprocess import running_server, server_config
from helpers.models import seeded_model
from helpers.processes import free_port
from helpers.wire import protein_request, to_numpy

from esmc.generation import generate
from esmc.inference import run_logits
from esmc.tokenizer import encode
from esmc.types import GenerationConfig, LogitsConfig
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.engine import Engine, EngineObserver

pytestmark = pytest.mark.e2e

GOOD = ["MKTAYIAKQRQISFVKSHFSRQ", "MSHHKGYGKHNGPEHAHKDFPIAK"]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=2, n_layers=2, seed=3)


def faulty_server(model, *, executor=None, observer=None, forward_timeout_s=None):
    """A real server whose batches wait for the three calls of a test (max_batch_size 3)."""
    config = dataclasses.replace(server_config(max_batch_size=3, max_wait_ms=1000), warmup=False)
    engine = Engine(
        model, config.batching, observer, forward_timeout_s=forward_timeout_s, executor=executor
    )
    return running_server(model, config, engine=engine)


async def three_calls(stub):
    """Logits for GOOD[0], POISON, GOOD[1] at once (one batch); outcomes in that order."""
    calls = [
        stub.Logits(protein_request(s, sequence=True), timeout=60)
        for s in (GOOD[0], POISON, GOOD[1])
    ]
    return await asyncio.gather(*calls, return_exceptions=True)


def assert_clean(details: str) -> None:
    """A status message for a client: no Python class name, no path, no traceback."""
    for word in ("Error:", "Exception", "RuntimeError", "Fatal", "Traceback", "/", ".py"):
        assert word not in details, details


def assert_exact(model, sequence: str, response) -> None:
    """The response's logits equal a forward of ``sequence`` alone (batched: within 1e-5)."""
    expected = run_logits(model, [encode(sequence)], [LogitsConfig(sequence=True)])[0]
    got = to_numpy(response.logits.sequence)
    want = expected.logits.sequence.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


async def health_of(channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service=service)
    return (await stub.Check(request, timeout=10)).status


async def wait_for(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- contained: an Exception fails its own request only ---------------------------------------


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("forward", "internal error while running the forward; the server logged the details"),
        ("collate", "internal error while preparing the batch; the server logged the details"),
        ("slice", "internal error while splitting the batch's outputs; the server logged the details"),
    ],
)
async def test_an_exception_fails_only_its_request(model, stage, message, caplog):
    if stage == "forward":
        served, executor = FaultyModel.like(model, "exception"), None
    else:
        served, executor = model, FaultyExecutor(stage)
    async with faulty_server(served, executor=executor) as srv:
        with caplog.at_level(logging.ERROR):
            good0, bad, good1 = await three_calls(srv.stub)
        assert isinstance(bad, grpc.aio.AioRpcError)
        assert bad.code() == grpc.StatusCode.INTERNAL and bad.details() == message
        assert_clean(bad.details())
        assert_exact(model, GOOD[0], good0)
        assert_exact(model, GOOD[1], good1)
        assert good0.metadata.batch_size in (1, 2, 3)
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
        assert len(logged) == 1 and "injected fault" in str(logged[0].exc_info[1])
        await srv.assert_serving()  # the device loop goes on
        again = await srv.stub.Logits(protein_request(GOOD[1], sequence=True), timeout=30)
        assert_exact(model, GOOD[1], again)
        assert srv.server.engine.fatal is None


async def test_a_sampling_exception_fails_only_its_generation(model, caplog):
    """Generation steps are sampled together; a failure there is located per generation."""
    prompts = ["MKT____LLAQRST__", POISON.replace("LLA", "L__A"), "MSHH__GYG_HNG"]
    async with faulty_server(model, executor=FaultyExecutor("sample")) as srv:
        with caplog.at_level(logging.ERROR):
            outcomes = await asyncio.gather(
                *[_collect(srv.stub.Generate(_generate_request(p, i), timeout=60))
                  for i, p in enumerate(prompts)],
                return_exceptions=True,
            )
        bad = outcomes[1]
        assert bad.code() == grpc.StatusCode.INTERNAL
        assert bad.details() == (
            "internal error while sampling the next generation step; "
            "the server logged the details"
        )
        for i in (0, 2):
            expected = generate(model, encode(prompts[i]), GenerationConfig(num_steps=3), seed=i)
            final = outcomes[i][-1]
            assert final.final and list(final.protein_tensor.sequence) == expected.sequence.tolist()
        logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
        assert len(logged) == 1
        await srv.assert_serving()


def _generate_request(sequence: str, seed: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        protein=pb.ESMProtein(sequence=sequence),
        config=pb.GenerationConfig(num_steps=3),
        seed=seed,
    )


async def _collect(stream) -> list:
    return [message async for message in stream]


async def test_a_failing_observer_never_fails_a_request(model, caplog):
    class Broken(EngineObserver):
        def on_batch(self, *args):
            raise RuntimeError("metrics backend down")

        def on_queue_depth(self, n):
            raise RuntimeError("metrics backend down")

    async with faulty_server(model, observer=Broken()) as srv:
        with caplog.at_level(logging.ERROR):
            outcomes = await asyncio.gather(
                *[srv.stub.Logits(protein_request(s, sequence=True)) for s in GOOD * 3]
            )
        for sequence, response in zip(GOOD * 3, outcomes):
            assert_exact(model, sequence, response)
        logged = [r for r in caplog.records if "observer" in r.getMessage()]
        assert len(logged) == 2  # once per failing method, not once per call
        await srv.assert_serving()


async def test_out_of_memory_alone_is_not_retryable(model):
    """A sequence that does not fit device memory even alone answers INVALID_ARGUMENT with
    its token count (RESOURCE_EXHAUSTED stays for a full queue, which clients retry)."""
    import torch

    class SmallDevice(FaultyModel):
        def forward_packed(self, tokens, cu_seqlens, max_seqlen, **kwargs):
            if tokens.numel() > 40:
                raise torch.OutOfMemoryError("test double: CUDA out of memory")
            return super().forward_packed(tokens, cu_seqlens, max_seqlen, **kwargs)

    served = SmallDevice.like(model, "exception")
    async with faulty_server(served) as srv:
        long = "MKTAYIAKQR" * 5
        outcome, short, other = await asyncio.gather(
            srv.stub.Logits(protein_request(long, sequence=True)),
            srv.stub.Logits(protein_request("MKTAYIAK", sequence=True)),
            srv.stub.Logits(protein_request("MSHHKGYGK", sequence=True)),
            return_exceptions=True,
        )
        assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "52 tokens does not fit in device memory" in outcome.details()
        assert_exact(model, "MKTAYIAK", short)
        assert_exact(model, "MSHHKGYGK", other)
        await srv.assert_serving()


# -- fatal: a BaseException or a hang ---------------------------------------------------------


async def assert_failed_fast(srv) -> None:
    """Health NOT_SERVING for the server and the ESMC service; new calls UNAVAILABLE at once."""
    await wait_for(lambda: _is(health_of(srv.channel, ""), NOT_SERVING))
    assert await health_of(srv.channel, "esmc.v1.ESMC") == NOT_SERVING
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await srv.stub.Logits(protein_request(GOOD[0], sequence=True), timeout=30)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 1.0
    assert_clean(error.value.details())
    assert "must be restarted" in error.value.details()


async def _is(status, expected) -> bool:
    return await status == expected


async def test_a_base_exception_in_a_forward_is_fatal(model):
    served = FaultyModel.like(model, "base")
    async with faulty_server(served) as srv:
        start = time.monotonic()
        outcomes = await three_calls(srv.stub)
        assert time.monotonic() - start < 5.0
        for outcome in outcomes:  # the whole batch was in flight: all UNAVAILABLE
            assert outcome.code() == grpc.StatusCode.UNAVAILABLE
            assert_clean(outcome.details())
            assert "device thread stopped" in outcome.details()
        await assert_failed_fast(srv)
        assert "device thread" in srv.server.fatal


async def test_a_hung_forward_is_fatal_after_forward_timeout(model):
    """The poison forward hangs; after forward_timeout_s every call in flight (the batch),
    queued (a Logits call) and streaming (a Generate) fails with UNAVAILABLE."""
    RELEASE.clear()
    served = FaultyModel.like(model, "hang")
    try:
        async with faulty_server(served, forward_timeout_s=0.5) as srv:
            start = time.monotonic()
            batch = asyncio.gather(*[await _started(c) for c in _calls(srv.stub)],
                                   return_exceptions=True)
            await asyncio.sleep(0.2)
            queued = srv.stub.Logits(protein_request(GOOD[0], sequence=True), timeout=60)
            generate = srv.stub.Generate(
                pb.GenerateRequest(protein=pb.ESMProtein(sequence="MKT____LL"), seed=1),
                timeout=60,
            )
            outcomes = [*await batch, *await asyncio.gather(queued, return_exceptions=True)]
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in generate:
                    pass
            elapsed = time.monotonic() - start
            for outcome in [*outcomes, streamed.value]:
                assert outcome.code() == grpc.StatusCode.UNAVAILABLE, outcome
                assert "ran longer than 0.5 s" in outcome.details()
                assert_clean(outcome.details())
            assert 0.5 <= elapsed < 5.0
            await assert_failed_fast(srv)
    finally:
        RELEASE.set()


def _calls(stub):
    return [
        stub.Logits(protein_request(s, sequence=True), timeout=60)
        for s in (GOOD[0], POISON, GOOD[1])
    ]


async def _started(call):
    return asyncio.ensure_future(call)


# -- the process exits so that an orchestrator restarts it ------------------------------------


async def test_esmc_serve_exits_nonzero_after_a_fatal_fault():
    port = free_port()
    tests = Path(__file__).parent
    path = [str(tests), os.environ.get("PYTHONPATH", "")]  # CI sets no PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    args = ["--port", str(port), "--metrics-port", "off", "--fatal-exit-s", "1"]
    process = subprocess.Popen(
        [sys.executable, "-m", "helpers.faults", *args],
        cwd=tests,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await wait_for(lambda: _serving(channel), timeout=60)
        stub = pb_grpc.ESMCStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Logits(protein_request(POISON, sequence=True), timeout=30)
        failed_at = time.monotonic()
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await health_of(channel, "") == NOT_SERVING
        status = await asyncio.to_thread(process.wait, 30)
        assert status == 1
        assert time.monotonic() - failed_at < 1 + 10
        log = process.stdout.read().decode()
        assert "exiting with status 1" in log and "Traceback" in log  # logged server-side
    finally:
        await channel.close()
        if process.poll() is None:
            process.kill()
            process.wait()


async def _serving(channel) -> bool:
    try:
        return await health_of(channel, "") == SERVING
    except grpc.aio.AioRpcError:
        return False


async def test_stopping_during_a_hung_forward_ends_once_the_watchdog_fires(model):
    """SIGTERM's path (engine.stop) does not wait forever on a hung device thread."""
    RELEASE.clear()
    engine = Engine(
        FaultyModel.like(model, "hang"),
        server_config(max_wait_ms=0).batching,
        forward_timeout_s=0.5,
    )
    reasons = []
    engine.add_fatal_listener(reasons.append)
    await engine.start()
    try:
        call = asyncio.ensure_future(engine.logits(encode(POISON), LogitsConfig(sequence=True)))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await engine.stop(grace_s=30.0)
        assert time.monotonic() - start < 3.0
        with pytest.raises(Exception) as error:
            await call
        assert error.value.code == "UNAVAILABLE"
        assert engine.fatal is not None and reasons == [engine.fatal]
    finally:
        RELEASE.set()
