"""End to end: a real server on port 0 with a tiny random model, real channels, raw stubs.

Outputs are compared with the in-process model (``esmc.inference.run_logits`` on one protein):
float32 bit for bit, float16/bfloat16 as the rounding of those float32 values.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import re
import signal
import sys
import time

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers.inprocess import running_server, server_config
from helpers.models import random_sequence, seeded_model
from helpers.processes import free_port, serving_port
from helpers.wire import protein_request, to_numpy

from esmc import tokenizer
from esmc.generation import forward_and_sample, generate
from esmc.inference import run_logits
from esmc.types import (
    ESMProteinTensor,
    GenerationConfig,
    LogitsConfig,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc.weights import save_safetensors
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_proto.v1 import esmc_pb2_grpc as pb_grpc
from esmc_server.app import channel_options, create_server
from esmc_server.engine import Engine

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FULL_OUTPUT = dict(
    sequence=True,
    return_embeddings=True,
    return_hidden_states=True,
    return_mean_embedding=True,
    return_mean_hidden_states=True,
)


@pytest.fixture(scope="module")
def model():
    return seeded_model(d_model=64, n_heads=2, n_layers=3, seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def srv(model):
    async with running_server(model, server_config(max_wait_ms=20)) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow(model):
    """Batches wait 1.5 s for company: time to cancel or outlive a deadline in the queue."""
    async with running_server(model, server_config(max_wait_ms=1500)) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def narrow(model):
    """Two waiting requests at most, one sequence per forward."""
    async with running_server(
        model, server_config(max_queue=2, max_batch_size=1, max_wait_ms=0)
    ) as running:
        yield running


def reference(model, tokens: torch.Tensor, **config):
    return run_logits(model, [tokens], [LogitsConfig(**config)])[0]


def tokens_of(sequence: str) -> torch.Tensor:
    return tokenizer.encode(sequence)


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- description and tokenizer -------------------------------------------------------------------


async def test_health_info_encode_decode(srv):
    assert await srv.health_status() == health_pb2.HealthCheckResponse.SERVING
    info = await srv.stub.Info(pb.InfoRequest())
    assert (info.d_model, info.n_heads, info.n_layers) == (64, 2, 3)
    assert list(info.vocabulary) == list(tokenizer.VOCABULARY)
    assert (info.max_length, info.trained_context, info.logits_width, info.dtype, info.device) == (
        16384 + 2,
        2048,
        64,
        "float32",
        "cpu",
    )
    assert info.batching.max_wait_ms == 20 and info.batching.packed
    assert info.max_message_bytes == 64 * 1024 * 1024
    encoded = await srv.stub.Encode(pb.EncodeRequest(protein=pb.ESMProtein(sequence="MKT_L<mask>")))
    assert list(encoded.tokens.sequence) == [0, 20, 15, 11, 32, 4, 32, 2]
    decoded = await srv.stub.Decode(pb.DecodeRequest(tokens=encoded.tokens))
    assert decoded.protein.sequence == "MKT_L_"


async def test_reflection_lists_services(srv):
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = [r async for r in stub.ServerReflectionInfo(iter([request]), timeout=10)]
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"esmc.v1.ESMC", "grpc.health.v1.Health"} <= names


# -- logits equal the in-process model -----------------------------------------------------------


def assert_logits_equal(response: pb.LogitsResponse, expected, layers: list[int]) -> None:
    assert np.array_equal(to_numpy(response.logits.sequence), expected.logits.sequence.numpy())
    assert np.array_equal(to_numpy(response.embeddings), expected.embeddings.numpy())
    assert np.array_equal(to_numpy(response.hidden_states), expected.hidden_states.numpy())
    assert np.array_equal(to_numpy(response.mean_embedding), expected.mean_embedding.numpy())
    assert np.array_equal(
        to_numpy(response.mean_hidden_states), expected.mean_hidden_states.numpy()
    )
    assert list(response.hidden_layers) == layers


async def test_logits_float32_exact(srv, model):
    sequence = random_sequence(np.random.default_rng(1), 350)
    response = await srv.stub.Logits(protein_request(sequence, **FULL_OUTPUT))
    expected = reference(model, tokens_of(sequence), **FULL_OUTPUT)
    L = len(sequence)
    assert tuple(response.logits.sequence.shape) == (L + 2, 64)
    assert tuple(response.hidden_states.shape) == (3, L + 2, 64)
    assert tuple(response.mean_hidden_states.shape) == (3, 64)
    assert_logits_equal(response, expected, [0, 1, 2])
    meta = response.metadata
    assert meta.batch_size >= 1 and meta.batch_tokens >= L + 2 and meta.forwards == 1
    assert meta.compute_ms > 0 and meta.queue_ms >= 0


async def test_logits_tokens_input_one_layer(srv, model):
    tokens = tokens_of("MKTAYIAKQRQISFVKSHF")
    request = pb.LogitsRequest(
        tokens=pb.ESMProteinTensor(sequence=tokens.tolist()),
        config=pb.LogitsConfig(
            return_hidden_states=True, return_mean_hidden_states=True, ith_hidden_layer=-2
        ),
    )
    response = await srv.stub.Logits(request)
    expected = reference(
        model,
        tokens,
        return_hidden_states=True,
        return_mean_hidden_states=True,
        ith_hidden_layer=-2,
    )
    assert list(response.hidden_layers) == [1]
    assert np.array_equal(to_numpy(response.hidden_states), expected.hidden_states.numpy())
    assert np.array_equal(
        to_numpy(response.mean_hidden_states), expected.mean_hidden_states.numpy()
    )
    assert not response.HasField("embeddings") and not response.logits.HasField("sequence")


@pytest.mark.parametrize(
    "dtype, torch_dtype", [(pb.DTYPE_FLOAT16, torch.float16), (pb.DTYPE_BFLOAT16, torch.bfloat16)]
)
async def test_logits_half_precision_wire(srv, model, dtype, torch_dtype):
    sequence = "MSEQNNTEMTFQIQRIYTKDISFEAPNAPHVFQKDW"
    request = protein_request(sequence, sequence=True, return_embeddings=True)
    request.output_dtype = dtype
    response = await srv.stub.Logits(request)
    expected = reference(model, tokens_of(sequence), sequence=True, return_embeddings=True)
    for wire, exact in (
        (response.logits.sequence, expected.logits.sequence),
        (response.embeddings, expected.embeddings),
    ):
        assert wire.dtype == dtype
        got = to_numpy(wire).astype(np.float32)
        assert np.array_equal(got, exact.to(torch_dtype).float().numpy())  # the rounding of float32
        eps = 2.0**-8 if torch_dtype == torch.bfloat16 else 2.0**-11
        assert np.allclose(got, exact.numpy(), rtol=eps, atol=1e-6)


async def test_64_concurrent_calls_batched_and_exact(srv, model):
    rng = np.random.default_rng(64)
    sequences = [random_sequence(rng, int(n)) for n in rng.integers(5, 400, size=64)]
    config = dict(sequence=True, return_mean_embedding=True, return_mean_hidden_states=True)
    forwards_before = srv.scrape()[("esmc_forwards_total", ())]
    responses = await asyncio.gather(
        *(srv.stub.Logits(protein_request(s, **config)) for s in sequences)
    )
    forwards = srv.scrape()[("esmc_forwards_total", ())] - forwards_before
    assert 1 <= forwards < 64
    assert max(r.metadata.batch_size for r in responses) > 1
    for sequence, response in zip(sequences, responses):
        expected = reference(model, tokens_of(sequence), **config)
        assert np.array_equal(to_numpy(response.logits.sequence), expected.logits.sequence.numpy())
        assert np.array_equal(to_numpy(response.mean_embedding), expected.mean_embedding.numpy())
        assert np.array_equal(
            to_numpy(response.mean_hidden_states), expected.mean_hidden_states.numpy()
        )
    await srv.assert_serving()


# -- bad input: INVALID_ARGUMENT before queueing -------------------------------------------------


def _tokens_request(ids, **config):
    return pb.LogitsRequest(
        tokens=pb.ESMProteinTensor(sequence=ids), config=pb.LogitsConfig(**config)
    )


BAD_LOGITS = [
    ("empty", protein_request("", sequence=True), "sequence is empty"),
    (
        "too long",
        protein_request("A" * 16385, sequence=True),
        r"16385 residues; the limit is 16384 \(16386 tokens",
    ),
    ("bad character", protein_request("MKTL1A", sequence=True), "'1' at position 4"),
    ("lowercase", protein_request("MKtL", sequence=True), "'t' at position 2"),
    ("token id", _tokens_request([0, 5, 99, 2], sequence=True), "token id 99 at position 2"),
    ("no bos", _tokens_request([5, 6, 2], sequence=True), "must start with <cls>"),
    (
        "no input",
        pb.LogitsRequest(config=pb.LogitsConfig(sequence=True)),
        "neither protein nor tokens",
    ),
    (
        "layer",
        protein_request("MKT", return_hidden_states=True, ith_hidden_layer=3),
        "ith_hidden_layer=3 does not exist",
    ),
    (
        "negative layer",
        protein_request("MKT", return_mean_hidden_states=True, ith_hidden_layer=-4),
        "does not exist",
    ),
    (
        "layer alone",
        protein_request("MKT", sequence=True, ith_hidden_layer=1),
        "neither return_hidden_states",
    ),
    ("structure", protein_request("MKT", structure=True), "no structure head"),
    ("function", protein_request("MKT", function=True), "no function head"),
    (
        "sasa input",
        pb.LogitsRequest(protein=pb.ESMProtein(sequence="MK", sasa=[1.0, 2.0])),
        "only the sequence track",
    ),
    (
        "dtype",
        pb.LogitsRequest(protein=pb.ESMProtein(sequence="MK"), output_dtype=pb.DTYPE_INT32),
        "DTYPE_INT32 is not an output dtype",
    ),
]


@pytest.mark.parametrize("name, request_, message", BAD_LOGITS, ids=[c[0] for c in BAD_LOGITS])
async def test_logits_bad_input(srv, name, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await srv.stub.Logits(request_, timeout=10)
    assert error.value.code() == INVALID
    assert re.search(message, error.value.details()), error.value.details()
    await srv.assert_serving()


def _sample_request(sequence="MK__L", **sequence_track):
    return pb.ForwardAndSampleRequest(
        protein=pb.ESMProtein(sequence=sequence),
        sampling_config=pb.SamplingConfig(sequence=pb.SamplingTrackConfig(**sequence_track)),
    )


BAD_SAMPLE = [
    ("temperature", _sample_request(temperature=-1.0), "temperature must be finite and >= 0"),
    ("top_p", _sample_request(top_p=0.0), r"top_p must be in \(0, 1\]"),
    ("topk", _sample_request(topk_logprobs=33), "topk_logprobs must be an integer in 0..32"),
    ("invalid ids", _sample_request(invalid_ids=[70]), "outside the vocabulary"),
    (
        "track",
        pb.ForwardAndSampleRequest(
            protein=pb.ESMProtein(sequence="MK_"),
            sampling_config=pb.SamplingConfig(sasa=pb.SamplingTrackConfig()),
        ),
        "no 'sasa' track",
    ),
    ("bad char", _sample_request(sequence="MK*"), r"'\*' at position 2"),
]


@pytest.mark.parametrize("name, request_, message", BAD_SAMPLE, ids=[c[0] for c in BAD_SAMPLE])
async def test_forward_and_sample_bad_input(srv, name, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await srv.stub.ForwardAndSample(request_, timeout=10)
    assert error.value.code() == INVALID
    assert re.search(message, error.value.details()), error.value.details()
    await srv.assert_serving()


def _generate_request(sequence="MKT___LL__", **config):
    return pb.GenerateRequest(
        protein=pb.ESMProtein(sequence=sequence), config=pb.GenerationConfig(**config)
    )


BAD_GENERATE = [
    ("strategy", _generate_request(strategy="greedy"), "unknown strategy 'greedy'"),
    ("schedule", _generate_request(schedule="exp"), "unknown schedule 'exp'"),
    ("num_steps", _generate_request(num_steps=0), "num_steps must be an integer >= 1, got 0"),
    ("temperature", _generate_request(temperature=-0.1), "temperature must be finite"),
    ("nan temperature", _generate_request(temperature=math.nan), "temperature must be finite"),
    ("top_p", _generate_request(top_p=1.5), r"top_p must be in \(0, 1\]"),
    ("invalid ids", _generate_request(invalid_ids=[64]), "holds 64, outside the vocabulary"),
    ("track", _generate_request(track="structure"), "no 'structure' track"),
    ("no masks", _generate_request(sequence="MKTLL"), "no masked position"),
    ("empty", _generate_request(sequence=""), "sequence is empty"),
]


@pytest.mark.parametrize("name, request_, message", BAD_GENERATE, ids=[c[0] for c in BAD_GENERATE])
async def test_generate_bad_config(srv, name, request_, message):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in srv.stub.Generate(request_, timeout=10):
            pass
    assert error.value.code() == INVALID
    assert re.search(message, error.value.details()), error.value.details()
    await srv.assert_serving()


async def test_decode_bad_ids(srv):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await srv.stub.Decode(pb.DecodeRequest(tokens=pb.ESMProteinTensor(sequence=[0, 50, 2])))
    assert error.value.code() == INVALID and "token id 50 at position 1" in error.value.details()


# -- Embed: bulk stream, one bad sequence in the middle ------------------------------------------


async def test_embed_stream_bad_sequence_in_the_middle(srv, model):
    rng = np.random.default_rng(7)
    sequences = {f"p{i}": random_sequence(rng, int(rng.integers(10, 200))) for i in range(21)}
    sequences["p10"] = "MKTL#WQ"  # the bad one

    async def requests():
        for name, sequence in sequences.items():
            yield pb.EmbedRequest(id=name, protein=pb.ESMProtein(sequence=sequence))

    responses = {r.id: r async for r in srv.stub.Embed(requests(), timeout=60)}
    assert set(responses) == set(sequences)
    bad = responses.pop("p10")
    assert bad.error.code == "INVALID_ARGUMENT" and "'#' at position 4" in bad.error.message
    assert not bad.HasField("embedding")
    for name, response in responses.items():
        assert not response.HasField("error")
        expected = reference(model, tokens_of(sequences[name]), return_mean_embedding=True)
        assert np.array_equal(to_numpy(response.embedding), expected.mean_embedding.numpy())
        assert response.metadata.batch_size >= 1
    await srv.assert_serving()


async def test_embed_layers_and_pooling(srv, model):
    sequence = "MKTAYIAKQRQISFVKSHFSRQ"
    tokens = tokens_of(sequence)
    requests = [
        pb.EmbedRequest(
            id="final-none", protein=pb.ESMProtein(sequence=sequence), pooling=pb.POOLING_NONE
        ),
        pb.EmbedRequest(
            id="block1-mean", tokens=pb.ESMProteinTensor(sequence=tokens.tolist()), layer=1
        ),
        pb.EmbedRequest(
            id="last-none",
            protein=pb.ESMProtein(sequence=sequence),
            layer=-2,
            pooling=pb.POOLING_NONE,
            output_dtype=pb.DTYPE_BFLOAT16,
        ),
        pb.EmbedRequest(id="missing-layer", protein=pb.ESMProtein(sequence=sequence), layer=9),
        pb.EmbedRequest(
            id="dtype", protein=pb.ESMProtein(sequence=sequence), output_dtype=pb.DTYPE_INT64
        ),
    ]
    responses = {r.id: r async for r in srv.stub.Embed(iter(requests), timeout=60)}
    full = reference(
        model,
        tokens,
        return_embeddings=True,
        return_hidden_states=True,
        return_mean_hidden_states=True,
    )
    assert np.array_equal(to_numpy(responses["final-none"].embedding), full.embeddings.numpy())
    assert np.array_equal(
        to_numpy(responses["block1-mean"].embedding), full.mean_hidden_states[1].numpy()
    )
    assert np.array_equal(
        to_numpy(responses["last-none"].embedding), full.hidden_states[1].bfloat16().float().numpy()
    )
    assert responses["missing-layer"].error.code == "INVALID_ARGUMENT"
    assert "layer: ith_hidden_layer=9 does not exist" in responses["missing-layer"].error.message
    assert responses["dtype"].error.code == "INVALID_ARGUMENT"


# -- sampling and generation ---------------------------------------------------------------------


async def test_forward_and_sample_matches_library(srv, model):
    sequence = "MKT__AYIA_KQRQ___ISF"
    track = dict(temperature=0.7, top_p=0.9, topk_logprobs=3)
    request = _sample_request(sequence, **track)
    request.seed = 1234
    request.sampling_config.return_mean_embedding = True
    response = await srv.stub.ForwardAndSample(request)
    config = SamplingConfig(sequence=SamplingTrackConfig(**track), return_mean_embedding=True)
    expected = forward_and_sample(model, tokens_of(sequence), config, seed=1234)
    assert list(response.protein_tensor.sequence) == expected.protein_tensor.sequence.tolist()
    assert response.protein.sequence == tokenizer.decode(expected.protein_tensor.sequence)
    assert "_" not in response.protein.sequence
    for name in ("entropy", "prob", "logprob", "top_prob", "topk_logprob"):
        assert np.array_equal(
            to_numpy(getattr(response, name)), getattr(expected, name).sequence.numpy()
        ), name
    assert np.array_equal(to_numpy(response.topk_tokens), expected.topk_tokens.sequence.numpy())
    assert np.array_equal(to_numpy(response.mean_embedding), expected.mean_embedding.numpy())
    assert response.metadata.forwards == 1


async def _collect(stream) -> list[pb.GenerateResponse]:
    return [message async for message in stream]


async def test_generate_stream_steps_and_final(srv, model):
    prompt = "MKT___LL__AYIAKQ_RQ"
    request = _generate_request(prompt, num_steps=4, strategy="entropy")
    request.seed = 99
    messages = await _collect(srv.stub.Generate(request, timeout=60))
    assert len(messages) == 4 + 1
    assert [m.step for m in messages[:4]] == [0, 1, 2, 3] and all(
        m.num_steps == 4 for m in messages
    )
    assert not any(m.final for m in messages[:4]) and messages[-1].final
    filled = []
    for m in messages[:4]:
        assert len(m.positions) == len(m.tokens) == len(m.probabilities) == len(m.entropies) > 0
        filled.extend(m.positions)
        for position, token in zip(m.positions, m.tokens):
            assert prompt[position] == "_" and m.sequence[position] == tokenizer.VOCABULARY[token]
        assert all(
            prompt[i] == c for i, c in enumerate(m.sequence) if prompt[i] != "_"
        )  # unmasked never change
        assert m.metadata.forwards == 1 and m.metadata.batch_size >= 1
    assert sorted(filled) == [i for i, c in enumerate(prompt) if c == "_"]
    final = messages[-1]
    assert "_" not in final.protein.sequence and final.sequence == final.protein.sequence
    assert final.metadata.forwards == 4
    expected = generate(
        model,
        ESMProteinTensor(sequence=tokens_of(prompt)),
        GenerationConfig(num_steps=4, strategy="entropy"),
        seed=99,
    )
    assert list(final.protein_tensor.sequence) == expected.sequence.tolist()


async def test_generate_16_concurrent_share_forwards(srv, model):
    rng = np.random.default_rng(16)
    prompts, steps = [], []
    for _ in range(16):
        sequence = list(random_sequence(rng, int(rng.integers(12, 120))))
        for position in rng.choice(len(sequence), size=len(sequence) // 3, replace=False):
            sequence[position] = "_"
        prompts.append("".join(sequence))
        steps.append(int(rng.integers(2, 9)))
    requests = []
    for i, (prompt, n) in enumerate(zip(prompts, steps)):
        request = _generate_request(prompt, num_steps=n)
        request.seed = i
        requests.append(request)
    forwards_before = srv.engine.stats.forwards
    before = srv.scrape()
    results = await asyncio.gather(*(_collect(srv.stub.Generate(r, timeout=120)) for r in requests))
    forwards = srv.engine.stats.forwards - forwards_before
    assert forwards < sum(steps) / 2  # one after another would take sum(steps)
    after = srv.scrape()
    steps_metric = ("esmc_generation_steps_total", ())
    assert after[steps_metric] - before.get(steps_metric, 0) == sum(steps)
    shared = [
        after[(f"esmc_generation_steps_per_forward_{x}", ())]
        - before.get((f"esmc_generation_steps_per_forward_{x}", ()), 0)
        for x in ("sum", "count")
    ]
    assert shared[0] == sum(steps) and shared[0] / shared[1] > 2  # steps sharing each forward
    for i, (messages, prompt, n) in enumerate(zip(results, prompts, steps)):
        assert len(messages) == n + 1 and messages[-1].final
        expected = generate(
            model,
            ESMProteinTensor(sequence=tokens_of(prompt)),
            GenerationConfig(num_steps=n),
            seed=i,
        )
        assert list(messages[-1].protein_tensor.sequence) == expected.sequence.tolist()
    await srv.assert_serving()


async def test_generate_cancel_one_stream(srv, model):
    prompt = "_" * 400
    long = _generate_request(prompt, num_steps=400)
    steps_before = srv.engine.stats.generation_steps
    others = [_generate_request("MKT" + "_" * 20 + "LL", num_steps=5) for _ in range(3)]
    for i, request in enumerate(others):
        request.seed = 10 + i
    stream = srv.stub.Generate(long, timeout=120)
    seen = 0
    async for _ in stream:
        seen += 1
        if seen == 3:
            break
    stream.cancel()
    results = await asyncio.gather(*(_collect(srv.stub.Generate(r, timeout=120)) for r in others))
    for i, messages in enumerate(results):
        expected = generate(
            model,
            ESMProteinTensor(sequence=tokens_of("MKT" + "_" * 20 + "LL")),
            GenerationConfig(num_steps=5),
            seed=10 + i,
        )
        assert list(messages[-1].protein_tensor.sequence) == expected.sequence.tolist()
    await wait_until(lambda: srv.engine.stats.active_generations == 0)
    assert srv.scrape()[("esmc_active_generations", ())] == 0
    long_steps = srv.engine.stats.generation_steps - steps_before - 3 * 5
    assert 3 <= long_steps < 400  # stopped soon after the cancel, long before its 400 steps
    await srv.assert_serving()


# -- cancellation, deadline, full queue ----------------------------------------------------------


async def test_cancelled_call_is_dropped_before_its_forward(slow):
    dropped = slow.engine.stats.dropped
    sequences = slow.engine.stats.sequences
    call = slow.stub.Logits(protein_request("MKTAYIAKQRQISFVKSHF", sequence=True))
    await asyncio.sleep(0.3)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await call.code() == grpc.StatusCode.CANCELLED
    await wait_until(lambda: slow.engine.stats.dropped > dropped)
    assert slow.engine.stats.sequences == sequences  # it never cost a forward
    await slow.assert_serving()


async def test_deadline_exceeded(slow):
    dropped = slow.engine.stats.dropped
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await slow.stub.Logits(protein_request("MKTAYIAKQRQ", sequence=True), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(lambda: slow.engine.stats.dropped > dropped)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _collect(slow.stub.Generate(_generate_request(num_steps=3), timeout=0.3))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await slow.assert_serving()


async def test_full_queue_answers_resource_exhausted(narrow):
    rng = np.random.default_rng(3)
    calls = [
        narrow.stub.Logits(protein_request(random_sequence(rng, 300), sequence=True), timeout=60)
        for _ in range(40)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    codes = [
        o.code() if isinstance(o, grpc.aio.AioRpcError) else grpc.StatusCode.OK for o in outcomes
    ]
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0
    assert codes.count(grpc.StatusCode.OK) > 0
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    full = next(o for o in outcomes if isinstance(o, grpc.aio.AioRpcError))
    assert "queue" in full.details().lower()
    await narrow.assert_serving()


# -- a large result ------------------------------------------------------------------------------


async def test_longest_protein_hidden_states_above_4mb():
    model = seeded_model(d_model=256, n_heads=4, n_layers=3, seed=1)
    async with running_server(
        model,
        server_config(
            max_wait_ms=0, max_message_bytes=64 * 1024 * 1024, settings=dict(max_length=2046)
        ),
    ) as big:
        sequence = random_sequence(np.random.default_rng(2046), 2046)
        response = await big.stub.Logits(
            protein_request(sequence, return_hidden_states=True), timeout=120
        )
        assert tuple(response.hidden_states.shape) == (3, 2048, 256)
        assert response.ByteSize() > 4 * 1024 * 1024
        expected = reference(model, tokens_of(sequence), return_hidden_states=True)
        assert np.array_equal(to_numpy(response.hidden_states), expected.hidden_states.numpy())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await big.stub.Logits(
                protein_request(sequence + "A", return_hidden_states=True), timeout=60
            )
        assert error.value.code() == INVALID and "limit is 2046" in error.value.details()
        await big.assert_serving()


async def test_padded_batches_match_within_tolerance(model):
    config = server_config(max_wait_ms=50, packed=False)
    async with running_server(model, config) as padded:
        rng = np.random.default_rng(8)
        sequences = [random_sequence(rng, int(n)) for n in rng.integers(5, 200, size=12)]
        before = padded.scrape()
        responses = await asyncio.gather(
            *(padded.stub.Logits(protein_request(s, sequence=True)) for s in sequences)
        )
        after = padded.scrape()
        for sequence, response in zip(sequences, responses):
            expected = reference(model, tokens_of(sequence), sequence=True).logits.sequence.numpy()
            assert np.allclose(to_numpy(response.logits.sequence), expected, rtol=1e-4, atol=1e-5)
        batched = [r.metadata for r in responses if r.metadata.batch_size > 1]
        assert batched and all(m.batch_tokens % m.batch_size == 0 for m in batched)  # rectangles
        key = ("esmc_batch_padding_efficiency_sum", ()), ("esmc_batch_padding_efficiency_count", ())
        efficiency = (after[key[0]] - before[key[0]]) / (after[key[1]] - before[key[1]])
        assert 0 < efficiency < 1


class GatedEngine(Engine):
    """A real engine whose warm-up waits for a gate: the server is up but not yet ready."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()

    async def warmup(self) -> None:
        await self.gate.wait()
        await super().warmup()


async def test_health_not_serving_until_warm(model):
    port = free_port()
    config = dataclasses.replace(server_config(), port=port, metrics_port=None)
    engine = GatedEngine(model, config.batching)
    starting = asyncio.ensure_future(create_server(config, engine=engine))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        await channel.channel_ready()
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="esmc.v1.ESMC"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await pb_grpc.ESMCStub(channel).Logits(
                protein_request("MKT", sequence=True), timeout=10
            )
        assert (
            error.value.code() == grpc.StatusCode.UNAVAILABLE
            and "not ready" in error.value.details()
        )
        engine.gate.set()
        server, bound = await starting
        assert bound == port
        status = await health.Check(
            health_pb2.HealthCheckRequest(service="esmc.v1.ESMC"), timeout=10
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        await server.stop(1.0)
    finally:
        engine.gate.set()
        await channel.close()


# -- metrics -------------------------------------------------------------------------------------


async def test_metrics_endpoint(srv):
    before = srv.scrape()
    await asyncio.gather(
        *(srv.stub.Logits(protein_request("MKTAYIAKQ" * (i + 1), sequence=True)) for i in range(8))
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await srv.stub.Logits(protein_request("MK1", sequence=True))
    after = srv.scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("esmc_requests_total", method="Logits", code="OK") == 8
    assert delta("esmc_errors_total", method="Logits", code="INVALID_ARGUMENT") == 1
    assert delta("esmc_request_latency_seconds_count", method="Logits") == 9
    assert 1 <= delta("esmc_forwards_total") <= 8
    assert delta("esmc_sequences_total") == 8
    assert delta("esmc_batch_size_sequences_sum") == 8
    assert delta("esmc_batch_size_tokens_sum") == sum(9 * (i + 1) + 2 for i in range(8))
    efficiency = delta("esmc_batch_padding_efficiency_sum") / delta(
        "esmc_batch_padding_efficiency_count"
    )
    assert efficiency == pytest.approx(1.0)  # packed: no padding
    assert delta("esmc_queue_time_seconds_count") == 8
    assert delta("esmc_compute_time_seconds_count") == delta("esmc_forwards_total")
    assert delta("esmc_compute_time_seconds_sum") > 0
    assert after[("esmc_queue_depth", ())] == 0
    assert after[("esmc_active_generations", ())] == 0
    assert ("esmc_generation_steps_total", ()) in after
    assert ("esmc_generation_steps_per_forward_count", ()) in after


# -- graceful shutdown of `esmc serve` -----------------------------------------------------------


async def test_sigterm_finishes_calls_in_flight_and_refuses_new_ones(tmp_path):
    weights = tmp_path / "model.safetensors"
    save_safetensors(seeded_model(d_model=64, n_heads=2, n_layers=2, seed=5), weights)
    log_path = tmp_path / "serve.log"
    command = [
        sys.executable,
        "-m",
        "esmc_server.cli",
        "serve",
        "--model",
        str(weights),
        "--port",
        "0",
        "--metrics-port",
        "off",
        "--device",
        "cpu",
        "--max-wait-ms",
        "1500",
        "--grace-s",
        "30",
        "--drain-delay-s",
        "0",
    ]
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=log, env={**os.environ}
        )
    try:
        port = await serving_port(log_path, process)
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=channel_options(64 * 1024 * 1024)
        )
        stub = pb_grpc.ESMCStub(channel)
        await stub.Info(pb.InfoRequest(), timeout=30)
        in_flight = [
            asyncio.ensure_future(
                stub.Logits(protein_request("MKTAYIAKQ" * (i + 1), sequence=True), timeout=60)
            )
            for i in range(6)
        ]
        await asyncio.sleep(0.5)  # they wait in the queue for company (max_wait 1.5 s)
        assert not any(call.done() for call in in_flight)
        process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Logits(protein_request("MKT", sequence=True), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        responses = await asyncio.gather(*in_flight)
        for i, response in enumerate(responses):
            assert tuple(response.logits.sequence.shape) == (9 * (i + 1) + 2, 64)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        await channel.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "shutting down" in log_path.read_text()

