"""esmc_client and the esmc CLI against a real server on port 0 with a tiny random model.

The server runs on its own event-loop thread, so the blocking client, the asyncio client
(on pytest's loop) and CLI subprocesses all talk to it over real channels. Values are
compared with the same model run in-process (esmc.inference / esmc.generation).
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from esmc import tokenizer
from esmc.config import ESMCConfig
from esmc.generation import forward_and_sample as local_forward_and_sample
from esmc.generation import generate as local_generate
from esmc.inference import run_logits
from esmc import ESMC
from esmc.types import ESMProtein as LocalProtein
from esmc.types import GenerationConfig as LocalGenerationConfig
from esmc.types import LogitsConfig as LocalLogitsConfig
from esmc.types import SamplingConfig as LocalSamplingConfig
from esmc.types import SamplingTrackConfig as LocalSamplingTrackConfig
from esmc_client import (
    AsyncESMCClient,
    ESMCClient,
    ESMCError,
    ESMProtein,
    GenerationConfig,
    LogitsConfig,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc_client.cli import main as cli_main
from esmc_server.app import create_server
from esmc_server.config import BatchingConfig, ServerConfig

pytestmark = pytest.mark.e2e

RTOL = 1e-5  # sequences batched with others: packed-forward invariance bound (float32)
ATOL = 1e-6
PROMPT = "MKT___LL__"


@dataclasses.dataclass
class Served:
    model: ESMC
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def served():
    torch.manual_seed(0)
    model = ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)).eval()
    config = ServerConfig(
        port=0, metrics_port=None, warmup=False, batching=BatchingConfig(max_wait_ms=2.0)
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="esmc-test-server", daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(create_server(config, model=model), loop).result(120)
    yield Served(model, port)
    asyncio.run_coroutine_threadsafe(server.stop(5), loop).result(60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


def local_logits(model: ESMC, sequence: str, config: LocalLogitsConfig):
    return run_logits(model, [tokenizer.encode(sequence)], [config])[0]


def random_sequences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("ACDEFGHIKLMNPQRSTVWY")
    return ["".join(rng.choice(alphabet, size=int(rng.integers(5, 40)))) for _ in range(n)]


FULL = dict(
    sequence=True,
    return_embeddings=True,
    return_hidden_states=True,
    return_mean_embedding=True,
    return_mean_hidden_states=True,
)


def assert_logits_equal(out, ref, rtol=0.0, atol=0.0):
    pairs = [
        (out.logits.sequence, ref.logits.sequence),
        (out.embeddings, ref.embeddings),
        (out.hidden_states, ref.hidden_states),
        (out.mean_embedding, ref.mean_embedding),
        (out.mean_hidden_states, ref.mean_hidden_states),
    ]
    for got, want in pairs:
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=rtol, atol=atol)


# --- unary calls --------------------------------------------------------------------------


def test_info_encode_decode(served):
    with ESMCClient(served.target) as client:
        info = client.info(timeout=30)
        assert (info.d_model, info.n_heads, info.n_layers) == (64, 1, 2)
        assert info.vocabulary == tokenizer.VOCABULARY and info.logits_width == 64
        assert info.max_message_bytes == 64 * 1024 * 1024
        ids = client.encode("MKT_L", timeout=30)
        np.testing.assert_array_equal(ids, tokenizer.encode_ids("MKT_L"))
        assert client.decode(ids, timeout=30) == ESMProtein("MKT_L")


def test_sync_logits_equal_the_in_process_model(served):
    sequence = "MKTAYIAKQRQISFVKSHFSRQ"
    with ESMCClient(served.target) as client:
        out = client.logits(sequence, LogitsConfig(**FULL), timeout=60)
        by_tokens = client.logits(tokenizer.encode_ids(sequence), LogitsConfig(sequence=True))
        one_layer = client.logits(sequence, LogitsConfig(return_hidden_states=True, ith_hidden_layer=0))
    ref = local_logits(served.model, sequence, LocalLogitsConfig(**FULL))
    assert_logits_equal(out, ref)  # alone in its forward: the same numbers
    assert out.logits.sequence.shape == (len(sequence) + 2, 64)
    assert out.hidden_layers == (0, 1) and out.metadata.batch_size >= 1
    np.testing.assert_array_equal(by_tokens.logits.sequence, out.logits.sequence)
    assert one_layer.hidden_layers == (0,) and one_layer.logits.sequence is None
    np.testing.assert_array_equal(one_layer.hidden_states, out.hidden_states[:1])


def test_reference_config_objects_work_as_configs(served):
    with ESMCClient(served.target) as client:
        out = client.logits(LocalProtein(sequence="MKV"), LocalLogitsConfig(return_mean_embedding=True))
    ref = local_logits(served.model, "MKV", LocalLogitsConfig(return_mean_embedding=True))
    np.testing.assert_array_equal(out.mean_embedding, ref.mean_embedding.numpy())


def test_bfloat16_and_float16_outputs_within_rounding(served):
    sequence = "MKTAYIAKQRQISFV"
    ref = local_logits(served.model, sequence, LocalLogitsConfig(sequence=True)).logits.sequence.numpy()
    with ESMCClient(served.target) as client:
        bf16 = client.logits(sequence, output_dtype="bfloat16").logits.sequence
        fp16 = client.logits(sequence, output_dtype="float16").logits.sequence
    assert bf16.dtype == np.float32 and fp16.dtype == np.float16
    np.testing.assert_allclose(bf16, ref, rtol=2**-8, atol=1e-30)
    np.testing.assert_allclose(fp16.astype(np.float32), ref, rtol=2**-11, atol=1e-4)


def test_bad_input_raises_invalid_argument(served):
    with ESMCClient(served.target) as client:
        with pytest.raises(ESMCError) as error:
            client.logits("MKJT")
        assert error.value.code == "INVALID_ARGUMENT" and "J" in error.value.message
        with pytest.raises(ESMCError) as error:
            client.logits("MKT", LogitsConfig(return_hidden_states=True, ith_hidden_layer=5))
        assert error.value.code == "INVALID_ARGUMENT"


def test_dns_target_with_round_robin(served):
    with ESMCClient(f"dns:///127.0.0.1:{served.port}") as client:
        assert client.info(timeout=30).d_model == 64


async def test_async_logits_equal_the_in_process_model(served):
    sequences = random_sequences(8, seed=1)
    async with AsyncESMCClient(served.target) as client:
        single = await client.logits(sequences[0], LogitsConfig(**FULL), timeout=60)
        outs = await asyncio.gather(
            *(client.logits(s, LogitsConfig(**FULL), timeout=60) for s in sequences)
        )
        info = await client.info()
    assert info.n_layers == 2
    assert_logits_equal(single, local_logits(served.model, sequences[0], LocalLogitsConfig(**FULL)))
    for sequence, out in zip(sequences, outs):  # concurrent: batched with each other
        ref = local_logits(served.model, sequence, LocalLogitsConfig(**FULL))
        assert_logits_equal(out, ref, rtol=RTOL, atol=ATOL)


def test_forward_and_sample_equals_the_in_process_sampler(served):
    track = SamplingTrackConfig(temperature=0.7, topk_logprobs=2)
    with ESMCClient(served.target) as client:
        out = client.forward_and_sample(PROMPT, SamplingConfig(sequence=track), seed=11)
    local_config = LocalSamplingConfig(sequence=LocalSamplingTrackConfig(temperature=0.7, topk_logprobs=2))
    ref = local_forward_and_sample(served.model, LocalProtein(sequence=PROMPT), local_config, seed=11)
    np.testing.assert_array_equal(out.protein_tensor, ref.protein_tensor.sequence.numpy())
    np.testing.assert_allclose(out.entropy, ref.entropy.sequence.numpy(), rtol=RTOL, atol=ATOL)
    assert out.topk_tokens.shape == (len(PROMPT) + 2, 2)


# --- bulk embed ---------------------------------------------------------------------------


def _embed_inputs():
    sequences = random_sequences(20, seed=2)
    sequences[10] = "MKTJAYIAK"  # J is not in the alphabet
    return [(f"p{i}", s) for i, s in enumerate(sequences)]


def _check_embed(served, items, results, layer):
    assert [r.id for r in results] == [uid for uid, _ in items]
    bad = results[10]
    assert not bad.ok and bad.embedding is None
    assert bad.error.code == "INVALID_ARGUMENT" and "J" in bad.error.message and bad.attempts == 1
    if layer == -1:
        config = LocalLogitsConfig(return_mean_embedding=True)
    else:
        config = LocalLogitsConfig(return_mean_hidden_states=True, ith_hidden_layer=layer)
    for (uid, sequence), result in zip(items, results):
        if uid == "p10":
            continue
        assert result.ok, result.error
        ref = local_logits(served.model, sequence, config)
        want = ref.mean_embedding if layer == -1 else ref.mean_hidden_states[0]
        np.testing.assert_allclose(result.embedding, want.numpy(), rtol=RTOL, atol=ATOL)


def test_sync_embed_reports_the_bad_sequence_and_embeds_the_rest(served):
    items = _embed_inputs()
    with ESMCClient(served.target) as client:
        results = client.embed(items, batch_size=7, concurrency=3, max_in_flight=4, timeout=120)
        per_position = client.embed(items[:2], pool="none")
    _check_embed(served, items, results, layer=-1)
    ref = local_logits(served.model, items[0][1], LocalLogitsConfig(return_embeddings=True))
    np.testing.assert_allclose(per_position[0].embedding, ref.embeddings.numpy(), rtol=RTOL, atol=ATOL)


async def test_async_embed_of_a_middle_layer(served):
    items = _embed_inputs()
    async with AsyncESMCClient(served.target) as client:
        results = await client.embed(dict(items), layer=0, batch_size=20, max_in_flight=5)
    _check_embed(served, items, results, layer=0)


# --- generation ---------------------------------------------------------------------------

GEN = GenerationConfig(num_steps=3, strategy="entropy", temperature=0.8)
LOCAL_GEN = LocalGenerationConfig(num_steps=3, strategy="entropy", temperature=0.8)


def _check_stream(steps, expected: str):
    assert len(steps) == 4
    assert [s.step for s in steps] == [1, 2, 3, None] and all(s.num_steps == 3 for s in steps)
    assert [s.final for s in steps] == [False, False, False, True]
    filled = set()
    for step in steps[:3]:
        assert len(step.sequence) == len(PROMPT)
        for i, char in enumerate(PROMPT):  # unmasked positions never change
            if char != "_":
                assert step.sequence[i] == char
        assert all(PROMPT[p] == "_" for p in step.positions)
        filled |= set(step.positions)
        for p, token in zip(step.positions, step.tokens):
            assert step.sequence[p] == tokenizer.VOCABULARY[token]
    assert filled == {i for i, c in enumerate(PROMPT) if c == "_"}
    assert "_" not in steps[2].sequence
    assert steps[3].protein.sequence == expected == steps[2].sequence
    np.testing.assert_array_equal(steps[3].protein_tensor, tokenizer.encode_ids(expected))


def test_sync_generate_stream_and_generate(served):
    expected = local_generate(served.model, LocalProtein(sequence=PROMPT), LOCAL_GEN, seed=5).sequence
    with ESMCClient(served.target) as client:
        steps = list(client.generate_stream(PROMPT, GEN, seed=5, timeout=60))
        final = client.generate(PROMPT, GEN, seed=5, timeout=60)
    _check_stream(steps, expected)
    assert final == ESMProtein(expected)


async def test_async_generate_stream_and_generate(served):
    expected = local_generate(served.model, LocalProtein(sequence=PROMPT), LOCAL_GEN, seed=6).sequence
    async with AsyncESMCClient(served.target) as client:
        steps = [step async for step in client.generate_stream(PROMPT, GEN, seed=6, timeout=60)]
        final = await client.generate(PROMPT, GEN, seed=6)
    _check_stream(steps, expected)
    assert final.sequence == expected


def test_closing_a_stream_early_leaves_the_server_serving(served):
    with ESMCClient(served.target) as client:
        stream = client.generate_stream(PROMPT, GenerationConfig(num_steps=5), seed=1)
        first = next(stream)
        stream.close()  # cancels the call
        assert first.step == 1
        assert client.generate(PROMPT, GEN, seed=5).sequence.count("_") == 0


def test_generate_without_masks_is_invalid_argument(served):
    with ESMCClient(served.target) as client, pytest.raises(ESMCError) as error:
        client.generate("MKTLL", GEN)
    assert error.value.code == "INVALID_ARGUMENT"


def _batch_prompts():
    return ["MK__LV", "M___", PROMPT, "A_C_E_G"], [1, 2, 3, 4]


def _expected(served, prompts, seeds):
    return [
        local_generate(served.model, LocalProtein(sequence=p), LOCAL_GEN, seed=s).sequence
        for p, s in zip(prompts, seeds)
    ]


def test_sync_batch_generate(served):
    prompts, seeds = _batch_prompts()
    with ESMCClient(served.target) as client:
        proteins = client.batch_generate(prompts + ["MKT"], GEN, seeds + [0], return_exceptions=True)
    assert [p.sequence for p in proteins[:4]] == _expected(served, prompts, seeds)
    assert isinstance(proteins[4], ESMCError) and proteins[4].code == "INVALID_ARGUMENT"


async def test_async_batch_generate(served):
    prompts, seeds = _batch_prompts()
    async with AsyncESMCClient(served.target) as client:
        proteins = await client.batch_generate(prompts, GEN, seeds, concurrency=2)
        with pytest.raises(ESMCError):
            await client.batch_generate(["MKT"], GEN)
    assert [p.sequence for p in proteins] == _expected(served, prompts, seeds)


# --- CLI ----------------------------------------------------------------------------------


def test_cli_embed_writes_what_the_client_returns(served, tmp_path, capsys):
    items = _embed_inputs()
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{uid} protein {uid}\n{s[:7]}\n{s[7:]}\n" for uid, s in items))
    out = tmp_path / "out.npz"
    code = cli_main(["embed", str(fasta), "-o", str(out), "--target", served.target,
                     "--batch-size", "6", "--no-progress"])
    assert code == 1  # one sequence failed; the rest are written
    err = capsys.readouterr().err
    assert "20 proteins: 19 embedded" in err and "1 failed" in err
    assert "failed (1) p10: INVALID_ARGUMENT" in err
    with ESMCClient(served.target) as client:
        results = [r for r in client.embed(items) if r.ok]
    with np.load(out) as data:
        assert data["ids"].tolist() == [r.id for r in results]
        assert data["embeddings"].shape == (19, 64)
        np.testing.assert_allclose(data["embeddings"], np.stack([r.embedding for r in results]),
                                   rtol=RTOL, atol=ATOL)


def _esmc(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "esmc_client.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_cli_generate_stream_prints_the_sequence_filling_in(served):
    expected = local_generate(served.model, LocalProtein(sequence=PROMPT), LOCAL_GEN, seed=9).sequence
    result = _esmc("generate", PROMPT, "--steps", "3", "--strategy", "entropy", "--temperature", "0.8",
                   "--seed", "9", "--stream", "--target", served.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["step", "1/3"], ["step", "2/3"], ["step", "3/3"]]
    sequences = [line.split()[2] for line in lines[:3]]
    masks = [s.count("_") for s in sequences]
    assert masks == sorted(masks, reverse=True) and masks[-1] == 0 and masks[0] < PROMPT.count("_")
    assert lines[3:] == [expected] and sequences[-1] == expected


def test_cli_generate_without_stream_prints_only_the_protein(served, monkeypatch, capsys):
    monkeypatch.setenv("ESMC_TARGET", served.target)
    assert cli_main(["generate", PROMPT, "--steps", "3", "--strategy", "entropy",
                     "--temperature", "0.8", "--seed", "9"]) == 0
    expected = local_generate(served.model, LocalProtein(sequence=PROMPT), LOCAL_GEN, seed=9).sequence
    assert capsys.readouterr().out.splitlines() == [expected]


def test_cli_logits_and_info(served, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    assert cli_main(["logits", "MKTL", "-o", str(out), "--target", served.target]) == 0
    ref = local_logits(served.model, "MKTL", LocalLogitsConfig(sequence=True)).logits.sequence
    np.testing.assert_array_equal(np.load(out), ref.numpy())
    capsys.readouterr()
    assert cli_main(["logits", "MKTL", "--top", "2", "--target", served.target]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "logits (6, 64) float32"
    assert [line.split()[1] for line in lines[1:]] == ["<cls>", "M", "K", "T", "L", "<eos>"]
    best = int(ref[1].argmax())
    assert lines[2].split()[2] == tokenizer.VOCABULARY[best]
    assert cli_main(["info", "--target", served.target]) == 0
    info = capsys.readouterr().out
    assert "d_model: 64" in info and "n_layers: 2" in info
