"""int8 on the CPU (esmc.quantize): exact integer products, batch invariance, accuracy, choice.

Accuracy bounds are on the shipped esmc-tiny (trained weights), where int8 is judged; the
measured values on an AVX2 CPU (7-bit activations) are in the comments.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esmc import ESMC
from esmc.inference import run_logits
from esmc.quantize import (
    Int8Linear,
    activation_bits_for,
    cpu_has_fast_int8,
    is_int8,
    quantize_int8,
)
from esmc.runtime import resolve_dtype
from esmc.types import LogitsConfig
from esmc.weights import save_safetensors
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.app import load_model
from esmc_server.config import ServerConfig
from helpers.models import encode_all, random_sequences, rel_err
from helpers.inprocess import running_server, server_config
from helpers.wire import protein_request, to_numpy

pytestmark = pytest.mark.model
OUTPUTS = LogitsConfig(sequence=True, return_embeddings=True, return_mean_embedding=True)
BITS_HERE = [7, 8] if cpu_has_fast_int8() else [7]  # 8-bit saturates without VNNI/AMX


@pytest.fixture(scope="module")
def shipped():
    return ESMC.from_pretrained("esmc-tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def int8_model(shipped):
    return quantize_int8(copy.deepcopy(shipped))


@pytest.fixture(scope="module")
def tokens():
    return encode_all(random_sequences([60, 5, 23, 41, 130], seed=3))


def exact_int8_linear(x: torch.Tensor, linear: torch.nn.Linear, bits: int) -> torch.Tensor:
    """The same quantisation written out in float64: what the int8 kernel must compute."""
    levels = 2 ** (bits - 1) - 1
    w = linear.weight.double()
    w_scale = w.abs().amax(1) / 127
    w_codes = torch.round(w / w_scale[:, None])
    x_scale = x.double().abs().amax(1).clamp_min(1e-30) / levels
    x_codes = torch.round(x.double() / x_scale[:, None])
    return (x_codes @ w_codes.T) * x_scale[:, None] * w_scale[None, :]


@pytest.mark.parametrize("bits", BITS_HERE)
def test_int8_linear_computes_the_integer_products_exactly(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(192, 320, bias=False)
    x = torch.randn(37, 192) * torch.linspace(0.01, 10, 37)[:, None]  # rows of any scale
    ours = Int8Linear(linear, bits)(x)
    exact = exact_int8_linear(x, linear, bits)
    assert rel_err(ours.double(), exact) < 1e-6
    assert 1e-4 < rel_err(ours, F.linear(x, linear.weight)) < 0.05  # int8, not float32


def test_int8_linear_takes_strided_inputs_and_keeps_the_bias():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 48)
    wide = torch.randn(2, 9, 128)
    view = wide[..., :64]  # (2, 9, 64), not contiguous: the SwiGLU output is such a view
    layer = Int8Linear(linear, 7)
    out = layer(view)
    assert out.shape == (2, 9, 48)
    assert torch.equal(out, layer(view.contiguous()))
    assert rel_err(out, F.linear(view, linear.weight, linear.bias)) < 0.05


def test_a_zero_row_gives_the_bias():
    linear = torch.nn.Linear(32, 8)
    out = Int8Linear(linear, 7)(torch.zeros(3, 32))
    assert torch.allclose(out, linear.bias.detach().expand(3, 8))


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_int8_is_batch_invariant(int8_model, tokens, packed):
    together = run_logits(int8_model, tokens, [OUTPUTS] * len(tokens), packed=packed)
    for one, batched in zip(tokens, together):
        alone = run_logits(int8_model, [one], [OUTPUTS], packed=packed)[0]
        assert rel_err(batched.logits.sequence, alone.logits.sequence) <= 1e-5
        assert rel_err(batched.embeddings, alone.embeddings) <= 1e-5


def test_int8_on_esmc_tiny_stays_close_to_float32(shipped, int8_model, tokens):
    exact = run_logits(shipped, tokens, [OUTPUTS] * len(tokens))
    ours = run_logits(int8_model, tokens, [OUTPUTS] * len(tokens))
    for reference, quantized in zip(exact, ours):
        # measured (7-bit activations): logits <= 2.7e-2, mean-embedding cosine >= 0.9995
        assert 1e-4 < rel_err(quantized.logits.sequence, reference.logits.sequence) < 0.06
        cosine = F.cosine_similarity(quantized.mean_embedding, reference.mean_embedding, dim=-1)
        assert cosine.item() > 0.995
        top = quantized.logits.sequence.argmax(-1) == reference.logits.sequence.argmax(-1)
        assert top.float().mean().item() > 0.9


def test_only_the_block_projections_are_int8(int8_model):
    block = int8_model.transformer.blocks[0]
    assert isinstance(block.attn.layernorm_qkv[1], Int8Linear)
    assert isinstance(block.attn.out_proj, Int8Linear)
    assert isinstance(block.ffn[1], Int8Linear) and isinstance(block.ffn[3], Int8Linear)
    assert isinstance(int8_model.sequence_head[0], torch.nn.Linear)
    assert int8_model.dtype == torch.float32 and is_int8(int8_model)


def test_quantize_refuses_what_it_cannot_run(shipped):
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        quantize_int8(copy.deepcopy(shipped).to(torch.bfloat16))
    with pytest.raises(ValueError, match="7 or 8"):
        Int8Linear(torch.nn.Linear(4, 4), 4)


# -- choosing int8 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capabilities, bits",
    [
        ({"avx512_f": True, "avx512_vnni": True}, 8),  # Cascade Lake, Ice Lake, Zen 4
        ({"avx2": True, "avx_vnni": True}, 8),  # Alder Lake
        ({"amx_int8": True, "amx_tile": True}, 8),  # Sapphire Rapids
        ({"avx512_f": True}, 7),  # Skylake-SP
        ({"avx2": True}, 7),  # Zen 2/3
        ({}, 7),
    ],
)
def test_activation_bits_follow_the_cpu(capabilities, bits):
    assert activation_bits_for(capabilities) == bits


def test_int8_is_explicit_and_cpu_only():
    assert resolve_dtype("int8", "cpu") == torch.int8
    everything = {"avx512_vnni": True, "amx_int8": True, "avx512_bf16": True}
    assert resolve_dtype("auto", "cpu", everything) != torch.int8
    assert resolve_dtype("auto", "cpu", {"avx512_vnni": True}) == torch.float32
    with pytest.raises(ValueError, match="CPU only"):
        resolve_dtype("int8", "cuda")
    assert ServerConfig.from_env({"ESMC_DTYPE": "int8"}).dtype == "int8"


def test_loading_int8_and_the_warning_on_cpus_without_vnni(shipped, tmp_path, caplog):
    path = tmp_path / "model.safetensors"
    save_safetensors(shipped, path)
    with caplog.at_level(logging.WARNING, logger="esmc.quantize"):
        model = load_model(ServerConfig(model=str(path), device="cpu", dtype="int8"))
    assert is_int8(model)
    warned = any("VNNI" in record.getMessage() for record in caplog.records)
    assert warned is not cpu_has_fast_int8()
    library = ESMC.from_pretrained(str(path), device="cpu", dtype=torch.int8)
    assert is_int8(library)


async def test_server_serves_int8_as_the_library_computes_it(int8_model):
    sequence = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"
    async with running_server(int8_model, server_config()) as srv:
        reply = await srv.stub.Logits(protein_request(sequence, sequence=True), timeout=60)
        info = await srv.stub.Info(pb.InfoRequest(), timeout=60)
    assert info.dtype == "int8"  # what the server computes in, not its float32 activations
    expected = run_logits(int8_model, encode_all([sequence]), [OUTPUTS])[0]
    logits = torch.from_numpy(np.array(to_numpy(reply.logits.sequence)))
    assert rel_err(logits, expected.logits.sequence) <= 1e-5
