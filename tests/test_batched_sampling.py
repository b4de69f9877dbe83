"""Batched sampling of generation steps gives exactly the tokens of the per-request sampler.

The reference below is a verbatim copy of the per-row sampler as it was before sampling was
batched (``esmc/sampling.py`` and ``GenerationState.advance`` at commit 3a2c203): filtering,
temperature, top-p, softmax and entropy per request, then its draws. The batched path
(:func:`esmc.generation.advance_all`) must give bit-identical steps for every mix of settings.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.models import random_model, random_sequences

from esmc.generation import GenerationState, GenerationStep, advance_all, sequence_logits
from esmc.sampling import (
    SampledLogits,
    allowed_ids,
    entropy,
    prepare_rows,
    RowSettings,
    sample_logits_step,
    step_temperature,
)
from esmc.tokenizer import MASK_ID, encode
from esmc.types import GenerationConfig

pytestmark = pytest.mark.unit


# -- the per-request sampler before batching (reference, copied verbatim) ----------------------


def ref_top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    threshold = torch.tensor(top_p, dtype=logits.dtype, device=logits.device)
    keep_sorted = sorted_logits.softmax(-1).cumsum(-1) <= threshold  # (N, 64)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def ref_filter_logits(logits, top_p, allowed):
    return ref_top_p_filter(logits, top_p).masked_fill(~allowed, -torch.inf)


def ref_tempered_probabilities(filtered_logits, temperature):
    probs = torch.softmax(filtered_logits / temperature, dim=-1)
    broken = ~torch.isfinite(probs).all(-1)  # (N,)
    if broken.any():
        best = filtered_logits[broken].argmax(-1)
        probs[broken] = torch.nn.functional.one_hot(best, probs.shape[-1]).to(probs.dtype)
    return probs


def ref_sample_logits_step(logits, *, temperature, top_p, allowed, generator) -> SampledLogits:
    filtered = ref_filter_logits(logits, top_p, allowed.to(logits.device))  # (N, 64)
    log_probs = filtered.log_softmax(-1)
    row_entropy = entropy(log_probs)  # (N,)
    t = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
    if t == 0:
        tokens = filtered.argmax(-1)
        probabilities = torch.ones_like(row_entropy)
    else:
        probs = ref_tempered_probabilities(filtered, t)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        probabilities = probs.gather(-1, tokens[:, None]).squeeze(-1)
    return SampledLogits(tokens, probabilities, row_entropy, log_probs)


def ref_advance(state: GenerationState, logits: torch.Tensor) -> GenerationStep:
    """GenerationState.advance before batching, on the state's own fields."""
    logits = logits.detach().to("cpu", torch.float32)
    temperature = step_temperature(
        state._step, state.num_steps, state.config.temperature, state.config.temperature_annealing
    )
    sampled = ref_sample_logits_step(
        logits,
        temperature=temperature,
        top_p=state.config.top_p,
        allowed=state._allowed,
        generator=state._generator,
    )
    where = state._positions_to_fill(sampled)
    state._tokens[where] = sampled.tokens[where]
    state._step += 1
    return GenerationStep(
        step=state._step - 1,
        num_steps=state.num_steps,
        positions=tuple((where - 1).tolist()),
        tokens=tuple(sampled.tokens[where].tolist()),
        probabilities=tuple(sampled.probabilities[where].tolist()),
        entropies=tuple(sampled.entropy[where].tolist()),
        temperature=float(temperature),
        sequence_tokens=tuple(state._tokens.tolist()),
        done=state.done,
    )


# -- cases ---------------------------------------------------------------------------------------


def mixed_cases(n: int, seed: int = 0):
    """(tokens, config, seed) covering every setting the sampler honours, mixed in one batch."""
    rng = random.Random(seed)
    temperatures = [0.0, 1e-46, 0.3, 0.7, 1.0, 1.7]
    top_ps = [1.0, 0.999999, 0.9, 0.5, 0.05]
    invalid = [[], [4], [5, 6, 7, 8, 9, 10], list(range(4, 23))]
    cases = []
    for i, sequence in enumerate(random_sequences([rng.randint(3, 60) for _ in range(n)], seed)):
        tokens = encode(sequence)
        masks = [p for p in range(1, len(tokens) - 1) if rng.random() < 0.6] or [1]
        tokens[masks] = MASK_ID
        config = GenerationConfig(
            num_steps=rng.randint(1, 12),
            temperature=temperatures[i % len(temperatures)],
            temperature_annealing=bool(i % 4 == 1),
            top_p=top_ps[i % len(top_ps)],
            invalid_ids=invalid[i % len(invalid)],
            strategy="entropy" if i % 3 == 0 else "random",
            schedule="linear" if i % 5 == 0 else "cosine",
        )
        cases.append((tokens, config, 1000 + i))
    return cases


def fake_logits(state: GenerationState, step: int, case: int) -> torch.Tensor:
    """Logits with ties, large magnitudes and -inf entries: the edges of the sampler."""
    g = torch.Generator().manual_seed(case * 1000 + step)
    logits = torch.randn(len(state), 64, generator=g) * (1 + 4 * (case % 3))
    logits[:, 40:] = -torch.inf if case % 2 else logits[:, 40:]
    if case % 5 == 2:
        logits[:, 5:9] = logits[:, 4:5]  # ties
    return logits


def test_batched_steps_equal_the_per_request_sampler():
    cases = mixed_cases(40)
    batched = [GenerationState(t, c, s) for t, c, s in cases]
    alone = [GenerationState(t, c, s) for t, c, s in cases]
    active = list(range(len(cases)))
    steps = 0
    while active:
        logits = [fake_logits(batched[i], batched[i].step, i) for i in active]
        got = advance_all([batched[i] for i in active], logits)
        for i, x, step in zip(active, logits, got):
            assert step == ref_advance(alone[i], x)
            steps += 1
        active = [i for i in active if not batched[i].done]
    assert steps > 100
    for b, a in zip(batched, alone):
        assert torch.equal(b.tokens, a.tokens)


def test_batched_generation_on_a_model_equals_the_per_request_sampler():
    model = random_model()
    cases = mixed_cases(12, seed=5)
    batched = [GenerationState(t, c, s) for t, c, s in cases]
    active = list(batched)
    while active:
        advance_all(active, sequence_logits(model, [s.tokens for s in active]))
        active = [s for s in active if not s.done]
    for (tokens, config, seed), state in zip(cases, batched):
        alone = GenerationState(tokens, config, seed)
        while not alone.done:
            ref_advance(alone, sequence_logits(model, [alone.tokens])[0])
        assert torch.equal(state.tokens, alone.tokens)


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("top_p", [1.0, 0.95, 0.3])
def test_one_request_equals_the_reference_bit_for_bit(temperature, top_p):
    logits = torch.randn(37, 64, generator=torch.Generator().manual_seed(3)) * 3
    allowed = allowed_ids([4, 9])
    ours = sample_logits_step(
        logits, temperature=temperature, top_p=top_p, allowed=allowed,
        generator=torch.Generator().manual_seed(7),
    )
    ref = ref_sample_logits_step(
        logits, temperature=temperature, top_p=top_p, allowed=allowed,
        generator=torch.Generator().manual_seed(7),
    )
    for a, b in zip(
        (ours.tokens, ours.probabilities, ours.entropy, ours.log_probs),
        (ref.tokens, ref.probabilities, ref.entropy, ref.log_probs),
    ):
        assert torch.equal(a, b)


def test_rows_are_prepared_as_if_alone():
    """Each request's filtered logits, log-probs, entropies and probabilities do not depend
    on its batch-mates."""
    g = torch.Generator().manual_seed(11)
    blocks = [torch.randn(n, 64, generator=g) * 2 for n in (5, 1, 30, 12)]
    settings = [
        RowSettings(1.0, 0.9, allowed_ids()),
        RowSettings(0.0, 1.0, allowed_ids([4])),
        RowSettings(0.5, 0.5, allowed_ids(range(5, 15))),
        RowSettings(1.3, 1.0, allowed_ids()),
    ]
    together = prepare_rows(blocks, settings)
    for block, setting, rows in zip(blocks, settings, together):
        (alone,) = prepare_rows([block], [setting])
        assert torch.equal(rows.filtered, alone.filtered)
        assert torch.equal(rows.log_probs, alone.log_probs)
        assert torch.equal(rows.entropy, alone.entropy)
        assert (rows.probs is None) == (alone.probs is None)
        if rows.probs is not None:
            assert torch.equal(rows.probs, alone.probs)
