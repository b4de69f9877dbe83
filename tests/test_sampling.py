"""Sampling and the generation state machine on made-up logits: no model."""

from __future__ import annotations

import math

import pytest
import torch

from esmc.generation import GenerationState, resolve_seed
from esmc.sampling import (
    NoMasksError,
    SamplingConfigError,
    UnsupportedTrackError,
    allowed_ids,
    generation_config,
    sample_logits_step,
    step_temperature,
    tokens_to_fill,
    top_p_filter,
    validate_generation_config,
    validate_sampling_config,
)
from esmc.tokenizer import MASK_ID, SPECIAL_IDS, encode
from esmc.types import GenerationConfig, SamplingConfig, SamplingTrackConfig

pytestmark = pytest.mark.unit


TOTALS = (1, 2, 3, 5, 7, 10, 20, 33, 64, 100, 257, 1000)
STEP_COUNTS = (1, 2, 3, 4, 5, 8, 10, 20, 50)


def fills(total: int, num_steps: int, schedule: str) -> list[int]:
    """Tokens filled per step for ``total`` masks (num_steps clamped as the reference)."""
    n = min(num_steps, total)
    still, out = total, []
    for step in range(n):
        k = tokens_to_fill(step, n, total, still, schedule)
        out.append(k)
        still -= k
    return out


# -- schedule ----------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_fills_follow_reference_formula_and_sum_to_masks(schedule):
    fn = {"cosine": lambda x: math.cos(x * math.pi / 2), "linear": lambda x: 1 - x}[schedule]
    for total in TOTALS:
        for num_steps in STEP_COUNTS:
            counts = fills(total, num_steps, schedule)
            assert sum(counts) == total and min(counts) >= 0
            n, left = len(counts), total
            for step, k in enumerate(counts):
                # float64 formula; the float32 one differs only within 1e-6 of an integer
                exact = fn((step + 1) / n) * total + 0.1
                assert left - k in (int(exact), int(exact + 1e-5), int(exact - 1e-5))
                left -= k


def test_fills_hand_computed():
    # cosine, 10 masks, 4 steps: 9.34 -> 9, 7.17 -> 7, 3.93 -> 3, 0.1 -> 0 left
    assert fills(10, 4, "cosine") == [1, 2, 4, 3]
    assert fills(10, 4, "linear") == [3, 2, 3, 2]
    # 20 masks in 20 steps: the cosine barely moves at first, step 0 fills nothing
    assert fills(20, 20, "cosine")[0] == 0
    # the + 0.1: float32 cos(0.3 pi / 2) * 10 = 8.91 keeps 9 masked, not 8
    assert tokens_to_fill(2, 10, 10, 10, "cosine") == 1
    # float32 (1 - 0.6) * 10 = 3.9999998 keeps 4 masked
    assert tokens_to_fill(5, 10, 10, 5, "linear") == 1
    # more steps than masks: GenerationState clamps to one mask per step
    state = GenerationState(encode("A__A"), GenerationConfig(num_steps=20), seed=0)
    assert state.num_steps == 2


def test_fills_equal_reference_package():
    pytest.importorskip("esm")
    import esm.sdk  # noqa: F401  (import order the reference needs)
    from esm.utils.noise_schedules import NOISE_SCHEDULE_REGISTRY

    for schedule in ("cosine", "linear"):
        ref = NOISE_SCHEDULE_REGISTRY[schedule]
        for total in TOTALS:
            for num_steps in STEP_COUNTS:
                n, still = min(num_steps, total), total
                for step in range(n):
                    left = (ref(torch.tensor((step + 1) / n)) * torch.tensor(total) + 0.1).int()
                    expected = still - int(left)
                    assert tokens_to_fill(step, n, total, still, schedule) == expected
                    still -= expected


# -- temperature ---------------------------------------------------------------------------------


def test_annealed_temperatures():
    temps = [step_temperature(t, 5, 1.0, True) for t in range(5)]
    assert temps == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 1e-6])
    temps = [step_temperature(t, 3, 0.7, True) for t in range(3)]
    assert temps == pytest.approx([0.49, 0.04, 1e-6])
    assert step_temperature(0, 1, 1.3, True) == pytest.approx(1.69)
    # temperature 0 with annealing is never 0: the floor 0.001 squared
    assert step_temperature(0, 4, 0.0, True) == pytest.approx(1e-6)
    assert [step_temperature(t, 4, 0.8, False) for t in range(4)] == [0.8] * 4


def test_annealed_temperatures_equal_reference_package():
    pytest.importorskip("esm")
    import esm.sdk  # noqa: F401
    from esm.utils.generation import _get_annealed_temperature

    for n in (1, 2, 5, 20):
        for t0 in (0.0, 0.5, 1.0, 2.0):
            for t in range(n):
                assert step_temperature(t, n, t0, True) == _get_annealed_temperature(t, n, t0)


# -- top-p, invalid ids, sampling ---------------------------------------------------------------


def peaked_logits(probs: dict[int, float]) -> torch.Tensor:
    """(1, 64) logits whose softmax puts ``probs`` on those ids (others ~0)."""
    logits = torch.full((1, 64), -30.0)
    for i, p in probs.items():
        logits[0, i] = math.log(p)
    return logits


def test_top_p_keeps_expected_set():
    logits = peaked_logits({4: 0.5, 5: 0.3, 6: 0.15, 7: 0.05})
    lowest = torch.finfo(torch.float32).min

    def kept(top_p):
        return set(torch.nonzero(top_p_filter(logits, top_p)[0] > lowest).flatten().tolist())

    assert kept(0.85) == {4, 5}
    assert kept(0.96) == {4, 5, 6}
    assert kept(0.1) == {4}  # the best is always kept
    assert top_p_filter(logits, 1.0) is logits
    assert kept(0.85) and logits[0, 6] == math.log(0.15)  # input unchanged


def test_top_p_equals_reference_package():
    pytest.importorskip("esm")
    import esm.sdk  # noqa: F401
    from esm.utils.sampling import top_p_logits

    logits = torch.randn(40, 64, generator=torch.Generator().manual_seed(0)) * 3
    for top_p in (0.05, 0.3, 0.9, 0.999):
        assert torch.equal(top_p_filter(logits, top_p), top_p_logits(logits.clone(), top_p))


def test_special_and_invalid_ids_never_sampled():
    logits = torch.zeros(200, 64)
    logits[:, list(SPECIAL_IDS)] = 50.0
    logits[:, 40:] = 50.0
    logits[:, [4, 5]] = 49.0  # invalid below, still the best allowed
    allowed = allowed_ids([4, 5])
    assert allowed.sum() == 25 and not allowed[[0, 1, 2, 3, 4, 5, 31, 32, 33, 63]].any()
    gen = torch.Generator().manual_seed(0)
    sampled = sample_logits_step(logits, temperature=1.0, top_p=1.0, allowed=allowed, generator=gen)
    assert allowed[sampled.tokens].all()
    assert len(set(sampled.tokens.tolist())) > 10  # uniform over the 25 allowed ids
    greedy = sample_logits_step(logits, temperature=0.0, top_p=1.0, allowed=allowed, generator=None)
    assert greedy.tokens.tolist() == [6] * 200  # first allowed id among equal logits
    assert greedy.probabilities.tolist() == [1.0] * 200


def test_probabilities_are_of_the_tempered_distribution_and_entropy_untempered():
    logits = peaked_logits({4: 0.6, 5: 0.3, 6: 0.1})
    gen = torch.Generator().manual_seed(1)
    out = sample_logits_step(
        logits, temperature=0.5, top_p=1.0, allowed=allowed_ids(), generator=gen
    )
    tempered = torch.softmax(logits[0, 4:7] / 0.5, -1)
    token = int(out.tokens[0])
    assert out.probabilities[0].item() == pytest.approx(tempered[token - 4].item(), rel=1e-5)
    p = torch.tensor([0.6, 0.3, 0.1])
    assert out.entropy[0].item() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-4)


def test_sampler_equals_reference_sampler_with_same_seed():
    pytest.importorskip("esm")
    import esm.sdk  # noqa: F401
    from esm.sdk.api import SamplingTrackConfig as RefTrackConfig
    from esm.utils.generation import _sample_track

    logits = torch.randn(1, 30, 64, generator=torch.Generator().manual_seed(2)) * 2
    tokens = torch.full((1, 30), MASK_ID)
    # (with top_p < 1 and T < 1 the reference crashes on rows whose top-p set holds only
    # ids that may not be sampled; see test_top_p_leaving_no_allowed_id_falls_back_to_argmax)
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.5, 0.8), (0.0, 0.5)):
        valid = allowed_ids([7]).nonzero().flatten().tolist()
        torch.manual_seed(5)
        ref = _sample_track(
            logits.clone(),
            tokens,
            RefTrackConfig(temperature=temperature, top_p=top_p),
            MASK_ID,
            valid,
        )
        ours = sample_logits_step(
            logits[0],
            temperature=temperature,
            top_p=top_p,
            allowed=allowed_ids([7]),
            generator=torch.Generator().manual_seed(5),
        )
        inner = slice(1, -1)  # the reference keeps BOS/EOS positions unsampled
        assert torch.equal(ours.tokens[inner], ref["sampled_tokens"][0, inner])
        assert torch.equal(ours.entropy, ref["entropy"][0])


def test_top_p_leaving_no_allowed_id_falls_back_to_argmax():
    logits = peaked_logits({MASK_ID: 0.9, 4: 0.06, 9: 0.04}).repeat(3, 1)
    gen = torch.Generator().manual_seed(0)
    out = sample_logits_step(
        logits, temperature=0.5, top_p=0.5, allowed=allowed_ids(), generator=gen
    )
    # top-p kept only <mask>; the residues are all at the lowest float, 4 is the first
    assert out.tokens.tolist() == [4, 4, 4] and out.probabilities.tolist() == [1.0] * 3


# -- the state machine on made-up logits ---------------------------------------------------------


def sharpness_logits(sharpness: list[float]) -> torch.Tensor:
    """(len, 64) logits: row i prefers id 4 + i % 20 with the given sharpness (entropy falls
    as sharpness grows)."""
    logits = torch.zeros(len(sharpness), 64)
    for i, s in enumerate(sharpness):
        logits[i, 4 + i % 20] = s
    return logits


def test_entropy_strategy_fills_lowest_entropy_first():
    tokens = encode("_" * 8)  # (10,)
    sharp = [0.0, 3.0, 8.0, 1.0, 6.0, 2.0, 7.0, 4.0, 5.0, 0.0]  # BOS, 8 residues, EOS
    config = GenerationConfig(
        strategy="entropy", num_steps=4, temperature=0.0, temperature_annealing=False
    )
    state = GenerationState(tokens, config, seed=0)
    logits = sharpness_logits(sharp)
    allowed = allowed_ids()
    probs = torch.softmax(logits[:, allowed], -1)  # the 25 residue ids
    entropy = -(probs * probs.log()).sum(-1)  # (10,)
    by_entropy = sorted(range(8), key=lambda r: -sharp[r + 1])  # residues, lowest entropy first
    filled = []
    while not state.done:
        step = state.advance(logits)
        n = len(step.positions)
        assert list(step.positions) == sorted(by_entropy[len(filled) : len(filled) + n])
        assert step.entropies == pytest.approx(entropy[[r + 1 for r in step.positions]].tolist())
        filled += sorted(step.positions, key=lambda r: -sharp[r + 1])
        assert list(step.tokens) == [4 + (r + 1) % 20 for r in step.positions]
    assert filled == by_entropy
    assert MASK_ID not in state.tokens.tolist()


def test_random_strategy_is_reproducible_from_seed():
    tokens = encode("M" + "_" * 40 + "K")
    logits = torch.randn(44, 64, generator=torch.Generator().manual_seed(3))

    def run(seed):
        state = GenerationState(tokens, GenerationConfig(num_steps=6), seed=seed)
        return [state.advance(logits) for _ in range(state.num_steps)]

    first, again, other = run(11), run(11), run(12)
    assert first == again
    assert first[-1].sequence_tokens != other[-1].sequence_tokens
    assert first[-1].done and not first[-2].done
    assert sorted(p for s in first for p in s.positions) == list(range(1, 41))


def test_unseeded_state_records_its_seed():
    tokens = encode("A___A")
    state = GenerationState(tokens, GenerationConfig(), seed=None)
    replay = GenerationState(tokens, GenerationConfig(), seed=state.seed)
    logits = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    assert state.advance(logits) == replay.advance(logits)


def test_state_only_changes_masks_and_rejects_extra_steps():
    tokens = encode("MK_T_L")
    state = GenerationState(tokens, GenerationConfig(num_steps=2), seed=0)
    logits = torch.randn(8, 64)
    while not state.done:
        step = state.advance(logits)
    assert step.sequence.startswith("MK") and step.sequence[3] == "T" and "_" not in step.sequence
    assert state.tokens[[0, 1, 2, 4, 6, 7]].tolist() == tokens[[0, 1, 2, 4, 6, 7]].tolist()
    with pytest.raises(RuntimeError, match="finished"):
        state.advance(logits)
    with pytest.raises(ValueError, match="shape"):
        GenerationState(tokens, GenerationConfig(), seed=0).advance(torch.randn(7, 64))


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strategy": "greedy"}, "unknown strategy 'greedy'"),
        ({"schedule": "cubic"}, "unknown schedule 'cubic'"),
        ({"num_steps": 0}, "num_steps must be an integer >= 1"),
        ({"temperature": -0.1}, "temperature must be finite and >= 0"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"temperature": float("nan")}, "temperature must be finite"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
        ({"invalid_ids": [64]}, "outside the vocabulary ids 0..63"),
        ({"invalid_ids": [-1]}, "outside the vocabulary ids 0..63"),
        ({"invalid_ids": list(range(4, 31))}, "nothing left to sample"),
        ({"colour": "red"}, "unknown GenerationConfig field"),
    ],
)
def test_bad_generation_configs_are_named(fields, message):
    with pytest.raises(SamplingConfigError, match=message):
        generation_config(**fields)


@pytest.mark.parametrize("track", ["structure", "secondary_structure", "sasa", "function", "xyz"])
def test_tracks_other_than_sequence_are_unsupported(track):
    with pytest.raises(UnsupportedTrackError, match=repr(track)):
        generation_config(track=track)
    with pytest.raises(UnsupportedTrackError):
        GenerationState(encode("A_A"), GenerationConfig(track=track), seed=0)
    if track != "xyz":
        with pytest.raises(UnsupportedTrackError, match="only 'sequence'"):
            validate_sampling_config(SamplingConfig(**{track: SamplingTrackConfig()}))


def test_sequence_track_names_accepted():
    for track in ("", "sequence"):
        validate_generation_config(GenerationConfig(track=track))
    validate_sampling_config(SamplingConfig(sequence=SamplingTrackConfig(topk_logprobs=32)))


@pytest.mark.parametrize(
    ("track_config", "message"),
    [
        (SamplingTrackConfig(temperature=-1.0), "sequence.temperature"),
        (SamplingTrackConfig(top_p=0.0), "sequence.top_p"),
        (SamplingTrackConfig(invalid_ids=[99]), "sequence.invalid_ids"),
        (SamplingTrackConfig(topk_logprobs=33), "sequence.topk_logprobs"),
        (SamplingTrackConfig(topk_logprobs=-1), "sequence.topk_logprobs"),
    ],
)
def test_bad_sampling_configs_are_named(track_config, message):
    with pytest.raises(SamplingConfigError, match=message):
        validate_sampling_config(SamplingConfig(sequence=track_config))


def test_input_without_masks_is_an_error():
    with pytest.raises(NoMasksError, match="Cannot sample sequence when input has no masks"):
        GenerationState(encode("MKTAYL"), GenerationConfig(), seed=0)


def test_bad_seeds_are_named():
    assert resolve_seed(0) == 0 and resolve_seed(2**64 - 1) == 2**64 - 1
    for seed in (-1, 2**64, 1.5, True):
        with pytest.raises(SamplingConfigError, match="seed"):
            resolve_seed(seed)
