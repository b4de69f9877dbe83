"""esmc.batch.TokenBatch and the per-protein split on the device (means and casts before the
host copy, only what was asked for), as run_logits and the engine use them."""

from __future__ import annotations

import asyncio

import pytest
import torch
from helpers.models import random_model, random_sequences

from esmc.batch import TokenBatch
from esmc.inference import run_logits
from esmc.tokenizer import PAD_ID, encode
from esmc.types import LogitsConfig
from esmc_server.config import BatchingConfig
from esmc_server.engine import Engine

pytestmark = pytest.mark.model

ALL = LogitsConfig(
    sequence=True,
    return_embeddings=True,
    return_hidden_states=True,
    return_mean_embedding=True,
    return_mean_hidden_states=True,
)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=4)


def test_pack_pad_rows_masks_and_split():
    tokens = [encode(s) for s in ("MKT", "A", "MKTAYIAK")]
    packed = TokenBatch.pack(tokens)
    padded = TokenBatch.pack(tokens, packed=False)
    assert packed.lengths == padded.lengths == (5, 3, 10)
    assert packed.cu_seqlens.tolist() == [0, 5, 8, 18] and packed.cost == 18
    assert padded.tokens.shape == (3, 10) and padded.cost == 30
    assert int((padded.tokens == PAD_ID).sum()) == 5 + 7
    assert packed.offsets() == [0, 5, 8] and padded.offsets() == [0, 10, 20]
    for batch in (packed, padded):
        parts = batch.split(batch.tokens)
        assert [p.tolist() for p in parts] == [t.tolist() for t in tokens]
        residues = batch.split(batch.residue_mask())
        assert [int(r.sum()) for r in residues] == [3, 1, 8]
    assert TokenBatch.from_padded(padded.tokens).lengths == (5, 3, 10)
    hidden = torch.randn(2, 18, 4)
    assert [h.shape for h in packed.split(hidden, leading=1)] == [(2, 5, 4), (2, 3, 4), (2, 10, 4)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_outputs_cast_after_float32_means(model, dtype):
    sequences = random_sequences([12, 40, 7], seed=2)
    tokens = [encode(s) for s in sequences]
    wide = run_logits(model, tokens, [ALL] * 3)
    narrow = run_logits(model, tokens, [ALL] * 3, dtype=dtype)
    for w, n in zip(wide, narrow):
        for a, b in [
            (w.logits.sequence, n.logits.sequence),
            (w.embeddings, n.embeddings),
            (w.hidden_states, n.hidden_states),
            (w.mean_embedding, n.mean_embedding),  # the float32 mean, then cast
            (w.mean_hidden_states, n.mean_hidden_states),
        ]:
            assert b.dtype == dtype and torch.equal(a.to(dtype), b)


def test_only_what_was_asked_for_is_returned_and_the_head_is_skipped(model):
    calls = []
    handle = model.sequence_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        (out,) = run_logits(model, [encode("MKTAYIAK")], [LogitsConfig(return_mean_embedding=True)])
        assert not calls  # no request wanted logits: the head did not run
        assert out.logits.sequence is None and out.embeddings is None
        assert out.hidden_states is None and out.mean_hidden_states is None
        assert out.mean_embedding.shape == (model.config.d_model,)
        assert out.mean_embedding._base is None  # its own memory, not a view of the batch
        run_logits(model, [encode("MKTAYIAK")], [LogitsConfig(sequence=True)])
        assert len(calls) == 1
    finally:
        handle.remove()


async def test_engine_logits_in_the_wire_dtype(model):
    engine = Engine(model, BatchingConfig(max_batch_size=3, max_wait_ms=60_000))
    await engine.start()
    try:
        tokens = [encode(s) for s in random_sequences([9, 30, 17], seed=3)]
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        results = await asyncio.gather(
            *[engine.logits(t, ALL, dtype=d) for t, d in zip(tokens, dtypes)]
        )
        assert engine.stats.forwards == 1  # three dtypes, one forward
        for t, d, result in zip(tokens, dtypes, results):
            (alone,) = run_logits(model, [t], [ALL])
            out = result.output
            assert out.embeddings.dtype == d and out.mean_hidden_states.dtype == d
            scale = alone.mean_embedding.abs().max()
            assert (out.mean_embedding.float() - alone.mean_embedding).abs().max() <= 1e-2 * scale
        with pytest.raises(Exception, match="floating point"):
            await engine.logits(tokens[0], ALL, dtype=torch.int32)
    finally:
        await engine.stop(grace_s=10)
