"""The compiled block stack (``esmc.compiled``) gives eager's outputs, for any packed batch.

One compile of the tiny model for the whole module (packed layout, dynamic token count):
later batches of other sizes must reuse the same graphs, not compile again.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from esmc.compiled import compile_blocks, is_compiled, uncompile
from helpers.models import TINY, encode_all, random_sequences, rel_err

pytestmark = pytest.mark.model
TOLERANCE = 1e-5  # float32 rounding: fused kernels sum in another order


def packed(tokens):
    lengths = torch.tensor([len(t) for t in tokens])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    return torch.cat(tokens), cu, int(lengths.max())


@pytest.fixture(scope="module")
def compiled(tiny_model):
    torch._dynamo.reset()
    counters.clear()
    model = compile_blocks(copy.copy(tiny_model))  # warms up the packed layout
    yield model
    torch._dynamo.reset()


def test_compiled_packed_forward_equals_eager(tiny_model, compiled):
    assert is_compiled(compiled) and not is_compiled(tiny_model)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # project and finish, compiled during the warm-up
    for seed, lengths in enumerate([[40, 1, 13], [7, 29, 3, 60, 11], [100]]):
        flat, cu, longest = packed(encode_all(random_sequences(lengths, seed=seed)))
        with torch.no_grad():
            ours = compiled.forward_packed(flat, cu, longest, hidden_layers=[0, 2])
            eager = tiny_model.forward_packed(flat, cu, longest, hidden_layers=[0, 2])
        for name in ("sequence_logits", "embeddings", "hidden_states"):
            assert rel_err(getattr(ours, name), getattr(eager, name)) <= TOLERANCE, name
    assert counters["stats"]["unique_graphs"] == graphs  # other sizes: no new compile


def test_compiled_block_steps_equal_eager(tiny_model, compiled):
    """Each compiled half of a block against the eager block on random packed inputs."""
    blocks = compiled.compiled_blocks
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(57, TINY.d_model, generator=generator)
    context = torch.randn(57, TINY.n_heads, TINY.d_head, generator=generator)
    rotary = tiny_model.rotary_cache.for_positions(torch.arange(57), 57, torch.float32)
    with torch.no_grad():
        for block in tiny_model.transformer.blocks:
            assert rel_err(blocks.finish(block, x, context), block.finish(x, context)) <= TOLERANCE
            for ours, eager in zip(blocks.project(block, x, rotary), block.attn.project(x, rotary)):
                assert rel_err(ours, eager) <= TOLERANCE


def test_uncompile_restores_eager(tiny_model):
    model = compile_blocks(copy.copy(tiny_model), warmup=())
    assert is_compiled(model)
    assert not is_compiled(uncompile(model))
