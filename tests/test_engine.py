"""The engine on a tiny random ESMC: batched outputs equal single runs, and the scheduling
rules (sharing, cancellation, deadlines, full queue, shutdown, OOM split, generations)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from helpers.models import random_model, random_sequences, rel_err

from esmc import ESMCConfig
from esmc.generation import forward_and_sample, generate
from esmc.inference import run_logits
from esmc.tokenizer import MASK_ID, encode
from esmc.types import (
    GenerationConfig,
    LogitsConfig,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc_server.config import BatchingConfig
from esmc_server.engine import Engine, EngineObserver
from esmc_server.errors import (
    DeadlineExceeded,
    InternalError,
    InvalidRequest,
    QueueFull,
    SequenceTooLargeForDevice,
    Unavailable,
)

pytestmark = pytest.mark.model

CONFIG = ESMCConfig(d_model=64, n_heads=1, n_layers=2, name="engine-test")
FOREVER_MS = 600_000.0  # a wait bound no test reaches: batches are cut by size or shutdown
FULL = LogitsConfig(
    sequence=True,
    return_embeddings=True,
    return_hidden_states=True,
    return_mean_embedding=True,
    return_mean_hidden_states=True,
)


class Recorder(EngineObserver):
    """Records every pass; when ``hold`` is set the device thread waits at the end of each
    pass until the test opens ``go`` (the engine's own observer hook used as a gate)."""

    def __init__(self, hold: bool = False):
        self.batches: list[tuple[int, int, int]] = []  # (sequences, tokens, generation steps)
        self.hooks: list[tuple[str, int]] = []  # ("depth", waiting) / ("batch", sequences)
        self.go = threading.Event()
        if not hold:
            self.go.set()

    def on_batch(self, sequences, tokens, real_tokens, queue_ms_list, compute_ms, generation_steps):
        self.batches.append((sequences, tokens, generation_steps))
        self.hooks.append(("batch", sequences))

    def on_queue_depth(self, n):
        if threading.current_thread().name == "esmc-device":  # scheduled, not submitted
            self.hooks.append(("depth", n))

    def on_active_generations(self, n):
        self.go.wait()


@pytest.fixture(scope="module")
def model():
    return random_model(CONFIG, seed=1)


@pytest.fixture
async def make_engine(model):
    engines = []

    async def make(engine_model=None, observer=None, **limits) -> Engine:
        engine = Engine(engine_model or model, BatchingConfig(**limits), observer)
        await engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        observer = engine._device.observer.inner
        if isinstance(observer, Recorder):
            observer.go.set()
        await engine.stop(grace_s=30.0)


def assert_same(actual, expected) -> None:
    """Every tensor field of two LogitsOutputs equal within relative error 1e-5."""
    pairs = [
        (actual.logits.sequence, expected.logits.sequence),
        (actual.embeddings, expected.embeddings),
        (actual.hidden_states, expected.hidden_states),
        (actual.mean_embedding, expected.mean_embedding),
        (actual.mean_hidden_states, expected.mean_hidden_states),
    ]
    for got, want in pairs:
        assert (got is None) == (want is None)
        if want is not None:
            assert got.dtype == torch.float32 and got.shape == want.shape
            assert rel_err(got, want) <= 1e-5


def masked(sequence: str, every: int) -> torch.Tensor:
    tokens = encode(sequence)
    tokens[1:-1:every] = MASK_ID
    return tokens


async def started(call):
    """Run ``call`` as a task and let it reach the engine's queue."""
    task = asyncio.create_task(call)
    await asyncio.sleep(0)
    return task


# -- logits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False])
async def test_mixed_configs_share_one_forward_and_equal_single_runs(model, make_engine, packed):
    recorder = Recorder()
    configs = [
        FULL,
        LogitsConfig(sequence=True),
        LogitsConfig(return_hidden_states=True, ith_hidden_layer=0),
        LogitsConfig(return_mean_hidden_states=True, ith_hidden_layer=-1),
        LogitsConfig(return_embeddings=True, return_hidden_states=True, ith_hidden_layer=1),
    ]
    sequences = random_sequences([31, 7, 50, 18, 3], seed=2)
    engine = await make_engine(
        observer=recorder, max_batch_size=5, max_wait_ms=FOREVER_MS, packed=packed
    )
    results = await asyncio.gather(
        *[engine.logits(encode(s), c) for s, c in zip(sequences, configs)]
    )
    assert engine.stats.forwards == 1
    assert recorder.batches == [(5, 33 + 9 + 52 + 20 + 5 if packed else 5 * 52, 0)]
    for sequence, config, result in zip(sequences, configs, results):
        alone = run_logits(model, [encode(sequence)], [config])[0]
        assert_same(result.output, alone)
        assert result.timing.batch_size == 5 and result.timing.forwards == 1


async def test_64_concurrent_calls_ride_in_few_forwards(model, make_engine):
    recorder = Recorder()
    engine = await make_engine(observer=recorder, max_batch_size=16, max_wait_ms=FOREVER_MS)
    lengths = [5 + (i * 7) % 40 for i in range(64)]
    sequences = random_sequences(lengths, seed=3)
    config = LogitsConfig(sequence=True, return_mean_embedding=True)
    results = await asyncio.gather(*[engine.logits(encode(s), config) for s in sequences])
    assert engine.stats.sequences == 64 and engine.stats.forwards == 4
    assert [b[0] for b in recorder.batches] == [16, 16, 16, 16]
    assert engine.stats.tokens == sum(lengths) + 2 * 64  # packed: no padding paid
    assert all(r.timing.batch_size == 16 for r in results)
    for i in (0, 17, 63):
        alone = run_logits(model, [encode(sequences[i])], [config])[0]
        assert_same(results[i].output, alone)


async def test_next_batch_is_collated_while_the_current_forward_runs(make_engine):
    """On the device thread the depth hook fires when a batch is scheduled: the (E, F) batch
    is scheduled and collated during the (C, D) forward, before that pass hands back."""
    recorder = Recorder(hold=True)
    engine = await make_engine(observer=recorder, max_batch_size=2, max_wait_ms=FOREVER_MS)
    config = LogitsConfig(sequence=True)
    tokens = [encode(s) for s in random_sequences([9, 14, 4, 30, 21, 6], seed=9)]
    await asyncio.gather(engine.logits(tokens[0], config), engine.logits(tokens[1], config))
    later = [await started(engine.logits(t, config)) for t in tokens[2:]]  # device thread held
    recorder.go.set()
    await asyncio.gather(*later)
    assert recorder.hooks == [
        ("depth", 0), ("batch", 2),  # A, B
        ("depth", 2), ("depth", 0), ("batch", 2),  # C, D scheduled; E, F looked ahead
        ("batch", 2),  # E, F
    ]


async def test_cancelled_request_never_reaches_a_forward(model, make_engine):
    recorder = Recorder()
    engine = await make_engine(observer=recorder, max_batch_size=2, max_wait_ms=FOREVER_MS)
    a, b, c = (encode(s) for s in random_sequences([12, 20, 9], seed=4))
    doomed = await started(engine.logits(a, LogitsConfig(sequence=True)))
    doomed.cancel()
    (outcome,) = await asyncio.gather(doomed, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError)
    rb, rc = await asyncio.gather(
        engine.logits(b, LogitsConfig(sequence=True)), engine.logits(c, LogitsConfig(sequence=True))
    )
    assert recorder.batches == [(2, 22 + 11, 0)]  # only b and c were forwarded
    assert engine.stats.dropped == 1
    assert rb.output.logits.sequence.shape == (22, 64)


async def test_deadline_passed_gives_deadline_exceeded_without_a_forward(make_engine):
    engine = await make_engine(max_batch_size=2, max_wait_ms=FOREVER_MS)
    tokens = encode("MKTAYIAK")
    with pytest.raises(DeadlineExceeded):
        await engine.logits(tokens, LogitsConfig(sequence=True), deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        await engine.logits(tokens, LogitsConfig(sequence=True), deadline=time.monotonic() + 0.05)
    stream = engine.generate(masked("MKTAYIAK", 2), GenerationConfig(num_steps=2), 0,
                             deadline=time.monotonic() + 0.05)
    with pytest.raises(DeadlineExceeded):
        async for _ in stream:
            pass
    assert engine.stats.forwards == 0


async def test_full_queue_raises_queue_full_at_once(make_engine):
    engine = await make_engine(max_queue=2, max_wait_ms=FOREVER_MS)
    config = LogitsConfig(sequence=True)
    waiting = [await started(engine.logits(encode("MKTAYIAK"), config)) for _ in range(2)]
    with pytest.raises(QueueFull):
        await engine.logits(encode("MKT"), config)
    with pytest.raises(QueueFull):
        engine.generate(masked("MKTAYIAK", 2), GenerationConfig(num_steps=2), 0)
    await engine.stop(grace_s=30.0)  # shutdown runs the two that waited
    assert [t.result().output.logits.sequence.shape for t in waiting] == [(10, 64), (10, 64)]


async def test_invalid_layer_and_configs_raise_invalid_request_before_queueing(make_engine):
    engine = await make_engine()
    with pytest.raises(InvalidRequest, match="ith_hidden_layer=5"):
        bad_layer = LogitsConfig(return_hidden_states=True, ith_hidden_layer=5)
        await engine.logits(encode("MKT"), bad_layer)
    with pytest.raises(InvalidRequest, match="no masks"):
        engine.generate(encode("MKT"), GenerationConfig(num_steps=2), 0)
    with pytest.raises(InvalidRequest, match="num_steps"):
        engine.generate(masked("MKTAYIAK", 2), GenerationConfig(num_steps=0), 0)
    with pytest.raises(InvalidRequest, match="top_p"):
        bad = SamplingConfig(sequence=SamplingTrackConfig(top_p=1.5))
        await engine.forward_and_sample(encode("MKT"), bad, 0)
    assert engine.stats.forwards == 0 and engine.stats.queue_depth == 0


async def test_stop_finishes_in_flight_work_then_refuses(model, make_engine):
    engine = await make_engine(max_wait_ms=FOREVER_MS)
    sequences = random_sequences([15, 33, 8], seed=5)
    calls = [await started(engine.logits(encode(s), FULL)) for s in sequences]
    prompt = masked("MKTAYIAKQRQISFVKSHFSRQ", 3)
    stream = engine.generate(prompt, GenerationConfig(num_steps=3), 11)
    events = await started(_collect(stream))
    await engine.stop(grace_s=60.0)
    for sequence, call in zip(sequences, calls):
        assert_same(call.result().output, run_logits(model, [encode(sequence)], [FULL])[0])
    steps = events.result()
    assert len(steps) == 3 and steps[-1].final
    alone = generate(model, prompt, GenerationConfig(num_steps=3), 11).sequence
    assert steps[-1].step.sequence_tokens == tuple(alone.tolist())
    with pytest.raises(Unavailable):
        await engine.logits(encode("MKT"), FULL)


async def test_a_bad_input_fails_alone(model, make_engine):
    """Token id 64 is outside the embedding table (64 rows): the forward fails, bisection
    finds the request, its batch-mates get their outputs."""
    engine = await make_engine(max_batch_size=4, max_wait_ms=FOREVER_MS)
    good = [encode(s) for s in random_sequences([10, 20, 30], seed=6)]
    poison = encode("MKTAYIAK")
    poison[3] = 64
    results = await asyncio.gather(
        engine.logits(good[0], FULL), engine.logits(poison, FULL),
        engine.logits(good[1], FULL), engine.logits(good[2], FULL),
        return_exceptions=True,
    )
    assert isinstance(results[1], InternalError) and results[1].code == "INTERNAL"
    assert str(results[1]) == (
        "internal error while running the forward; the server logged the details"
    )
    for tokens, result in zip(good, [results[0], results[2], results[3]]):
        assert_same(result.output, run_logits(model, [tokens], [FULL])[0])


async def test_out_of_memory_splits_the_batch_and_a_lone_oversize_sequence_fails(make_engine):
    """The device limit is a test double (the only one here): the real tiny model's packed
    forward is wrapped to raise torch.OutOfMemoryError for more than 2 sequences or more
    than 40 tokens in one forward, as a GPU would for a batch too big for its memory."""
    model = random_model(CONFIG, seed=1)
    real_forward = model.forward_packed

    def limited_forward(tokens, cu_seqlens, max_seqlen, hidden_layers=(), **kwargs):
        if cu_seqlens.numel() - 1 > 2 or tokens.numel() > 40:
            raise torch.OutOfMemoryError("test double: CUDA out of memory")
        return real_forward(tokens, cu_seqlens, max_seqlen, hidden_layers=hidden_layers, **kwargs)

    model.forward_packed = limited_forward
    engine = await make_engine(engine_model=model, max_batch_size=6, max_wait_ms=FOREVER_MS)
    sequences = random_sequences([5, 9, 12, 50, 7, 3], seed=7)
    results = await asyncio.gather(
        *[engine.logits(encode(s), FULL) for s in sequences], return_exceptions=True
    )
    assert isinstance(results[3], SequenceTooLargeForDevice)  # 52 tokens do not fit even alone
    assert results[3].code == "INVALID_ARGUMENT" and "52 tokens" in str(results[3])
    for i in (0, 1, 2, 4, 5):
        alone = run_logits(model, [encode(sequences[i])], [FULL])[0]
        assert_same(results[i].output, alone)
        assert results[i].timing.forwards > 1 and results[i].timing.batch_size <= 2
    assert engine.stats.oom_splits >= 2


# -- sampling and generation -------------------------------------------------------------------


async def _collect(stream):
    return [event async for event in stream]


async def test_forward_and_sample_equals_the_library(model, make_engine):
    engine = await make_engine(max_batch_size=2, max_wait_ms=FOREVER_MS)
    prompt = masked("MKTAYIAKQRQISFVKSHFSRQ", 2)
    sampling = SamplingConfig(
        sequence=SamplingTrackConfig(temperature=0.7, topk_logprobs=3), return_mean_embedding=True
    )
    (sampled, timing), other = await asyncio.gather(
        engine.forward_and_sample(prompt, sampling, 5),
        engine.logits(encode("MKTAYIAK"), FULL),
    )
    expected = forward_and_sample(model, prompt, sampling, 5)
    assert timing.batch_size == 2
    assert torch.equal(sampled.protein_tensor.sequence, expected.protein_tensor.sequence)
    assert rel_err(sampled.entropy.sequence, expected.entropy.sequence) <= 1e-5
    assert torch.equal(sampled.topk_tokens.sequence, expected.topk_tokens.sequence)
    assert rel_err(sampled.mean_embedding, expected.mean_embedding) <= 1e-5


def generation_cases(n: int):
    """(prompt tokens, config, seed): different lengths, masks, step counts and strategies."""
    lengths = [12 + (i * 11) % 50 for i in range(n)]
    cases = []
    for i, sequence in enumerate(random_sequences(lengths, seed=8)):
        config = GenerationConfig(
            track="sequence",
            num_steps=2 + i % 7,
            strategy="entropy" if i % 3 == 0 else "random",
            temperature=0.0 if i % 5 == 0 else 1.0,
        )
        cases.append((masked(sequence, 2 + i % 3), config, 100 + i))
    return cases


async def test_16_concurrent_generations_equal_runs_alone_in_few_forwards(model, make_engine):
    recorder = Recorder()
    engine = await make_engine(observer=recorder, max_batch_size=16, max_wait_ms=FOREVER_MS)
    cases = generation_cases(16)
    streams = [engine.generate(tokens, config, seed) for tokens, config, seed in cases]
    runs = await asyncio.gather(*[_collect(s) for s in streams])
    steps = []
    for (tokens, config, seed), events in zip(cases, runs):
        n = min(config.num_steps, int((tokens == MASK_ID).sum()))
        assert len(events) == n and events[-1].final and not any(e.final for e in events[:-1])
        assert [e.step.step for e in events] == list(range(n))
        alone = generate(model, tokens, config, seed).sequence
        assert events[-1].step.sequence_tokens == tuple(alone.tolist())
        unmasked = tokens != MASK_ID
        for event in events:
            assert torch.equal(torch.tensor(event.step.sequence_tokens)[unmasked], tokens[unmasked])
        steps.append(n)
    await engine.stop(grace_s=30.0)  # the device thread has finished its last pass
    # every active generation rides in every forward and leaves when done
    assert engine.stats.forwards == max(steps)
    still_active = [sum(n > k for n in steps) for k in range(max(steps))]
    assert [b[2] for b in recorder.batches] == still_active
    assert engine.stats.generation_steps == sum(steps) > 4 * engine.stats.forwards
    assert engine.stats.steps_per_generation_forward == sum(steps) / max(steps)
    assert engine.stats.active_generations == 0


async def test_generations_share_forwards_with_logits_work(make_engine):
    recorder = Recorder()
    engine = await make_engine(observer=recorder, max_batch_size=2, max_wait_ms=FOREVER_MS)
    (tokens, config, seed), = generation_cases(1)
    config.num_steps = 3
    stream = engine.generate(tokens, config, seed)
    logits, events = await asyncio.gather(
        engine.logits(encode("MKTAYIAK"), LogitsConfig(sequence=True)), _collect(stream)
    )
    assert len(events) == 3 and logits.timing.batch_size == 2
    assert recorder.batches[0] == (2, len(tokens) + 10, 1)  # step 0 rode with the logits call
    assert [b[2] for b in recorder.batches[1:]] == [1, 1]  # later steps did not wait for company


async def test_closing_one_generation_leaves_the_others_correct(model, make_engine):
    recorder = Recorder(hold=True)
    engine = await make_engine(observer=recorder, max_batch_size=4, max_wait_ms=FOREVER_MS)
    cases = generation_cases(4)
    for _, config, _ in cases:
        config.num_steps = 3
    streams = [engine.generate(tokens, config, seed) for tokens, config, seed in cases]
    first = await streams[1].__anext__()  # the device thread now waits after pass 0
    await streams[1].aclose()
    recorder.go.set()
    with pytest.raises(StopAsyncIteration):
        await streams[1].__anext__()
    others = await asyncio.gather(*[_collect(streams[i]) for i in (0, 2, 3)])
    for (tokens, config, seed), events in zip([cases[0], cases[2], cases[3]], others):
        alone = generate(model, tokens, config, seed).sequence
        assert events[-1].step.sequence_tokens == tuple(alone.tolist())
    await engine.stop(grace_s=30.0)
    assert first.step.step == 0
    assert [b[2] for b in recorder.batches] == [4, 3, 3]  # the closed one left after step 0
    assert engine.stats.dropped == 1 and engine.stats.active_generations == 0


async def test_cancelling_the_reader_stops_its_generation(make_engine):
    recorder = Recorder(hold=True)
    engine = await make_engine(observer=recorder, max_batch_size=1, max_wait_ms=FOREVER_MS)
    (tokens, config, seed), = generation_cases(1)
    config.num_steps = 3
    stream = engine.generate(tokens, config, seed)
    await stream.__anext__()  # step 0 done; the device thread waits after that pass
    reader = asyncio.create_task(_collect(stream))
    await asyncio.sleep(0)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    recorder.go.set()
    other = await engine.logits(encode("MKT"), LogitsConfig(sequence=True))
    assert other.timing.batch_size == 1
    await engine.stop(grace_s=30.0)
    assert engine.stats.generation_steps == 1 and engine.stats.dropped == 1
    assert engine.stats.active_generations == 0


# -- backpressure: generations nobody reads ----------------------------------------------------


async def _settled(engine, predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("window", [1, 2])
async def test_unread_generations_stop_after_their_window(make_engine, window):
    """20 streams of 30 steps that nobody reads cost ``window`` steps each, not 600; a fresh
    logits call then rides alone; reading one event computes exactly one more step."""
    engine = await make_engine(max_batch_size=64, max_wait_ms=0, generation_window=window)
    prompt = masked("MKTAYIAKQRQISFVKSHFSRQISFVKSHFSRQISFVKSHFSRQISFVKSHFSRQ", 1)
    streams = [engine.generate(prompt, GenerationConfig(num_steps=30), i) for i in range(20)]
    await _settled(engine, lambda: engine.stats.generation_steps == 20 * window)
    await asyncio.sleep(0.2)  # nothing more is computed
    assert engine.stats.generation_steps == 20 * window
    assert engine.stats.active_generations == 20
    other = await engine.logits(encode("MKTAYIAK"), LogitsConfig(sequence=True))
    assert other.timing.batch_size == 1  # no generation step rode with it
    first = await streams[0].__anext__()
    assert first.step.step == 0
    await _settled(engine, lambda: engine.stats.generation_steps == 20 * window + 1)
    await asyncio.sleep(0.1)
    assert engine.stats.generation_steps == 20 * window + 1
    for stream in streams:
        await stream.aclose()
    await _settled(engine, lambda: engine.stats.active_generations == 0)


async def test_a_read_generation_equals_its_run_alone_with_window_1(model, make_engine):
    engine = await make_engine(max_wait_ms=0, generation_window=1)
    cases = generation_cases(3)
    streams = [engine.generate(tokens, config, seed) for tokens, config, seed in cases]
    runs = await asyncio.gather(*[_collect(s) for s in streams])
    for (tokens, config, seed), events in zip(cases, runs):
        alone = generate(model, tokens, config, seed).sequence
        assert events[-1].final and events[-1].step.sequence_tokens == tuple(alone.tolist())


async def test_finished_unread_streams_count_against_max_queue(make_engine):
    engine = await make_engine(max_queue=3, max_wait_ms=0)
    prompt = masked("MKTAYIAKQR", 3)
    streams = [engine.generate(prompt, GenerationConfig(num_steps=1), i) for i in range(3)]
    await _settled(engine, lambda: engine.stats.generation_steps == 3)
    await asyncio.sleep(0.1)
    assert engine.stats.active_generations == 3  # finished, but the final event is unread
    with pytest.raises(QueueFull):
        await engine.logits(encode("MKT"), LogitsConfig(sequence=True))
    final = await streams[0].__anext__()  # its last event: the slot is free
    assert final.final
    await _settled(engine, lambda: engine.stats.active_generations == 2)
    await engine.logits(encode("MKT"), LogitsConfig(sequence=True))
    await streams[1].aclose()  # closing an unread stream frees its slot too
    await _settled(engine, lambda: engine.stats.active_generations == 1)
    await asyncio.gather(*[engine.logits(encode("MKT"), LogitsConfig(sequence=True)) for _ in "ab"])
