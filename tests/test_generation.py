"""Generation and forward_and_sample on a tiny random ESMC."""

from __future__ import annotations

import random

import pytest
import torch

from esmc.config import ESMCConfig
from esmc.generation import (
    GenerationState,
    batch_generate,
    forward_and_sample,
    generate,
    sequence_logits,
)
from esmc.inference import run_logits
from esmc import ESMC
from esmc.sampling import UnsupportedTrackError, allowed_ids, filter_logits
from esmc.tokenizer import BOS_ID, EOS_ID, MASK_ID, RESIDUES, decode, encode
from esmc.types import (
    ESMProtein,
    ESMProteinTensor,
    GenerationConfig,
    LogitsConfig,
    SamplingConfig,
    SamplingTrackConfig,
)

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model() -> ESMC:
    torch.manual_seed(0)
    return ESMC(ESMCConfig(d_model=64, n_heads=1, n_layers=2)).eval()


def prompt(length: int, masked: float, rng: random.Random) -> str:
    """``length`` residues, each masked with probability ``masked``."""
    chars = ("_" if rng.random() < masked else rng.choice(RESIDUES[:20]) for _ in range(length))
    return "".join(chars)


def test_generation_fills_only_masks_in_num_steps(model):
    tokens = encode("MKT___LL__AC_DE_")
    config = GenerationConfig(num_steps=4, strategy="random", temperature=0.8)
    state = GenerationState(tokens, config, seed=7)
    steps = []
    while not state.done:
        steps.append(state.advance(sequence_logits(model, [state.tokens])[0]))
    assert [s.step for s in steps] == [0, 1, 2, 3] and [s.done for s in steps] == [0, 0, 0, 1]
    final = torch.tensor(steps[-1].sequence_tokens)
    masked = tokens == MASK_ID
    assert torch.equal(final[~masked], tokens[~masked])  # BOS, EOS and residues kept
    assert final[0] == BOS_ID and final[-1] == EOS_ID and MASK_ID not in final.tolist()
    filled = sorted(p for s in steps for p in s.positions)
    assert filled == (masked.nonzero().flatten() - 1).tolist()  # every mask exactly once
    for before, step in zip([tokens.tolist()] + [s.sequence_tokens for s in steps], steps):
        changed = [i - 1 for i, (a, b) in enumerate(zip(before, step.sequence_tokens)) if a != b]
        assert changed == list(step.positions)
        assert all(before[p + 1] == MASK_ID for p in step.positions)
        assert [step.sequence_tokens[p + 1] for p in step.positions] == list(step.tokens)
    annealed = [0.8**2, (0.8 - 1 / 3) ** 2, (0.8 - 2 / 3) ** 2, 0.001**2]
    assert [s.temperature for s in steps] == pytest.approx(annealed)
    filled_so_far = torch.tensor([len(s.positions) for s in steps]).cumsum(0)
    left = (int(masked.sum()) - filled_so_far).tolist()
    assert [s.sequence.count("_") for s in steps] == left


def test_num_steps_clamped_to_masks(model):
    state = GenerationState(encode("MK__T"), GenerationConfig(num_steps=20), seed=0)
    forwards = 0
    while not state.done:
        state.advance(sequence_logits(model, [state.tokens])[0])
        forwards += 1
    assert state.num_steps == 2 and forwards == 2


def test_same_seed_same_protein(model):
    config = GenerationConfig(num_steps=5, temperature=1.0)
    protein = ESMProtein(sequence="M__________K")
    first = generate(model, protein, config, seed=123)
    assert isinstance(first, ESMProtein) and "_" not in first.sequence
    assert generate(model, protein, config, seed=123) == first
    others = {generate(model, protein, config, seed=s).sequence for s in range(4)}
    assert len(others) > 1
    as_tensor = generate(model, ESMProteinTensor(sequence=encode(protein.sequence)), config, 123)
    assert isinstance(as_tensor, ESMProteinTensor) and decode(as_tensor.sequence) == first.sequence


def test_interleaved_batched_generations_equal_each_alone(model):
    """16 generations joining at different forwards, packed with each other and with plain
    logits work, give exactly the proteins each gives alone with the same seed."""
    rng = random.Random(0)
    jobs = []
    for i in range(16):
        config = GenerationConfig(
            num_steps=rng.choice([1, 3, 5, 8]),
            strategy=rng.choice(["random", "entropy"]),
            schedule=rng.choice(["cosine", "linear"]),
            temperature=rng.choice([0.0, 0.7, 1.0]),
            temperature_annealing=rng.random() < 0.5,
            top_p=rng.choice([1.0, 0.9]),
        )
        tokens = encode(prompt(rng.randint(5, 60), 0.5, rng) + "_")
        jobs.append((tokens, config, 1000 + i, rng.randint(0, 6)))  # joins at that forward
    alone = [generate(model, t, c, seed=s).sequence for t, c, s, _ in jobs]

    states: dict[int, GenerationState] = {}
    forwards = 0
    filler = [encode(prompt(30, 0.0, rng)) for _ in range(3)]  # unrelated Logits work
    while len(states) < len(jobs) or any(not s.done for s in states.values()):
        for i, (tokens, config, seed, start) in enumerate(jobs):
            if start == forwards:
                states[i] = GenerationState(tokens, config, seed)
        active = [i for i, s in states.items() if not s.done]
        batch = [states[i].tokens for i in active] + filler[: 1 + forwards % 3]
        logits = sequence_logits(model, batch)
        for i, rows in zip(active, logits):
            states[i].advance(rows)
        forwards += 1
    together = [states[i].tokens for i in range(16)]
    assert [torch.equal(a, b) for a, b in zip(alone, together)] == [True] * 16
    assert forwards < sum(s.num_steps for s in states.values())


def test_batch_generate_equals_generate(model):
    rng = random.Random(1)
    prompts = [ESMProtein(sequence=prompt(n, 0.4, rng) + "_") for n in (8, 25, 50)]
    configs = [GenerationConfig(num_steps=n, strategy="entropy") for n in (2, 6, 4)]
    together = batch_generate(model, prompts, configs, seeds=[1, 2, 3])
    alone = [generate(model, p, c, seed=s) for p, c, s in zip(prompts, configs, [1, 2, 3])]
    assert together == alone


# -- forward_and_sample ----------------------------------------------------------------------


def test_forward_and_sample_samples_masks_with_reference_statistics(model):
    tokens = encode("MKT___LL__AC")
    track = SamplingTrackConfig(temperature=0.0, invalid_ids=[4], topk_logprobs=3)
    config = SamplingConfig(
        sequence=track, return_per_residue_embeddings=True, return_mean_embedding=True
    )
    out = forward_and_sample(model, ESMProteinTensor(sequence=tokens), config)
    logits_config = LogitsConfig(sequence=True, return_embeddings=True)
    forward = run_logits(model, [tokens], [logits_config])[0]
    log_probs = filter_logits(forward.logits.sequence, 1.0, allowed_ids([4])).log_softmax(-1)
    masked = tokens == MASK_ID
    sampled = out.protein_tensor.sequence
    assert torch.equal(sampled[~masked], tokens[~masked])
    assert torch.equal(sampled[masked], log_probs[masked].argmax(-1))
    assert 4 not in sampled[masked].tolist()
    expected_logprob = torch.where(masked, log_probs.gather(-1, sampled[:, None])[:, 0], 0.0)
    torch.testing.assert_close(out.logprob.sequence, expected_logprob)
    torch.testing.assert_close(out.prob.sequence, expected_logprob.exp())
    torch.testing.assert_close(out.top_prob.sequence, log_probs.exp().max(-1).values)
    torch.testing.assert_close(out.topk_logprob.sequence, log_probs.topk(3).values)
    assert torch.equal(out.topk_tokens.sequence, log_probs.topk(3).indices)
    entropy = -(log_probs.exp() * log_probs.clamp(min=-1e30)).sum(-1)
    torch.testing.assert_close(out.entropy.sequence, entropy)
    torch.testing.assert_close(out.per_residue_embedding, forward.embeddings)
    torch.testing.assert_close(out.mean_embedding, forward.embeddings[1:-1].mean(0))


def test_forward_and_sample_rules_for_positions_and_seed(model):
    tokens = encode("MKT___LL__AC")
    track = SamplingTrackConfig(only_sample_masked_tokens=False, invalid_ids=[20])
    everywhere = SamplingConfig(sequence=track)
    out = forward_and_sample(model, tokens, everywhere, seed=3)
    sampled = out.protein_tensor.sequence
    assert sampled[0] == BOS_ID and sampled[-1] == EOS_ID and sampled[1] == 20  # M kept
    assert out.logprob.sequence[1] == 0 and (out.logprob.sequence[2:-1] < 0).all()
    again = forward_and_sample(model, tokens, everywhere, seed=3)
    assert torch.equal(again.protein_tensor.sequence, sampled)
    default = forward_and_sample(model, ESMProtein(sequence="MK__"))
    assert default.protein_tensor.sequence[[0, 1, 2, 5]].tolist() == [0, 20, 15, 2]
    assert MASK_ID not in default.protein_tensor.sequence.tolist()
    assert default.topk_logprob is None and default.mean_embedding is None


def test_forward_and_sample_rejects_other_tracks(model):
    with pytest.raises(UnsupportedTrackError, match="structure"):
        forward_and_sample(model, encode("MK__"), SamplingConfig(structure=SamplingTrackConfig()))
