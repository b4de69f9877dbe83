"""Iterative sampling (generation) as a small state machine per request.

A :class:`GenerationState` holds one request's tokens, step, schedule and random generator.
Whoever owns the model runs a forward on ``state.tokens`` (alone, or packed with any other
work) and hands that protein's logits to :meth:`GenerationState.advance`, which does one
step exactly as the reference's ``iterative_sampling_tokens`` does and returns a
:class:`GenerationStep`. Because sampling uses only the request's own generator, a seeded
generation gives the same protein whatever it shares its forwards with.

:func:`generate` and :func:`batch_generate` drive the same states with the library's own
forwards; :func:`forward_and_sample` is one forward plus one sampling pass.
"""

from __future__ import annotations

import dataclasses
import numbers
import secrets
from collections.abc import Sequence

import attrs
import torch

from esmc.inference import run_logits
from esmc.model import ESMCNetwork
from esmc.sampling import (
    NoMasksError,
    RowSettings,
    SampledLogits,
    SamplingConfigError,
    SamplingRows,
    allowed_ids,
    prepare_rows,
    sample_logits_step,
    step_temperature,
    tokens_to_fill,
    validate_generation_config,
    validate_sampling_config,
)
from esmc.tokenizer import EMBED_ROWS, MASK_ID, decode, encode, validate_ids
from esmc.types import (
    ESMProtein,
    ESMProteinTensor,
    ForwardAndSampleOutput,
    ForwardTrackData,
    GenerationConfig,
    LogitsConfig,
    LogitsOutput,
    SamplingConfig,
    SamplingTrackConfig,
)

MAX_SEED = 2**64 - 1

ProteinInput = ESMProtein | ESMProteinTensor | torch.Tensor


def resolve_seed(seed: int | None) -> int:
    """``seed`` checked to lie in 0..2**64-1, or a fresh random one when None."""
    if seed is None:
        return secrets.randbits(63)
    in_range = isinstance(seed, numbers.Integral) and 0 <= seed <= MAX_SEED
    if isinstance(seed, bool) or not in_range:
        raise SamplingConfigError(f"seed must be an integer in 0..2**64-1, got {seed!r}")
    return int(seed)


def input_tokens(input: ProteinInput) -> torch.Tensor:
    """The (L+2,) int64 CPU token ids of a protein, its tokens, or a token tensor; validated."""
    if isinstance(input, ESMProtein):
        if input.sequence is None:
            raise ValueError("the protein has no sequence")
        return encode(input.sequence)
    tokens = input.sequence if isinstance(input, ESMProteinTensor) else input
    if tokens is None:
        raise ValueError("the protein tensor has no sequence track")
    if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(
            f"tokens must be a 1-D integer tensor, got shape {tuple(tokens.shape)} {tokens.dtype}"
        )
    tokens = tokens.to("cpu", torch.long)
    validate_ids(tokens)
    return tokens


def masked_positions(tokens: torch.Tensor) -> torch.Tensor:
    """(L+2,) bool: mask tokens, BOS and EOS positions excluded."""
    masked = tokens == MASK_ID
    masked[0] = False
    masked[-1] = False
    return masked


# -- the state machine -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationStep:
    """What one step did. Positions are residue indices (0-based: token position - 1)."""

    step: int  # 0-based index of this step
    num_steps: int  # after clamping to the number of masks
    positions: tuple[int, ...]  # filled in this step, ascending
    tokens: tuple[int, ...]  # ids written there
    probabilities: tuple[float, ...]  # of those ids under the tempered distribution sampled
    entropies: tuple[float, ...]  # nats, untempered (filtered) distribution there
    temperature: float  # used in this step
    sequence_tokens: tuple[int, ...]  # (L+2) ids after this step, BOS and EOS included
    done: bool  # True on the last step: no mask is left

    @property
    def sequence(self) -> str:
        """The whole sequence after this step, ``_`` where still masked."""
        return decode(list(self.sequence_tokens))


class GenerationState:
    """One generation request: advance it once per forward until ``done``.

    ``tokens`` (L+2,) with ``<mask>`` where the model fills in. ``config.num_steps`` is
    clamped to the number of masks. ``seed`` seeds this request's own generator (a random
    seed is drawn and kept in :attr:`seed` when None). All state lives on the CPU.
    """

    def __init__(self, tokens: ProteinInput, config: GenerationConfig, seed: int | None = None):
        validate_generation_config(config)
        self._tokens = input_tokens(tokens).clone()  # (L+2,)
        self.total_masks = int(masked_positions(self._tokens).sum())
        if self.total_masks == 0:
            raise NoMasksError("Cannot sample sequence when input has no masks")
        num_steps = min(int(config.num_steps), self.total_masks)
        self.config = attrs.evolve(
            config, num_steps=num_steps, invalid_ids=[int(i) for i in config.invalid_ids]
        )
        self.seed = resolve_seed(seed)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._allowed = allowed_ids(self.config.invalid_ids)
        self._step = 0

    @property
    def step(self) -> int:
        """Steps done so far (the index of the next step)."""
        return self._step

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def done(self) -> bool:
        return self._step >= self.num_steps

    @property
    def tokens(self) -> torch.Tensor:
        """Current (L+2,) int64 CPU ids: the input of the next forward. Do not modify."""
        return self._tokens

    def __len__(self) -> int:
        return int(self._tokens.shape[0])

    def protein_tensor(self) -> ESMProteinTensor:
        return ESMProteinTensor(sequence=self._tokens.clone())

    def advance(self, logits: torch.Tensor) -> GenerationStep:
        """One step from this protein's logits (L+2, 64) of a forward on :attr:`tokens`."""
        return advance_all([self], [logits])[0]

    def settings(self) -> RowSettings:
        """How the next step samples: this step's temperature, top-p, the ids allowed."""
        if self.done:
            raise RuntimeError("this generation is finished; advance() has nothing to do")
        temperature = step_temperature(
            self._step, self.num_steps, self.config.temperature, self.config.temperature_annealing
        )
        return RowSettings(temperature, self.config.top_p, self._allowed)

    def check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` as CPU float32 after checking its shape is (L+2, 64)."""
        if tuple(logits.shape) != (len(self), EMBED_ROWS):
            raise ValueError(
                f"expected logits of shape ({len(self)}, {EMBED_ROWS}), got {tuple(logits.shape)}"
            )
        return logits.detach().to("cpu", torch.float32)

    def advance_from(self, rows: SamplingRows) -> GenerationStep:
        """One step from this protein's prepared rows (:func:`prepare_steps`): the random
        draw with this request's own generator, then the positions this step fills."""
        temperature = self.settings().temperature
        sampled = rows.draw(self._generator)
        where = self._positions_to_fill(sampled)  # (K,) token positions, ascending
        self._tokens[where] = sampled.tokens[where]
        self._step += 1
        return GenerationStep(
            step=self._step - 1,
            num_steps=self.num_steps,
            positions=tuple((where - 1).tolist()),
            tokens=tuple(sampled.tokens[where].tolist()),
            probabilities=tuple(sampled.probabilities[where].tolist()),
            entropies=tuple(sampled.entropy[where].tolist()),
            temperature=float(temperature),
            sequence_tokens=tuple(self._tokens.tolist()),
            done=self.done,
        )

    def _positions_to_fill(self, sampled: SampledLogits) -> torch.Tensor:
        """Token positions this step fills, by the schedule and the strategy."""
        masked = masked_positions(self._tokens)  # (L+2,)
        count = tokens_to_fill(
            self._step, self.num_steps, self.total_masks, int(masked.sum()), self.config.schedule
        )
        if self.config.strategy == "entropy":
            scores = sampled.entropy.masked_fill(~masked, torch.finfo(sampled.entropy.dtype).max)
            where = scores.topk(count, largest=False).indices
        else:
            candidates = masked.nonzero().squeeze(-1)  # (M,) ascending
            order = torch.randperm(len(candidates), generator=self._generator)
            where = candidates[order[:count]]
        return where.sort().values


# -- many states at once ---------------------------------------------------------------------


def prepare_steps(
    states: Sequence[GenerationState], logits: Sequence[torch.Tensor]
) -> list[SamplingRows]:
    """The next step of every state up to its random draw, over all their rows at once
    (filtering, temperature, top-p, softmax and entropy in one pass; no generator is used).
    ``logits[i]``: state ``i``'s (L_i+2, 64) logits. Raises before any state changes."""
    if len(states) != len(logits):
        raise ValueError("one logits tensor per generation state is required")
    checked = [state.check_logits(x) for state, x in zip(states, logits)]
    return prepare_rows(checked, [state.settings() for state in states])


def advance_all(
    states: Sequence[GenerationState], logits: Sequence[torch.Tensor]
) -> list[GenerationStep]:
    """One step of every state (batched sampling, then each state's own draws): each state
    gets exactly the step it would get from :meth:`GenerationState.advance` alone."""
    rows = prepare_steps(states, logits)
    return [state.advance_from(r) for state, r in zip(states, rows)]


# -- driving states with the library's forwards ----------------------------------------------


def sequence_logits(model: ESMCNetwork, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One packed forward over ``tokens``; each protein's (L+2, 64) float32 logits."""
    outputs = run_logits(model, tokens, [LogitsConfig(sequence=True)] * len(tokens))
    return [out.logits.sequence for out in outputs]


def batch_generate(
    model: ESMCNetwork,
    inputs: Sequence[ProteinInput],
    configs: Sequence[GenerationConfig],
    seeds: Sequence[int | None] | None = None,
) -> list[ESMProtein | ESMProteinTensor]:
    """Generate many proteins: every active one rides in each packed forward, and leaves
    as soon as it is done (continuous batching, not lockstep). All inputs are validated
    before the first forward. Each result has the type of its input (a tensor input gives
    an :class:`ESMProteinTensor`)."""
    if len(configs) != len(inputs) or (seeds is not None and len(seeds) != len(inputs)):
        raise ValueError("one config (and one seed, if given) per input is required")
    seeds = [None] * len(inputs) if seeds is None else seeds
    states = [GenerationState(x, c, s) for x, c, s in zip(inputs, configs, seeds)]
    active = list(states)
    while active:
        advance_all(active, sequence_logits(model, [s.tokens for s in active]))
        active = [s for s in active if not s.done]
    return [_as_input_type(x, s.tokens) for x, s in zip(inputs, states)]


def generate(
    model: ESMCNetwork, input: ProteinInput, config: GenerationConfig, seed: int | None = None
) -> ESMProtein | ESMProteinTensor:
    """Fill every mask of ``input`` in ``config.num_steps`` (clamped) forwards.

    An :class:`ESMProtein` gives an :class:`ESMProtein`; tokens give an
    :class:`ESMProteinTensor` (other tracks kept unchanged).
    """
    return batch_generate(model, [input], [config], [seed])[0]


def _as_input_type(input: ProteinInput, tokens: torch.Tensor) -> ESMProtein | ESMProteinTensor:
    if isinstance(input, ESMProtein):
        return attrs.evolve(input, sequence=decode(tokens))
    if isinstance(input, ESMProteinTensor):
        return attrs.evolve(input, sequence=tokens.clone())
    return ESMProteinTensor(sequence=tokens.clone())


# -- forward and sample ----------------------------------------------------------------------


def logits_config_for(config: SamplingConfig) -> LogitsConfig:
    """The forward outputs :func:`sample_from_logits` needs for ``config``."""
    return LogitsConfig(
        sequence=True,
        return_embeddings=config.return_per_residue_embeddings,
        return_mean_embedding=config.return_mean_embedding,
    )


def default_sampling_config() -> SamplingConfig:
    """Sample the sequence track at every mask, temperature 1, no top-p."""
    return SamplingConfig(sequence=SamplingTrackConfig())


def sample_from_logits(
    tokens: torch.Tensor,
    output: LogitsOutput,
    config: SamplingConfig,
    seed: int | None = None,
) -> ForwardAndSampleOutput:
    """Sampling half of :func:`forward_and_sample`, for a forward someone else ran.

    ``output`` is this protein's forward output for ``logits_config_for(config)``.
    Per-position outputs are (L+2,) (top-k: (L+2, k)); at positions not sampled the
    token is kept and ``logprob`` is 0 (``prob`` 1), as in the reference.
    ``mean_embedding`` is over residues only, like every mean in this library.
    """
    validate_sampling_config(config)
    track = config.sequence
    tokens = tokens.to("cpu", torch.long)
    fields = {}
    if track is None:
        fields["protein_tensor"] = ESMProteinTensor(sequence=tokens.clone())
    else:
        fields = _sample_sequence_track(tokens, output.logits.sequence, track, seed)
    return ForwardAndSampleOutput(
        per_residue_embedding=output.embeddings if config.return_per_residue_embeddings else None,
        mean_embedding=output.mean_embedding if config.return_mean_embedding else None,
        **fields,
    )


def forward_and_sample(
    model: ESMCNetwork,
    input: ProteinInput,
    sampling_config: SamplingConfig | None = None,
    seed: int | None = None,
) -> ForwardAndSampleOutput:
    """One forward, then sampling of the sequence track per ``sampling_config``."""
    config = default_sampling_config() if sampling_config is None else sampling_config
    validate_sampling_config(config)
    tokens = input_tokens(input)
    output = run_logits(model, [tokens], [logits_config_for(config)])[0]
    sampled = sample_from_logits(tokens, output, config, seed)
    if isinstance(input, ESMProteinTensor):
        sampled.protein_tensor = attrs.evolve(input, sequence=sampled.protein_tensor.sequence)
    return sampled


def _sample_sequence_track(
    tokens: torch.Tensor, logits: torch.Tensor, track: SamplingTrackConfig, seed: int | None
) -> dict:
    """Sampled tokens and per-position statistics, as ForwardAndSampleOutput fields."""
    sampled = sample_logits_step(
        logits.detach().to("cpu", torch.float32),  # (L+2, 64)
        temperature=track.temperature,
        top_p=track.top_p,
        allowed=allowed_ids(track.invalid_ids),
        generator=torch.Generator().manual_seed(resolve_seed(seed)),
    )
    where = _sampling_positions(tokens, track)  # (L+2,)
    new_tokens = torch.where(where, sampled.tokens, tokens)
    logprob = torch.zeros(len(tokens), dtype=sampled.log_probs.dtype)
    logprob[where] = sampled.log_probs[where, new_tokens[where]]
    k = track.topk_logprobs
    topk = sampled.log_probs.topk(k, dim=-1) if k > 0 else None
    return {
        "protein_tensor": ESMProteinTensor(sequence=new_tokens),
        "entropy": ForwardTrackData(sequence=sampled.entropy),
        "prob": ForwardTrackData(sequence=logprob.exp()),
        "logprob": ForwardTrackData(sequence=logprob),
        "top_prob": ForwardTrackData(sequence=sampled.log_probs.exp().max(-1).values),
        "topk_logprob": None if topk is None else ForwardTrackData(sequence=topk.values),
        "topk_tokens": None if topk is None else ForwardTrackData(sequence=topk.indices),
    }


def _sampling_positions(tokens: torch.Tensor, track: SamplingTrackConfig) -> torch.Tensor:
    """(L+2,) bool: where forward_and_sample writes a sampled token (the reference's rule).

    Never BOS/EOS; never a position holding one of ``invalid_ids`` (other than the mask);
    only masks when ``only_sample_masked_tokens``.
    """
    where = torch.ones_like(tokens, dtype=torch.bool)
    where[0] = False
    where[-1] = False
    excluded = sorted(set(int(i) for i in track.invalid_ids) - {MASK_ID})
    if excluded:
        where &= ~torch.isin(tokens, torch.tensor(excluded))
    if track.only_sample_masked_tokens:
        where &= tokens == MASK_ID
    return where
