"""Admission before any work, one error scope, and the server's start and stop, end to end.

A real server on port 0 with a tiny random model over real channels: oversized inputs and
responses are refused with the numbers in the message and never cost a forward; errors reach
the client without Python class names or paths; full queues carry retry pushback; Decode and
Encode agree; a taken port fails ``esmc serve`` at start; SIGTERM shows NOT_SERVING while the
listener still answers during the drain delay.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers.inprocess import running_server, server_config
from helpers.models import random_sequence, seeded_model
from helpers.processes import free_port, serving_port
from helpers.wire import protein_request

from esmc import tokenizer
from esmc.weights import save_safetensors
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import PortInUse, channel_options, create_server
from esmc_server.engine import Engine
from esmc_server.servicer import PUSHBACK_KEY

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FOUR_MIB = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=2, n_layers=3, seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def srv(model):
    """Limit 100 residues, the smallest message limit (4 MiB); requests up to 16 MiB reach the
    readers (the default request limit would refuse the huge ones in gRPC, unread)."""
    config = server_config(
        max_wait_ms=5, max_message_bytes=FOUR_MIB,
        settings=dict(max_length=100, max_request_bytes=16 * 1024 * 1024),
    )
    async with running_server(model, config) as running:
        yield running


async def refused(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value


def _generate(sequence="MK__L", **config) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        protein=pb.ESMProtein(sequence=sequence), config=pb.GenerationConfig(**config)
    )


async def _first_generate_error(stub, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stub.Generate(request, timeout=30):
            pass
    return error.value


# -- input sizes, checked before anything is read element by element ---------------------------


async def test_huge_inputs_refused_at_once_with_sizes(srv):
    forwards = srv.engine.stats.forwards
    huge = "A" * 3_000_000
    started = time.perf_counter()
    cases = [
        (
            srv.stub.Logits(protein_request(huge, sequence=True), timeout=30),
            r"protein.sequence: sequence has 3000000 residues; the limit is 100 \(102 tokens",
        ),
        (
            srv.stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence=huge)), timeout=30),
            "sequence has 3000000 residues; the limit is 100",
        ),
        (
            srv.stub.Decode(
                pb.DecodeRequest(tokens=pb.ESMProteinTensor(sequence=[5] * 500_000)), timeout=30
            ),
            "tokens.sequence: token sequence has 500000 ids; the limit is 102",
        ),
        (
            srv.stub.Logits(
                pb.LogitsRequest(tokens=pb.ESMProteinTensor(sequence=[5] * 500_000)), timeout=30
            ),
            "token sequence has 500000 ids; the limit is 102",
        ),
        (
            srv.stub.ForwardAndSample(
                pb.ForwardAndSampleRequest(
                    protein=pb.ESMProtein(sequence="MK_"),
                    sampling_config=pb.SamplingConfig(
                        sequence=pb.SamplingTrackConfig(invalid_ids=[4] * 1_000_000)
                    ),
                ),
                timeout=30,
            ),
            "sampling_config.sequence.invalid_ids: 1000000 ids; the limit is 64",
        ),
    ]
    for call, message in cases:
        error = await refused(call)
        assert error.code() == INVALID and re.search(message, error.details()), error.details()
    error = await _first_generate_error(srv.stub, _generate(invalid_ids=[4] * 1_000_000))
    assert error.code() == INVALID
    assert "config.invalid_ids: 1000000 ids; the limit is 64" in error.details()
    assert time.perf_counter() - started < 30
    assert srv.engine.stats.forwards == forwards  # nothing was computed
    await srv.assert_serving()


async def test_mask_literals_count_as_one_residue(srv):
    response = await srv.stub.Encode(
        pb.EncodeRequest(protein=pb.ESMProtein(sequence="<mask>" * 100)), timeout=10
    )
    assert list(response.tokens.sequence) == [0, *[tokenizer.MASK_ID] * 100, 2]
    error = await refused(
        srv.stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence="<mask>" * 101)))
    )
    assert "101 residues; the limit is 100" in error.details()


# -- responses that cannot fit the message limit are refused before the forward ----------------


async def test_response_over_the_message_limit_is_refused_not_computed():
    model = seeded_model(d_model=512, n_heads=8, n_layers=2, seed=3)
    config = server_config(max_wait_ms=0, max_message_bytes=FOUR_MIB)
    async with running_server(model, config) as big:
        forwards = big.engine.stats.forwards
        before = big.scrape()
        sequence = random_sequence(np.random.default_rng(5), 1500)  # 2 x 1502 x 512 x 4 = 6.2 MB
        error = await refused(
            big.stub.Logits(protein_request(sequence, return_hidden_states=True), timeout=60)
        )
        assert error.code() == INVALID
        details = error.details()
        size = int(re.search(r"the response would be (\d+) bytes \(5\.9 MiB\)", details).group(1))
        assert 2 * 1502 * 512 * 4 < size < 2 * 1502 * 512 * 4 + 4096
        assert "message limit of 4194304 bytes (4.0 MiB, max_message_bytes)" in details
        assert "ith_hidden_layer" in details and "DTYPE_BFLOAT16" in details and "Embed" in details
        assert big.engine.stats.forwards == forwards  # refused before the forward
        one = await big.stub.Logits(  # one layer fits (3.1 MB), and is computed
            protein_request(sequence, return_hidden_states=True, ith_hidden_layer=1), timeout=60
        )
        assert tuple(one.hidden_states.shape) == (1, 1502, 512)
        # Embed per position: 2102 x 512 in float32 (4.3 MB) does not fit, in bfloat16 it does
        long = random_sequence(np.random.default_rng(6), 2100)

        async def requests():
            yield pb.EmbedRequest(
                id="f32", protein=pb.ESMProtein(sequence=long), pooling=pb.POOLING_NONE
            )
            yield pb.EmbedRequest(
                id="bf16",
                protein=pb.ESMProtein(sequence=long),
                pooling=pb.POOLING_NONE,
                output_dtype=pb.DTYPE_BFLOAT16,
            )

        responses = {r.id: r async for r in big.stub.Embed(requests(), timeout=120)}
        assert responses["f32"].error.code == "INVALID_ARGUMENT"
        assert "message limit of 4194304 bytes" in responses["f32"].error.message
        assert "POOLING_MEAN" in responses["f32"].error.message
        assert tuple(responses["bf16"].embedding.shape) == (2102, 512)
        after = big.scrape()
        assert big.engine.stats.forwards - forwards == 2  # the two that fit, nothing else

        def delta(name, **labels):
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert delta("esmc_requests_total", method="Logits", code="INVALID_ARGUMENT") == 1
        assert delta("esmc_requests_total", method="Logits", code="OK") == 1
        assert delta("esmc_requests_total", method="Embed", code="INVALID_ARGUMENT") == 1
        assert delta("esmc_requests_total", method="Embed", code="OK") == 1


# -- Embed ids ----------------------------------------------------------------------------------


async def test_embed_duplicate_and_oversized_ids_refused_per_request(srv):
    async def requests():
        for id_ in ("a", "b", "a", "x" * 2000, "c"):
            yield pb.EmbedRequest(id=id_, protein=pb.ESMProtein(sequence="MKTAYIAKQR"))

    responses = [r async for r in srv.stub.Embed(requests(), timeout=30)]
    assert len(responses) == 5
    by_outcome = {(r.id[:10], r.error.code) for r in responses}
    assert by_outcome == {
        ("a", ""),
        ("b", ""),
        ("c", ""),
        ("a", "INVALID_ARGUMENT"),
        ("x" * 10, "INVALID_ARGUMENT"),
    }
    duplicate = next(r for r in responses if r.id == "a" and r.error.code)
    assert "id 'a' was already used in this stream" in duplicate.error.message
    long = next(r for r in responses if r.id.startswith("x"))
    assert "id: 2000 characters; the limit is 1024" in long.error.message


# -- Decode and Encode agree; lowercase gets a hint ---------------------------------------------


async def test_decode_output_encodes_back_to_the_same_ids(srv):
    ids = [0, *range(3, tokenizer.VOCAB_SIZE), 2]  # every id a caller may send, <unk> included
    decoded = await srv.stub.Decode(pb.DecodeRequest(tokens=pb.ESMProteinTensor(sequence=ids)))
    assert decoded.protein.sequence.startswith("<unk>L")
    encoded = await srv.stub.Encode(pb.EncodeRequest(protein=decoded.protein))
    assert list(encoded.tokens.sequence) == ids
    error = await refused(
        srv.stub.Decode(pb.DecodeRequest(tokens=pb.ESMProteinTensor(sequence=[0, 5, 1, 2])))
    )
    assert error.code() == INVALID and "token id 1 at position 2" in error.details()


async def test_lowercase_refused_with_a_hint_everywhere(srv):
    hint = r"lowercase character 'k' at position 1 \(residue 1\): sequences are upper-case"
    error = await refused(srv.stub.Logits(protein_request("MkT", sequence=True)))
    assert error.code() == INVALID and re.search(hint, error.details())
    assert "--uppercase" in error.details()
    error = await refused(srv.stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence="Mk"))))
    assert re.search(hint, error.details())
    error = await _first_generate_error(srv.stub, _generate("Mk__"))
    assert re.search(hint, error.details())


# -- one error scope: no class names or paths, quiet cancellations, pushback --------------------


class FailingEngine(Engine):
    async def logits(self, call, config=None, **kwargs):
        if len(getattr(call, "tokens", call)) == 5:  # the servicer hands over its call
            raise RuntimeError("boom in /srv/esmc/secret_module.py line 3")
        return await super().logits(call, config, **kwargs)


async def test_internal_errors_name_no_class_or_path(model, caplog):
    config = server_config()
    engine = FailingEngine(model, config.batching)
    server, port = await create_server(config, engine=engine, model=model)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = pb_grpc.ESMCStub(channel)
        with caplog.at_level(logging.DEBUG, logger="esmc_server"):
            error = await refused(stub.Logits(protein_request("MKT", sequence=True), timeout=10))
            assert error.code() == grpc.StatusCode.INTERNAL
            details = error.details()
            assert "RuntimeError" not in details and "/srv" not in details and "boom" not in details
            reference = re.search(r"reference ([0-9a-f]{12})", details).group(1)
            assert reference in caplog.text and "boom" in caplog.text  # the log has the story

            async def requests():
                yield pb.EmbedRequest(id="bad", protein=pb.ESMProtein(sequence="MKT"))
                yield pb.EmbedRequest(id="good", protein=pb.ESMProtein(sequence="MKTL"))

            responses = {r.id: r async for r in stub.Embed(requests(), timeout=10)}
            assert responses["bad"].error.code == "INTERNAL"
            assert "RuntimeError" not in responses["bad"].error.message
            assert responses["good"].HasField("embedding")
    finally:
        await channel.close()
        await server.stop(1.0)


async def test_cancel_and_deadline_log_no_error_and_count_as_seen(model, caplog):
    async with running_server(model, server_config(max_wait_ms=1000)) as slow:
        before = slow.scrape()
        with caplog.at_level(logging.DEBUG, logger="esmc_server"):
            call = slow.stub.Logits(protein_request("MKTAYIAKQ", sequence=True))
            await asyncio.sleep(0.2)
            call.cancel()
            error = await refused(slow.stub.Logits(protein_request("MKT"), timeout=0.2))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(1.5)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        after = slow.scrape()

        def delta(code):
            key = ("esmc_requests_total", (("code", code), ("method", "Logits")))
            return after.get(key, 0.0) - before.get(key, 0.0)

        assert delta("CANCELLED") == 1 and delta("DEADLINE_EXCEEDED") == 1 and delta("OK") == 0


async def test_full_queue_carries_retry_pushback(model):
    config = server_config(max_queue=2, max_batch_size=1, max_wait_ms=0)
    async with running_server(model, config) as narrow:
        rng = np.random.default_rng(3)
        calls = [
            narrow.stub.Logits(protein_request(random_sequence(rng, 300), sequence=True))
            for _ in range(30)
        ]
        await asyncio.gather(*calls, return_exceptions=True)
        full = [c for c in calls if await c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert full
        for call in full:
            assert dict(await call.trailing_metadata())[PUSHBACK_KEY] == "200"


# -- server start: a taken port is an error -----------------------------------------------------


async def test_port_taken_fails_at_start(model, tmp_path):
    port = free_port()
    config = dataclasses.replace(server_config(), port=port, metrics_port=None)
    first, _ = await create_server(config, model=model)
    try:
        with pytest.raises(PortInUse, match=f"cannot bind 127.0.0.1:{port}: the port is in use"):
            await create_server(config, model=model)
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "esmc_server.cli", "serve", "--model", "esmc-tiny",
             "--port", str(port), "--metrics-port", "off"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert f"cannot bind 127.0.0.1:{port}" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        await first.stop(1.0)


# -- SIGTERM: NOT_SERVING while the listener still answers, then refuse ------------------------


async def test_sigterm_shows_not_serving_during_the_drain_delay(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_safetensors(seeded_model(d_model=64, n_heads=2, n_layers=2, seed=5), weights)
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable, "-m", "esmc_server.cli", "serve", "--model", str(weights),
        "--port", "0", "--metrics-port", "off", "--device", "cpu", "--threads", "1",
        "--drain-delay-s", "2", "--grace-s", "5",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=log, env={**os.environ}
        )
    try:
        port = await serving_port(log_path, process)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options(FOUR_MIB))
        stub = pb_grpc.ESMCStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest(service="esmc.v1.ESMC")
        assert (await health.Check(check, timeout=10)).status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.sleep(0.5)
        status = await health.Check(check, timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        response = await stub.Logits(protein_request("MKTAYIAKQ", sequence=True), timeout=10)
        assert tuple(response.logits.sequence.shape) == (11, 64)  # still answering
        assert time.monotonic() - signalled < 2
        await asyncio.sleep(max(0.0, 2.5 - (time.monotonic() - signalled)))
        error = await refused(stub.Logits(protein_request("MKT", sequence=True), timeout=10))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(process.wait(), 60) == 0
        await channel.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "NOT_SERVING for 2.0 s" in log_path.read_text()



# -- threads ------------------------------------------------------------------------------------


async def test_threads_setting_sets_torch_threads(model):
    before = torch.get_num_threads()
    try:
        async with running_server(model, server_config(settings=dict(threads=2))) as running:
            assert torch.get_num_threads() == 2
            await running.assert_serving()
    finally:
        torch.set_num_threads(before)
