"""Each sequence's outputs are the same alone, in a padded batch and in a packed batch.

float32 on the CPU, relative error (max |diff| / max |single|) <= 1e-5. Means are over
residues only: BOS, EOS and padding never enter them.
"""

from __future__ import annotations

import pytest
import torch

from esmc import ESMProteinTensor, LogitsConfig
from esmc.inference import run_logits
from helpers.models import TINY, encode_all, pad, random_sequences, rel_err

pytestmark = pytest.mark.model
TOLERANCE = 1e-5
LENGTHS = [40, 1, 13, 7, 29]  # mixed, unsorted, one single residue
EVERYTHING = LogitsConfig(
    sequence=True,
    return_embeddings=True,
    return_hidden_states=True,
    return_mean_embedding=True,
    return_mean_hidden_states=True,
)


@pytest.fixture(scope="module")
def tokens() -> list[torch.Tensor]:
    return encode_all(random_sequences(LENGTHS, seed=3))


@pytest.fixture(scope="module")
def singles(tiny_model, tokens):
    """Each sequence through the padded forward alone: (logits, embeddings, hidden states)."""
    with torch.no_grad():
        outs = [tiny_model(t[None]) for t in tokens]
    return [(o.sequence_logits[0], o.embeddings[0], o.hidden_states[:, 0]) for o in outs]


def assert_same(actual: torch.Tensor, single: torch.Tensor) -> None:
    assert actual.shape == single.shape
    assert rel_err(actual, single) <= TOLERANCE


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_run_logits_equals_single_sequences(tiny_model, tokens, singles, packed):
    outputs = run_logits(tiny_model, tokens, [EVERYTHING] * len(tokens), packed=packed)
    for out, (logits, embeddings, hidden) in zip(outputs, singles):
        assert_same(out.logits.sequence, logits)
        assert_same(out.embeddings, embeddings)
        assert_same(out.hidden_states, hidden)
        assert_same(out.mean_embedding, embeddings[1:-1].mean(0))
        assert_same(out.mean_hidden_states, hidden[:, 1:-1].mean(1))


def test_forward_packed_equals_single_sequences(tiny_model, tokens, singles):
    flat = torch.cat(tokens)  # (T,)
    lengths = torch.tensor([len(t) for t in tokens])
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    with torch.no_grad():
        out = tiny_model.forward_packed(
            flat, cu_seqlens, int(lengths.max()), hidden_layers=range(TINY.n_layers)
        )
    assert out.sequence_logits.shape == (int(lengths.sum()), 64)
    for i, (logits, embeddings, hidden) in enumerate(singles):
        rows = slice(int(cu_seqlens[i]), int(cu_seqlens[i + 1]))
        assert_same(out.sequence_logits[rows], logits)
        assert_same(out.embeddings[rows], embeddings)
        assert_same(out.hidden_states[:, rows], hidden)


def test_padded_forward_equals_single_sequences(tiny_model, tokens, singles):
    with torch.no_grad():
        out = tiny_model(pad(tokens))
    for b, (logits, embeddings, hidden) in enumerate(singles):
        n = len(tokens[b])
        assert_same(out.sequence_logits[b, :n], logits)
        assert_same(out.embeddings[b, :n], embeddings)
        assert_same(out.hidden_states[:, b, :n], hidden)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_mean_is_over_residues_only(tiny_model, tokens, singles, packed):
    """Mean of rows 1..L (hand-computed), not of all rows with BOS/EOS (nor any padding)."""
    outputs = run_logits(tiny_model, tokens, [EVERYTHING] * len(tokens), packed=packed)
    for out, (_, embeddings, hidden) in zip(outputs, singles):
        residues = embeddings.shape[0] - 2
        by_hand = sum(embeddings[i] for i in range(1, residues + 1)) / residues
        assert_same(out.mean_embedding, by_hand)
        with_specials = embeddings.mean(0)
        assert rel_err(out.mean_embedding, with_specials) > 1e-2
        assert_same(out.mean_hidden_states, hidden[:, 1 : residues + 1].mean(1))
        assert rel_err(out.mean_hidden_states, hidden.mean(1)) > 1e-2


def test_logits_call_means_exclude_padding(tiny_model, tokens, singles):
    """ESMC.logits on a padded (B, L) batch: each row's mean is its own residues' mean."""
    config = LogitsConfig(return_mean_embedding=True, return_mean_hidden_states=True)
    out = tiny_model.logits(ESMProteinTensor(sequence=pad(tokens)), config)
    assert out.mean_embedding.shape == (len(tokens), TINY.d_model)
    assert out.mean_hidden_states.shape == (TINY.n_layers, len(tokens), TINY.d_model)
    for b, (_, embeddings, hidden) in enumerate(singles):
        assert_same(out.mean_embedding[b], embeddings[1:-1].mean(0))
        assert_same(out.mean_hidden_states[:, b], hidden[:, 1:-1].mean(1))
    short = LENGTHS.index(1)  # one residue padded to 42 rows: its mean is that residue's row
    assert_same(out.mean_embedding[short], singles[short][1][1])
