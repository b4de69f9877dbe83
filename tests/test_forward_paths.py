"""The forward's fast paths: cached rotary tables, rotary without concatenation, the sequence
head skipped on request, packed positions without host reads, masks built once per forward.

Each is checked against the plain formula it replaces (float32, same tolerances as parity).
"""

from __future__ import annotations

import pytest
import torch

from esmc.attention import PackedLayout, PaddedLayout
from esmc.model import RotaryCache, apply_rotary, rotary_tables
from helpers.models import TINY, encode_all, pad, random_sequences, rel_err

pytestmark = pytest.mark.model


def reference_rotary(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The reference's formula: full-width tables and ``cat(-x2, x1)``."""
    cos, sin = rotary_tables(positions, x.shape[-1], x.dtype)
    cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_apply_rotary_equals_the_reference_formula():
    x = torch.randn(2, 50, 3, 64, generator=torch.Generator().manual_seed(0))
    cache = RotaryCache(64)
    ours = apply_rotary(x, *cache.for_length(50, x.device, x.dtype))
    expected = reference_rotary(x, torch.arange(50))
    assert torch.allclose(ours, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, x)  # it did rotate


def test_rotary_cache_builds_once_and_grows_by_powers_of_two():
    cache = RotaryCache(64)
    cos, sin = cache.tables(10, torch.device("cpu"), torch.float32)
    assert cos.shape == (RotaryCache.MIN_ROWS, 32)
    again = cache.tables(200, torch.device("cpu"), torch.float32)
    assert again[0] is cos  # same tensors: nothing rebuilt
    grown, _ = cache.tables(300, torch.device("cpu"), torch.float32)
    assert grown.shape[0] == 512
    expected_cos, expected_sin = rotary_tables(torch.arange(512), 64, torch.float32)
    assert torch.equal(grown, expected_cos)
    assert torch.equal(cache.tables(512, "cpu", torch.float32)[1], expected_sin)
    half, _ = cache.tables(10, torch.device("cpu"), torch.bfloat16)  # per dtype
    assert half.dtype == torch.bfloat16 and half.shape[0] == RotaryCache.MIN_ROWS


def test_model_reuses_its_rotary_tables(tiny_model):
    tokens = encode_all(random_sequences([30, 12], seed=4))
    with torch.no_grad():
        tiny_model(tokens[0][None])
        tables = tiny_model.rotary_cache.tables(1, torch.device("cpu"), torch.float32)
        tiny_model(pad(tokens))
        flat = torch.cat(tokens)
        cu = torch.tensor([0, 32, 46], dtype=torch.int32)
        tiny_model.forward_packed(flat, cu, 32)
    assert tiny_model.rotary_cache.tables(1, torch.device("cpu"), torch.float32)[0] is tables[0]
    assert not any("rotary" in key for key in tiny_model.state_dict())


def test_packed_positions_restart_at_every_sequence_without_reading_back():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    layout = PackedLayout(cu, 5)
    positions = layout.positions(9)
    assert "bounds" not in layout.__dict__  # cu_seqlens was not read back to the host
    assert positions.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    assert layout.positions().tolist() == positions.tolist()


def test_padded_mask_is_none_without_padding_and_additive_with_it():
    q = torch.zeros(1, 2, 4, 64)
    assert PaddedLayout(torch.ones(1, 4, dtype=torch.bool))._mask_for(q) is None
    ids = torch.tensor([[True, True, True, False]])
    mask = PaddedLayout(ids)._mask_for(q)
    assert mask.dtype == torch.float32 and mask.shape == (1, 1, 4, 4)
    assert mask[0, 0, 0].tolist() == [0, 0, 0, float("-inf")]
    assert mask[0, 0, 3].tolist() == [float("-inf")] * 3 + [0]  # pad attends to pad


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_skipping_the_head_keeps_embeddings_and_hidden_states(tiny_model, packed):
    tokens = encode_all(random_sequences([25, 9, 17], seed=5))
    with torch.no_grad():
        if packed:
            lengths = torch.tensor([len(t) for t in tokens])
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            args = (torch.cat(tokens), cu, int(lengths.max()))
            full = tiny_model.forward_packed(*args, hidden_layers=[1])
            lean = tiny_model.forward_packed(*args, hidden_layers=[1], return_logits=False)
        else:
            full = tiny_model(pad(tokens), hidden_layers=[1])
            lean = tiny_model(pad(tokens), hidden_layers=[1], return_logits=False)
    assert full.sequence_logits is not None and lean.sequence_logits is None
    assert torch.equal(lean.embeddings, full.embeddings)
    assert torch.equal(lean.hidden_states, full.hidden_states)
    assert lean.hidden_states.shape[0] == 1


def test_training_mode_still_has_gradients(tiny_model):
    """The in-place steps are for inference only: with grad on, backward works."""
    import copy

    model = copy.deepcopy(tiny_model).train()
    tokens = encode_all(random_sequences([20], seed=6))[0][None]
    out = model(tokens, hidden_layers=())
    out.sequence_logits.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert model.transformer.blocks[0].ffn[1].weight.grad.abs().sum() > 0
    assert TINY.n_layers == len(model.transformer.blocks)
