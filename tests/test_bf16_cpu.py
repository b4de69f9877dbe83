"""bfloat16 on the CPU: accuracy against the float32 reference, ``--dtype auto``, the server.

Tolerance: relative error (max |bf16 - fp32| / max |fp32|) <= 2e-2, the GPU tolerance, on the
shipped esmc-tiny (trained weights; measured here: logits 8e-3, embeddings 1.5e-2, mean
embedding 4e-3). Random-weight test models are rougher in bf16 (logits up to 3.3e-2 for the
std-0.1 tiny model): their accuracy checks use a looser bound.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from esmc import ESMC
from esmc.inference import run_logits
from esmc.runtime import cpu_capabilities, cpu_has_native_bf16, resolve_dtype
from esmc.types import LogitsConfig
from esmc.weights import save_safetensors
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.app import load_model
from esmc_server.config import ServerConfig
from helpers.models import TINY, encode_all, pad, random_sequences, rel_err
from helpers.inprocess import running_server, server_config
from helpers.wire import protein_request, to_numpy

pytestmark = pytest.mark.model
TOLERANCE = 2e-2
RANDOM_WEIGHTS_TOLERANCE = 5e-2
EVERYTHING = LogitsConfig(
    sequence=True, return_embeddings=True, return_hidden_states=True,
    return_mean_embedding=True, return_mean_hidden_states=True,
)


@pytest.fixture(scope="module")
def shipped():
    return ESMC.from_pretrained("esmc-tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


@pytest.fixture(scope="module")
def tokens():
    return encode_all(random_sequences([60, 5, 23, 41], seed=7))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_bf16_outputs_within_2e2_of_float32(shipped, tokens, packed):
    exact = run_logits(shipped, tokens, [EVERYTHING] * len(tokens), packed=packed)
    bf16 = copy.deepcopy(shipped).to(torch.bfloat16)
    half = run_logits(bf16, tokens, [EVERYTHING] * len(tokens), packed=packed)
    worst = 0.0
    for ours, reference in zip(half, exact):
        for name in ("embeddings", "hidden_states", "mean_embedding", "mean_hidden_states"):
            assert getattr(ours, name).dtype == torch.float32  # served as float32
            worst = max(worst, rel_err(getattr(ours, name), getattr(reference, name)))
        worst = max(worst, rel_err(ours.logits.sequence, reference.logits.sequence))
    assert 1e-4 < worst <= TOLERANCE  # really bf16 (not silently float32), and close


def test_bf16_padded_forward_keeps_bf16_end_to_end(bf16_model, tokens):
    with torch.no_grad():
        out = bf16_model(pad(tokens), hidden_layers=[0])
    assert out.sequence_logits.dtype == out.embeddings.dtype == torch.bfloat16
    assert out.hidden_states.dtype == torch.bfloat16
    assert torch.isfinite(out.sequence_logits.float()).all()


# -- choosing the dtype ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capabilities, native",
    [
        ({"avx512_f": True, "avx512_bf16": True}, True),  # AMD Zen 4, Intel Cooper Lake
        ({"avx512_f": True, "amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids
        ({"bf16": True, "sve": True}, True),  # Arm with the BF16 extension (/proc/cpuinfo)
        ({"avx512_f": True, "avx512_vnni": True, "avx512_bf16": False}, False),  # Ice Lake
        ({"avx2": True}, False),
        ({}, False),
    ],
)
def test_native_bf16_detection(capabilities, native):
    assert cpu_has_native_bf16(capabilities) is native
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_dtype("auto", "cpu", capabilities) == expected


def test_detection_on_this_machine_agrees_with_torch():
    capabilities = cpu_capabilities()
    torch_says = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == (torch_says or capabilities.get("bf16", False))


def test_default_stays_float32_on_cpu_and_explicit_names_win():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu", {}) == torch.bfloat16
    assert resolve_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", "cpu")


def test_server_config_accepts_auto_from_flag_and_env():
    assert ServerConfig.from_env({"ESMC_DTYPE": "auto"}).dtype == "auto"
    assert ServerConfig.from_env({"ESMC_DTYPE": ""}).dtype is None
    assert ServerConfig.from_env({}, dtype="bfloat16").dtype == "bfloat16"
    assert ServerConfig.from_env({"ESMC_COMPILE": "1"}).compile is True
    with pytest.raises(ValueError):
        ServerConfig(dtype="float8")


@pytest.fixture(scope="module")
def weights_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "model.safetensors"
    save_safetensors(tiny_model, path)
    return path


@pytest.mark.parametrize("name", ["bfloat16", "auto", None])
def test_load_model_resolves_the_dtype_on_cpu(weights_file, name):
    config = ServerConfig(model=str(weights_file), device="cpu", dtype=name)
    model = load_model(config)
    expected = torch.bfloat16 if name == "bfloat16" else resolve_dtype(name, "cpu")
    assert model.dtype == expected


# -- through the server ---------------------------------------------------------------------------


async def test_server_serves_bf16_on_cpu_and_says_so(tiny_model, bf16_model, tokens):
    sequence = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    async with running_server(bf16_model, server_config()) as srv:
        info = await srv.stub.Info(pb.InfoRequest(), timeout=10)
        reply = await srv.stub.Logits(
            protein_request(sequence, sequence=True, return_mean_embedding=True), timeout=60
        )
    assert info.dtype == "bfloat16" and info.device == "cpu"
    exact = run_logits(tiny_model, encode_all([sequence]), [EVERYTHING])[0]
    logits = torch.from_numpy(np.array(to_numpy(reply.logits.sequence)))
    mean = torch.from_numpy(np.array(to_numpy(reply.mean_embedding)))
    assert 0 < rel_err(logits, exact.logits.sequence) <= RANDOM_WEIGHTS_TOLERANCE
    assert rel_err(mean, exact.mean_embedding) <= RANDOM_WEIGHTS_TOLERANCE
