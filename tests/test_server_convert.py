"""Wire conversion: tensor bytes per dtype (bf16 bit for bit), request validation, settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from esmc import tokenizer
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server import convert
from esmc_server.cli import build_parser, config_from_args
from esmc_server.cli import main as cli_main
from esmc_server.config import BatchingConfig, ServerConfig
from esmc_server.errors import InvalidRequest

pytestmark = pytest.mark.unit


def _bf16_bits_reference(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits, computed with integer arithmetic."""
    bits = x.astype("<f4").view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def test_float32_round_trip_is_exact_and_little_endian():
    t = torch.randn(3, 5, 7)
    message = convert.tensor_to_proto(t)
    assert message.dtype == pb.DTYPE_FLOAT32
    assert list(message.shape) == [3, 5, 7]
    assert message.data == t.numpy().astype("<f4").tobytes()
    assert torch.equal(convert.tensor_from_proto(message), t)


def test_float16_round_trip_within_half_rounding():
    t = torch.randn(64, 33)
    back = convert.tensor_from_proto(convert.tensor_to_proto(t, pb.DTYPE_FLOAT16))
    assert back.dtype == torch.float16
    assert torch.equal(back, t.half())
    assert torch.allclose(back.float(), t, rtol=2**-11, atol=0)


def test_bfloat16_bits_are_upper_half_rounded_to_nearest_even():
    # ties: 0x3F808000 (exactly halfway, even below -> stays), 0x3F818000 (halfway, odd -> up)
    ties = np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0xBF808001], dtype=np.uint32).view(
        np.float32
    )
    values = np.concatenate(
        [ties, np.random.default_rng(0).standard_normal(1000).astype(np.float32)]
    )
    message = convert.tensor_to_proto(torch.from_numpy(values.copy()), pb.DTYPE_BFLOAT16)
    wire = np.frombuffer(message.data, dtype="<u2")
    assert wire[:4].tolist() == [0x3F80, 0x3F82, 0x3F81, 0xBF81]
    assert np.array_equal(wire, _bf16_bits_reference(values))
    back = convert.tensor_from_proto(message)
    assert back.dtype == torch.bfloat16
    assert np.array_equal((wire.astype(np.uint32) << 16).view(np.float32), back.float().numpy())


@pytest.mark.parametrize(
    "dtype, wire", [(pb.DTYPE_INT32, torch.int32), (pb.DTYPE_INT64, torch.int64)]
)
def test_integer_round_trip(dtype, wire):
    t = torch.tensor([[0, -1, 2**31 - 1], [5, 6, -(2**31)]])
    back = convert.tensor_from_proto(convert.tensor_to_proto(t, dtype))
    assert back.dtype == wire
    assert torch.equal(back.long(), t)


def test_tensor_from_proto_rejects_wrong_byte_count():
    with pytest.raises(InvalidRequest, match="do not hold shape"):
        convert.tensor_from_proto(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=b"\0" * 12))


def test_output_dtype():
    assert convert.output_dtype(pb.DTYPE_UNSPECIFIED) == pb.DTYPE_FLOAT32
    assert convert.output_dtype(pb.DTYPE_BFLOAT16) == pb.DTYPE_BFLOAT16
    with pytest.raises(InvalidRequest, match="DTYPE_INT64 is not an output dtype"):
        convert.output_dtype(pb.DTYPE_INT64)
    with pytest.raises(InvalidRequest, match="99 is not an output dtype"):
        convert.output_dtype(99)


def test_tokens_from_request():
    request = pb.LogitsRequest(protein=pb.ESMProtein(sequence="MK_<mask>"))
    tokens = convert.tokens_from_request(request, 2048)
    assert tokens.tolist() == [0, 20, 15, 32, 32, 2]
    same = convert.tokens_from_request(
        pb.LogitsRequest(tokens=pb.ESMProteinTensor(sequence=tokens.tolist())), 2048
    )
    assert torch.equal(same, tokens)


@pytest.mark.parametrize(
    "request_, message",
    [
        (pb.LogitsRequest(), "neither protein nor tokens"),
        (pb.LogitsRequest(protein=pb.ESMProtein(sequence="")), "sequence is empty"),
        (pb.LogitsRequest(protein=pb.ESMProtein(sequence="MKTa")), r"'a' at position 3"),
        (pb.LogitsRequest(protein=pb.ESMProtein(sequence="M" * 9)), "limit is 8"),
        (
            pb.LogitsRequest(protein=pb.ESMProtein(sequence="MK", secondary_structure="HH")),
            "only the sequence",
        ),
        (
            pb.LogitsRequest(tokens=pb.ESMProteinTensor(sequence=[0, 5, 40, 2])),
            "token id 40 at position 2",
        ),
        (pb.LogitsRequest(tokens=pb.ESMProteinTensor(sequence=[5, 5, 2])), "must start with <cls>"),
        (
            pb.LogitsRequest(tokens=pb.ESMProteinTensor(sequence=[0, 5, 2], sasa=[1, 2, 3])),
            "got sasa",
        ),
    ],
)
def test_tokens_from_request_rejects(request_, message):
    with pytest.raises(InvalidRequest, match=message):
        convert.tokens_from_request(request_, 10)


def test_logits_config_layers():
    config, layers = convert.logits_config_from_proto(
        pb.LogitsConfig(sequence=True, return_hidden_states=True, ith_hidden_layer=-2), 3
    )
    assert config.sequence and config.return_hidden_states and config.ith_hidden_layer == -2
    assert layers == [1]
    _, layers = convert.logits_config_from_proto(pb.LogitsConfig(return_mean_hidden_states=True), 3)
    assert layers == [0, 1, 2]


@pytest.mark.parametrize(
    "message, text",
    [
        (
            pb.LogitsConfig(return_hidden_states=True, ith_hidden_layer=3),
            "ith_hidden_layer=3 does not exist",
        ),
        (pb.LogitsConfig(return_hidden_states=True, ith_hidden_layer=-4), "does not exist"),
        (pb.LogitsConfig(sequence=True, ith_hidden_layer=0), "neither return_hidden_states"),
        (pb.LogitsConfig(structure=True), "no structure head"),
        (pb.LogitsConfig(function=True), "no function head"),
    ],
)
def test_logits_config_rejects(message, text):
    with pytest.raises(InvalidRequest, match=text):
        convert.logits_config_from_proto(message, 3)


def test_embed_config():
    final = convert.embed_config_from_proto(pb.EmbedRequest(id="a"), 3)
    assert final.return_mean_embedding and not final.needs_hidden_states
    block = convert.embed_config_from_proto(pb.EmbedRequest(layer=-2, pooling=pb.POOLING_NONE), 3)
    assert block.return_hidden_states and block.ith_hidden_layer == -2
    with pytest.raises(InvalidRequest, match="layer: ith_hidden_layer=7 does not exist"):
        convert.embed_config_from_proto(pb.EmbedRequest(layer=7), 3)


def test_generation_config_defaults_and_values():
    config = convert.generation_config_from_proto(pb.GenerationConfig())
    assert (config.track, config.schedule, config.strategy, config.num_steps) == (
        "",
        "cosine",
        "random",
        20,
    )
    assert config.temperature == 1.0 and config.temperature_annealing and config.top_p == 1.0
    config = convert.generation_config_from_proto(
        pb.GenerationConfig(
            strategy="entropy",
            num_steps=4,
            temperature=0.0,
            temperature_annealing=False,
            top_p=0.5,
            invalid_ids=[23],
        )
    )
    assert (config.strategy, config.num_steps, config.temperature, config.top_p) == (
        "entropy",
        4,
        0.0,
        0.5,
    )
    assert not config.temperature_annealing and list(config.invalid_ids) == [23]


@pytest.mark.parametrize(
    "message, text",
    [
        (pb.GenerationConfig(strategy="greedy"), "unknown strategy 'greedy'"),
        (pb.GenerationConfig(schedule="exp"), "unknown schedule 'exp'"),
        (pb.GenerationConfig(num_steps=0), "num_steps must be an integer >= 1, got 0"),
        (pb.GenerationConfig(temperature=-0.5), "temperature must be finite and >= 0, got -0.5"),
        (pb.GenerationConfig(temperature=math.inf), "temperature must be finite and >= 0, got inf"),
        (pb.GenerationConfig(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (pb.GenerationConfig(top_p=1.5), "top_p must be in"),
        (pb.GenerationConfig(invalid_ids=[64]), "holds 64, outside the vocabulary"),
        (pb.GenerationConfig(track="structure"), "config: ESMC has no 'structure' track"),
        (pb.GenerationConfig(track="banana"), "unknown track 'banana'"),
    ],
)
def test_generation_config_rejects(message, text):
    with pytest.raises(InvalidRequest, match=text):
        convert.generation_config_from_proto(message)


def test_sampling_config():
    config = convert.sampling_config_from_proto(
        pb.SamplingConfig(sequence=pb.SamplingTrackConfig(temperature=0.5, topk_logprobs=3))
    )
    assert config.sequence.temperature == 0.5 and config.sequence.top_p == 1.0
    assert config.sequence.only_sample_masked_tokens and config.sequence.topk_logprobs == 3
    with pytest.raises(InvalidRequest, match="no 'sasa' track"):
        convert.sampling_config_from_proto(pb.SamplingConfig(sasa=pb.SamplingTrackConfig()))
    with pytest.raises(InvalidRequest, match="topk_logprobs must be an integer in 0..32, got 33"):
        convert.sampling_config_from_proto(
            pb.SamplingConfig(sequence=pb.SamplingTrackConfig(topk_logprobs=33))
        )
    with pytest.raises(InvalidRequest, match=r"sequence.top_p must be in \(0, 1\]"):
        convert.sampling_config_from_proto(
            pb.SamplingConfig(sequence=pb.SamplingTrackConfig(top_p=0))
        )


def test_protein_round_trip():
    ids = tokenizer.encode("MKT_A").tolist()
    assert convert.protein_to_proto(ids).sequence == "MKT_A"
    assert list(convert.protein_tensor_to_proto(torch.tensor(ids)).sequence) == ids


# -- config -----------------------------------------------------------------------------------


def test_config_defaults():
    config = ServerConfig.from_env({})
    assert config == ServerConfig()
    assert config.batching == BatchingConfig()


def test_config_env_then_overrides():
    env = {
        "ESMC_MODEL": "esmc-300m",
        "ESMC_PORT": "6000",
        "ESMC_METRICS_PORT": "off",
        "ESMC_MAX_BATCH_TOKENS": "4096",
        "ESMC_MAX_WAIT_MS": "2.5",
        "ESMC_PACKED": "false",
        "ESMC_DEVICE": "cpu",
        "ESMC_UNRELATED": "x",
    }
    config = ServerConfig.from_env(env, max_batch_tokens=8192, port=None, max_queue=3)
    assert (config.model, config.port, config.metrics_port, config.device) == (
        "esmc-300m",
        6000,
        None,
        "cpu",
    )
    assert config.batching == BatchingConfig(
        max_batch_tokens=8192, max_wait_ms=2.5, max_queue=3, packed=False
    )


@pytest.mark.parametrize(
    "env, overrides, text",
    [
        ({"ESMC_PORT": "abc"}, {}, "ESMC_PORT='abc'"),
        ({"ESMC_PACKED": "maybe"}, {}, "not a boolean"),
        ({}, {"max_batch_size": 0}, "max_batch_size must be >= 1"),
        ({}, {"device": "tpu"}, "device 'tpu'"),
        ({}, {"dtype": "int4"}, "dtype 'int4'"),
        ({}, {"colour": "red"}, "unknown settings"),
    ],
)
def test_config_rejects(env, overrides, text):
    with pytest.raises(ValueError, match=text):
        ServerConfig.from_env(env, **overrides)


def test_cli_flags_override_environment(monkeypatch):
    monkeypatch.setenv("ESMC_MAX_QUEUE", "7")
    monkeypatch.setenv("ESMC_PORT", "1234")
    monkeypatch.setenv("ESMC_MAX_WAIT_MS", "9")
    argv = ["--port", "0", "--padded", "--metrics-port", "off", "--max-wait-ms", "1.5"]
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.port, config.metrics_port) == (0, None)
    assert config.batching == BatchingConfig(max_queue=7, max_wait_ms=1.5, packed=False)
    config = config_from_args(build_parser().parse_args(["--metrics-port", "9191", "--no-warmup"]))
    assert (config.port, config.metrics_port, config.warmup) == (1234, 9191, False)


def test_cli_reports_a_model_it_cannot_load(tmp_path, caplog):
    missing = tmp_path / "nothing.safetensors"
    assert cli_main(["serve", "--model", str(missing), "--port", "0", "--metrics-port", "off"]) == 1
    assert "cannot serve" in caplog.text


def test_service_settings_from_env_and_flags(monkeypatch):
    env = {
        "ESMC_MAX_LENGTH": "4559",
        "ESMC_THREADS": "2",
        "ESMC_EMBED_WINDOW": "8",
        "ESMC_STREAM_IDLE_TIMEOUT_S": "12.5",
        "ESMC_DRAIN_DELAY_S": "0",
        "ESMC_SO_REUSEPORT": "true",
    }
    config = ServerConfig.from_env(env)
    assert (config.max_length, config.max_tokens, config.threads, config.embed_window) == (
        4559,
        4561,
        2,
        8,
    )
    assert (config.stream_idle_timeout_s, config.drain_delay_s, config.so_reuseport) == (
        12.5,
        0.0,
        True,
    )
    defaults = ServerConfig()
    assert (defaults.max_length, defaults.threads, defaults.so_reuseport) == (16384, None, False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = ["--max-length", "100", "--threads", "1", "--embed-window", "3",
            "--stream-idle-timeout-s", "5", "--drain-delay-s", "1.5"]  # fmt: skip
    config = config_from_args(build_parser().parse_args(argv))
    assert (config.max_length, config.threads, config.embed_window) == (100, 1, 3)
    assert (config.stream_idle_timeout_s, config.drain_delay_s, config.so_reuseport) == (
        5.0,
        1.5,
        True,
    )


@pytest.mark.parametrize(
    "overrides, text",
    [
        ({"max_length": 0}, "max_length must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"embed_window": 0}, "embed_window must be >= 1"),
        ({"stream_idle_timeout_s": 0}, "stream_idle_timeout_s must be > 0"),
        ({"drain_delay_s": -1}, "drain_delay_s must be >= 0"),
    ],
)
def test_service_settings_rejected(overrides, text):
    with pytest.raises(ValueError, match=text):
        ServerConfig.from_env({}, **overrides)


def test_response_size_is_an_upper_bound_of_the_built_message():
    from esmc.types import ForwardTrackData, LogitsOutput

    shapes = convert.Shapes(d_model=32, logits_width=64)
    config, layers = convert.logits_config_from_proto(
        pb.LogitsConfig(sequence=True, return_hidden_states=True, return_mean_embedding=True), 3
    )
    output = LogitsOutput(
        logits=ForwardTrackData(sequence=torch.zeros(12, 64)),
        hidden_states=torch.zeros(3, 12, 32),
        mean_embedding=torch.zeros(32),
    )
    for dtype in (pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16):
        built = convert.logits_response(output, layers, dtype, pb.ResponseMetadata(queue_ms=1.5))
        estimate = convert.logits_response_bytes(config, layers, 12, shapes, dtype)
        assert built.ByteSize() <= estimate <= built.ByteSize() + 1200
    with pytest.raises(InvalidRequest, match="the response would be 5000 bytes"):
        convert.check_response_size(5000, 4000, "ask for less")


@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16])
def test_serialized_responses_parse_as_the_protobuf_built_ones(dtype):
    from esmc.types import ForwardTrackData, LogitsConfig, LogitsOutput

    g = torch.Generator().manual_seed(0)
    output = LogitsOutput(
        logits=ForwardTrackData(sequence=torch.randn(300, 64, generator=g)),
        embeddings=torch.randn(300, 32, generator=g),
        hidden_states=torch.randn(3, 300, 32, generator=g)[:, :, :],
        mean_embedding=torch.randn(32, generator=g),
        mean_hidden_states=torch.randn(3, 32, generator=g).t().contiguous().t(),  # strided
    )
    metadata = pb.ResponseMetadata(queue_ms=1.5, compute_ms=2.0, batch_size=3, forwards=1)
    fast = convert.logits_response_serialized(output, [0, 1, 2], dtype, metadata)
    assert pb.LogitsResponse.FromString(fast) == convert.logits_response(
        output, [0, 1, 2], dtype, metadata
    )
    config = LogitsConfig(return_embeddings=True)
    fast = convert.embed_response_serialized("p1", output, config, dtype, metadata)
    assert pb.EmbedResponse.FromString(fast) == convert.embed_response(
        "p1", output, config, dtype, metadata
    )
    empty = LogitsOutput(logits=ForwardTrackData(sequence=torch.zeros(0, 64)))
    fast = convert.logits_response_serialized(empty, [], dtype, metadata)
    assert pb.LogitsResponse.FromString(fast) == convert.logits_response(empty, [], dtype, metadata)
