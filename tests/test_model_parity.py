"""Parity with the official ``esm`` package and with ``transformers`` 5.23.0 on random weights.

Tolerance: relative error (max |ours - reference| / max |reference|) <= 1e-5 in float32.
"""

from __future__ import annotations

import pytest
import torch

from esmc import CONFIGS, ESMC, ESMProteinTensor, LogitsConfig
from esmc.weights import load_pretrained
from helpers.checkpoints import transformers_model
from helpers.models import (
    TINY,
    encode_all,
    pad,
    random_model,
    random_sequences,
    randomize_,
    reference_esmc,
    rel_err,
    transformers_config,
)

pytestmark = pytest.mark.parity
TOLERANCE = 1e-5
LENGTHS = [1, 6, 19, 42]


@pytest.fixture(scope="module")
def model() -> ESMC:
    return random_model(TINY, seed=1)


@pytest.fixture(scope="module")
def reference(model):
    return reference_esmc(TINY, model.state_dict())


@pytest.fixture(scope="module")
def tokens() -> list[torch.Tensor]:
    sequences = random_sequences(LENGTHS, seed=1)
    sequences[2] = sequences[2][:5] + "__" + sequences[2][7:]  # masks inside one sequence
    return encode_all(sequences)


def shapes(module: torch.nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) <= TOLERANCE


# -- the esm package ---------------------------------------------------------------------------


def test_state_dict_keys_and_shapes_tiny(model, reference):
    assert list(shapes(model)) == list(shapes(reference))
    assert shapes(model) == shapes(reference)


@pytest.mark.parametrize("name", ["esmc-300m", "esmc-600m"])
def test_state_dict_keys_and_shapes_published_sizes(name):
    config = CONFIGS[name]
    with torch.device("meta"):
        ours, theirs = ESMC(config), reference_esmc(config)
    assert shapes(ours) == shapes(theirs)
    assert len(ours.transformer.blocks) == config.n_layers


def test_single_sequences_match_reference(model, reference, tokens):
    with torch.no_grad():
        for t in tokens:
            ours, theirs = model(t[None]), reference(sequence_tokens=t[None])
            assert_close(ours.sequence_logits, theirs.sequence_logits)
            assert_close(ours.embeddings, theirs.embeddings)
            assert ours.hidden_states.shape[0] == TINY.n_layers
            for layer in range(TINY.n_layers):
                assert_close(ours.hidden_states[layer], theirs.hidden_states[layer])


def test_padded_batch_matches_reference(model, reference, tokens):
    batch = pad(tokens)  # (4, 44) of mixed lengths
    with torch.no_grad():
        ours, theirs = model(batch), reference(sequence_tokens=batch)
    for b, t in enumerate(tokens):
        n = len(t)
        assert_close(ours.sequence_logits[b, :n], theirs.sequence_logits[b, :n])
        assert_close(ours.embeddings[b, :n], theirs.embeddings[b, :n])
        for layer in range(TINY.n_layers):
            assert_close(ours.hidden_states[layer, b, :n], theirs.hidden_states[layer, b, :n])


def test_outputs_are_not_trivial(model, tokens):
    """The comparisons above mean something: random weights give varied, large outputs."""
    with torch.no_grad():
        out = model(tokens[3][None])
    assert out.sequence_logits.std() > 0.1
    assert out.embeddings.std() > 0.5
    assert not torch.allclose(out.hidden_states[0], out.hidden_states[-1])


def reference_logits_config(**fields):
    from esm.sdk.api import LogitsConfig as ReferenceLogitsConfig

    return ReferenceLogitsConfig(**fields)


def reference_input(sequence: torch.Tensor):
    from esm.sdk.api import ESMProteinTensor as ReferenceProteinTensor
    from esm.utils.sampling import _BatchedESMProteinTensor

    if sequence.ndim == 1:
        return ReferenceProteinTensor(sequence=sequence)
    return _BatchedESMProteinTensor(sequence=sequence)


@pytest.mark.parametrize("layer", [-1, 0, 2, -2])
@pytest.mark.parametrize("batched", [False, True])
def test_logits_call_matches_reference(model, reference, tokens, layer, batched):
    fields = dict(
        sequence=True, return_embeddings=True, return_hidden_states=True, ith_hidden_layer=layer
    )
    sequence = pad(tokens) if batched else tokens[2]
    ours = model.logits(ESMProteinTensor(sequence=sequence), LogitsConfig(**fields))
    theirs = reference.logits(reference_input(sequence), reference_logits_config(**fields))
    assert_close(ours.logits.sequence, theirs.logits.sequence)
    assert_close(ours.embeddings, theirs.embeddings)
    assert_close(ours.hidden_states, theirs.hidden_states)
    expected_layers = TINY.n_layers if layer == -1 else 1
    assert ours.hidden_states.shape[:2] == (expected_layers, len(tokens) if batched else 1)


def test_logits_call_returns_only_what_is_asked(model, tokens):
    out = model.logits(ESMProteinTensor(sequence=tokens[1]), LogitsConfig(return_embeddings=True))
    assert out.logits.sequence is None and out.hidden_states is None
    assert out.embeddings.shape == (1, len(tokens[1]), TINY.d_model)


# -- transformers EsmcForMaskedLM ----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model():
    """A transformers EsmcForMaskedLM with its own random weights."""
    from transformers import EsmcForMaskedLM

    return randomize_(EsmcForMaskedLM(transformers_config(TINY)), seed=2).eval()


@pytest.fixture(scope="module")
def loaded_from_hf(hf_model, tmp_path_factory) -> ESMC:
    """Our ESMC loaded from what ``save_pretrained`` wrote (the true layout, sharded)."""
    directory = tmp_path_factory.mktemp("transformers")
    hf_model.save_pretrained(directory, max_shard_size="300KB")
    assert (directory / "model.safetensors.index.json").is_file()
    return load_pretrained(directory)


def test_transformers_layout_loads_with_its_shape(loaded_from_hf):
    c = loaded_from_hf.config
    assert (c.d_model, c.n_heads, c.n_layers) == (TINY.d_model, TINY.n_heads, TINY.n_layers)


def test_transformers_padded_batch_matches(hf_model, loaded_from_hf, tokens):
    batch = pad(tokens)
    attention_mask = (batch != 1).long()
    with torch.no_grad():
        theirs = hf_model(batch, attention_mask=attention_mask, output_hidden_states=True)
        ours = loaded_from_hf(batch)
    for b, t in enumerate(tokens):
        n = len(t)  # their pad rows attend to residues, ours to pad: compare residues only
        assert_close(ours.sequence_logits[b, :n], theirs.logits[b, :n])
        assert_close(ours.embeddings[b, :n], theirs.hidden_states[-1][b, :n])


def test_transformers_single_sequences_match(hf_model, loaded_from_hf, tokens):
    with torch.no_grad():
        for t in tokens:
            theirs = hf_model(t[None], output_hidden_states=True)
            ours = loaded_from_hf(t[None])
            assert_close(ours.sequence_logits, theirs.logits)
            assert_close(ours.embeddings, theirs.hidden_states[-1])


def test_transformers_hidden_states_numbering(hf_model, loaded_from_hf, tokens):
    """transformers' hidden_states has n_layers + 1 entries:

    [0] the embedding output (before any block); [i + 1] our block i (hidden_states[i]) for
    i < n_layers - 1; [n_layers] the final normalised state (our ``embeddings``), not the last
    block's output. Ours (the reference's numbering): hidden_states[i] = block i's output
    before the final norm, i = 0 .. n_layers - 1.
    """
    n = TINY.n_layers
    t = tokens[3][None]
    with torch.no_grad():
        theirs = hf_model(t, output_hidden_states=True).hidden_states
        ours = loaded_from_hf(t)
        embedded = loaded_from_hf.embed(t)
    assert len(theirs) == n + 1
    assert torch.equal(theirs[0], embedded)
    for i in range(n - 1):
        assert_close(ours.hidden_states[i], theirs[i + 1])
    assert_close(ours.embeddings, theirs[n])
    assert rel_err(ours.hidden_states[n - 1], theirs[n]) > 0.1  # the last block, before the norm
    assert rel_err(ours.hidden_states[0], theirs[0]) > 0.1  # index 0 is not the same thing
