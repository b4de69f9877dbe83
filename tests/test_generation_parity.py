"""Generation parity with the official ``esm`` package on the same random weights.

The reference's ``iterative_sampling_tokens`` runs offline with its own ``ESMC`` as the
client. It needs a tokenizer collection; it reads only ``sequence`` (the real
``EsmSequenceTokenizer``) and, to build an all-mask dummy for the ``function`` track it
stacks but never samples, ``function.depth`` and the function track's mask/BOS/EOS/pad
ids. A ``SimpleNamespace`` with those two entries is enough (``hasattr`` must be False for
the other tracks, so they stay ``None``).

Deterministic settings (``strategy="entropy"``):
- temperature 0 without annealing: argmax in both;
- temperature 0 *with* annealing: the reference never samples at temperature 0 then
  (``max(0 - t / (n - 1), 0.001) ** 2 = 1e-6``); it draws from softmax(logits / 1e-6),
  which in float32 is exactly one-hot whenever the best logit leads by more than ~1e-4
  (true on these weights), so both pick the argmax whatever the seed.
Beyond the brief: with ``torch.manual_seed(s)`` for the reference and ``seed=s`` here,
the stochastic settings (``random`` strategy, temperature 1, annealing, top-p) give the
same tokens too, because both make the same random draws in the same order.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from esmc.config import ESMCConfig
from esmc.generation import GenerationState, batch_generate, generate, sequence_logits
from esmc import ESMC
from esmc.tokenizer import RESIDUES, encode
from esmc.types import GenerationConfig

pytestmark = pytest.mark.parity

pytest.importorskip("esm")
import esm.sdk  # noqa: E402,F401  (must come before esm.models.esmc: circular import)
from esm.models.esmc import ESMC as ReferenceESMC  # noqa: E402
from esm.sdk.api import ESMProteinTensor as ReferenceProteinTensor  # noqa: E402
from esm.sdk.api import GenerationConfig as ReferenceGenerationConfig  # noqa: E402
from esm.tokenization import EsmSequenceTokenizer  # noqa: E402
from esm.utils.generation import iterative_sampling_tokens  # noqa: E402


def _prompts() -> list[str]:
    rng = random.Random(4)
    long = "".join("_" if rng.random() < 0.3 else rng.choice(RESIDUES[:20]) for _ in range(80))
    return ["MKT___LL__AC_DE", "_" * 20, "_MKTAYIAKQR_", "AC|__DE|K_", long]


PROMPTS = _prompts()
STEPS = (1, 3, 8, 20)


@pytest.fixture(scope="module")
def models() -> tuple[ReferenceESMC, ESMC]:
    torch.manual_seed(0)
    config = ESMCConfig(d_model=64, n_heads=1, n_layers=2)
    reference = ReferenceESMC(64, 1, 2, EsmSequenceTokenizer(), use_flash_attn=False).eval()
    ours = ESMC(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.fixture(scope="module")
def tokenizers() -> SimpleNamespace:
    # stand-in ids: the function track is filled with its mask and never sampled
    function = SimpleNamespace(
        depth=8, mask_token_id=0, bos_token_id=1, eos_token_id=2, pad_token_id=3
    )
    return SimpleNamespace(sequence=EsmSequenceTokenizer(), function=function)


@pytest.fixture(autouse=True)
def quiet_reference(monkeypatch):
    monkeypatch.setenv("DISABLE_ITERATIVE_SAMPLING_TQDM", "1")


def reference_generate(reference, tokenizers, prompts: list[str], **fields) -> list[torch.Tensor]:
    """The reference's lockstep batch over ``prompts``, one fresh config each."""
    inputs = [ReferenceProteinTensor(sequence=encode(p)) for p in prompts]
    configs = [ReferenceGenerationConfig(track="sequence", **fields) for _ in prompts]
    outputs = iterative_sampling_tokens(reference, inputs, configs, tokenizers)
    for out in outputs:
        assert isinstance(out, ReferenceProteinTensor), out
    return [out.sequence for out in outputs]


@pytest.mark.parametrize("annealing", [False, True], ids=["no_annealing", "annealing"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("num_steps", STEPS)
def test_entropy_temperature_zero_matches_reference(
    models, tokenizers, annealing, schedule, num_steps
):
    reference, ours = models
    fields = dict(
        strategy="entropy",
        schedule=schedule,
        num_steps=num_steps,
        temperature=0.0,
        temperature_annealing=annealing,
    )
    torch.manual_seed(0)
    expected = reference_generate(reference, tokenizers, PROMPTS, **fields)
    config = GenerationConfig(track="sequence", **fields)
    for prompt, want in zip(PROMPTS, expected):
        for seed in (0, 1):  # deterministic: the seed does not matter
            got = generate(ours, encode(prompt), config, seed=seed).sequence
            assert torch.equal(got, want), (prompt, got.tolist(), want.tolist())


def test_reference_entropies_are_of_the_filtered_distribution(models, tokenizers):
    """top_p and invalid_ids change which position is least uncertain, in both."""
    reference, ours = models
    fields = dict(
        strategy="entropy",
        num_steps=5,
        temperature=0.0,
        temperature_annealing=False,
        top_p=0.3,
        invalid_ids=[5, 6, 9, 12],
    )
    expected = reference_generate(reference, tokenizers, PROMPTS, **fields)
    got = batch_generate(ours, [encode(p) for p in PROMPTS], [GenerationConfig(**fields)] * 5)
    assert [torch.equal(g.sequence, e) for g, e in zip(got, expected)] == [True] * 5


@pytest.mark.parametrize(
    "fields",
    [
        dict(strategy="random", temperature=1.0, num_steps=6),
        dict(strategy="random", temperature=0.7, temperature_annealing=False, num_steps=4),
        dict(strategy="entropy", temperature=1.2, top_p=0.9, num_steps=8, schedule="linear"),
        dict(strategy="random", temperature=0.0, num_steps=3, invalid_ids=[4, 20]),
    ],
    ids=["random_annealed", "random_t07", "entropy_top_p", "random_t0_invalid"],
)
def test_seeded_stochastic_generation_matches_reference(models, tokenizers, fields):
    reference, ours = models
    for i, prompt in enumerate(PROMPTS):
        torch.manual_seed(100 + i)  # the reference draws from the global generator
        (want,) = reference_generate(reference, tokenizers, [prompt], **fields)
        got = generate(ours, encode(prompt), GenerationConfig(**fields), seed=100 + i).sequence
        assert torch.equal(got, want), (prompt, got.tolist(), want.tolist())


def test_reference_step_count_is_ours(models, tokenizers):
    """Our state's step count is the reference's clamped num_steps (it mutates its config)."""
    reference, ours = models
    prompt = "MK___T"
    config = ReferenceGenerationConfig(track="sequence", num_steps=20)
    iterative_sampling_tokens(
        reference, [ReferenceProteinTensor(sequence=encode(prompt))], [config], tokenizers
    )
    state = GenerationState(encode(prompt), GenerationConfig(num_steps=20), seed=0)
    forwards = 0
    while not state.done:
        state.advance(sequence_logits(ours, [state.tokens])[0])
        forwards += 1
    assert config.num_steps == state.num_steps == forwards == 3
