"""Sampling the sequence track: pure tensor functions with the reference's semantics.

Every function here follows ``esm.utils.sampling`` / ``esm.utils.generation`` step for step
(same float32 arithmetic, same order of random draws) so that a generation seeded here and
the reference seeded the same way pick the same tokens. Randomness always comes from an
explicit ``torch.Generator``, never from the global one.

One reference detail worth knowing: its sampler applies top-p and the invalid-id mask to
the logits in place before it takes the log-softmax, so the entropies, probabilities and
log-probabilities it reports (and the entropy strategy's ordering) are those of the
*filtered*, untempered distribution. :func:`sample_logits_step` does the same.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace

import attrs
import torch

from esmc.tokenizer import EMBED_ROWS, SPECIAL_IDS, VOCAB_SIZE
from esmc.types import SCHEDULES as SCHEDULE_NAMES
from esmc.types import STRATEGIES, TRACKS, GenerationConfig, SamplingConfig, SamplingTrackConfig

MAX_TOPK_LOGPROBS = 32
"""Largest ``topk_logprobs`` for the sequence track (the reference's ``MAX_TOPK_SEQUENCE``)."""

ANNEALING_FLOOR = 0.001
"""Annealed temperatures never go below this value squared."""

SEQUENCE_TRACKS = ("", "sequence")
"""Track names that mean the sequence track (the reference's default is the empty string)."""


class SamplingConfigError(ValueError):
    """A generation or sampling config that cannot be honoured; the message names the field."""


class UnsupportedTrackError(SamplingConfigError):
    """A track other than ``sequence``: ESMC has no head for it."""


class NoMasksError(ValueError):
    """Iterative sampling was asked for an input without any mask position."""


# -- schedules -------------------------------------------------------------------------------


def cosine_schedule(progress: torch.Tensor) -> torch.Tensor:
    """Fraction of the masks left after ``progress`` in [0, 1] (MaskGIT's cosine)."""
    return torch.cos(progress * math.pi * 0.5)


def linear_schedule(progress: torch.Tensor) -> torch.Tensor:
    """Fraction of the masks left after ``progress`` in [0, 1], falling linearly."""
    return 1 - progress


SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
}


def tokens_to_fill(
    step: int, num_steps: int, total_masks: int, still_masked: int, schedule: str
) -> int:
    """How many masked positions step ``step`` (0-based) fills.

    ``still_masked - int(schedule((step + 1) / num_steps) * total_masks + 0.1)``, computed
    in float32 as the reference does (``+ 0.1`` guards against 66.99999 truncating to 66).
    """
    progress = torch.tensor((step + 1) / num_steps)  # float32 scalar
    left_after = int(SCHEDULES[schedule](progress) * total_masks + 0.1)
    return still_masked - left_after


def step_temperature(step: int, num_steps: int, temperature: float, annealing: bool) -> float:
    """Temperature of step ``step``: ``max(T0 - step / max(1, n - 1), 0.001) ** 2`` if annealing.

    With annealing the temperature is never 0 (at least 1e-6), even for ``T0 = 0``.
    """
    if not annealing:
        return temperature
    return max(temperature - step / max(1, num_steps - 1), ANNEALING_FLOOR) ** 2


# -- logits -> tokens ------------------------------------------------------------------------


def allowed_ids(
    invalid_ids: Sequence[int] = (), device: torch.device | None = None
) -> torch.Tensor:
    """(64,) bool: True for ids that may be sampled (residue ids not in ``invalid_ids``).

    Special ids and the unused rows 33..63 are never allowed.
    """
    allowed = torch.zeros(EMBED_ROWS, dtype=torch.bool, device=device)
    allowed[:VOCAB_SIZE] = True
    allowed[list(SPECIAL_IDS)] = False
    allowed[list(invalid_ids)] = False
    return allowed


def top_p_filter(logits: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Per row keep the most likely ids whose cumulative probability is <= ``top_p``.

    ``top_p``: one value (>= 1: no filtering), or one per row as an (N, 1) tensor in the
    logits' dtype where ``inf`` marks a row that is not filtered. The best id is always kept.
    The others get the dtype's lowest finite value (as the reference does, not -inf).
    Returns a new tensor (``logits`` itself when no row is filtered).
    """
    if not isinstance(top_p, torch.Tensor):
        if top_p >= 1.0:
            return logits
        top_p = torch.tensor(top_p, dtype=logits.dtype, device=logits.device)
    if bool(torch.isinf(top_p).all()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    keep_sorted = sorted_logits.softmax(-1).cumsum(-1) <= top_p  # (N, 64)
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)


def filter_logits(
    logits: torch.Tensor, top_p: float | torch.Tensor, allowed: torch.Tensor
) -> torch.Tensor:
    """Top-p first, then ids that may not be sampled to -inf (the reference's order).

    ``allowed``: (64,) for every row, or (N, 64) per row."""
    return top_p_filter(logits, top_p).masked_fill(~allowed, -torch.inf)


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row's distribution, (N, 64) log-probabilities -> (N,)."""
    return torch.distributions.Categorical(logits=log_probs).entropy()


def tempered_probabilities(
    filtered_logits: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """softmax(logits / T) per row, (N, 64); T is a positive float32 scalar or (N, 1) tensor.

    A row left without a finite logit (top-p kept only ids that may not be sampled, and
    T < 1 pushed the rest to -inf) falls back to its argmax instead of NaN.
    """
    probs = torch.softmax(filtered_logits / temperature, dim=-1)
    broken = ~torch.isfinite(probs).all(-1)  # (N,)
    if broken.any():
        best = filtered_logits[broken].argmax(-1)
        probs[broken] = torch.nn.functional.one_hot(best, probs.shape[-1]).to(probs.dtype)
    return probs


@dataclasses.dataclass(frozen=True)
class SampledLogits:
    """One sampling pass over logits rows (all tensors on the logits' device)."""

    tokens: torch.Tensor  # (N,) int64, the sampled id of every row
    probabilities: torch.Tensor  # (N,) of that id under the tempered distribution sampled from
    entropy: torch.Tensor  # (N,) nats, untempered filtered distribution
    log_probs: torch.Tensor  # (N, 64) untempered filtered log-softmax


@dataclasses.dataclass(frozen=True)
class RowSettings:
    """How one request samples its rows."""

    temperature: float
    top_p: float
    allowed: torch.Tensor  # (64,) bool


@dataclasses.dataclass(frozen=True)
class SamplingRows:
    """One request's rows, filtered and softmaxed, waiting for its random draw."""

    filtered: torch.Tensor  # (N, 64) filtered logits
    log_probs: torch.Tensor  # (N, 64) untempered filtered log-softmax
    entropy: torch.Tensor  # (N,)
    probs: torch.Tensor | None  # (N, 64) tempered probabilities; None at temperature 0

    def draw(self, generator: torch.Generator | None) -> SampledLogits:
        """Temperature 0 takes the argmax (no random draw); otherwise one multinomial draw
        per row with ``generator`` (the only step that uses randomness)."""
        if self.probs is None:
            tokens = self.filtered.argmax(-1)
            probabilities = torch.ones_like(self.entropy)
        else:
            tokens = torch.multinomial(self.probs, 1, generator=generator).squeeze(-1)
            probabilities = self.probs.gather(-1, tokens[:, None]).squeeze(-1)
        return SampledLogits(tokens, probabilities, self.entropy, self.log_probs)


def prepare_rows(logits: Sequence[torch.Tensor], settings: Sequence[RowSettings]) -> list[SamplingRows]:
    """Filtering, temperature, top-p, softmax and entropy for many requests' rows at once.

    ``logits[i]`` (N_i, 64) are request ``i``'s rows, sampled per ``settings[i]``. Every row
    is computed exactly as it would be alone (row-wise operations only), so a request's
    draw gives the same ids whatever it is batched with. Only :meth:`SamplingRows.draw`
    remains, per request, with its own generator.
    """
    if len(logits) != len(settings):
        raise ValueError("one RowSettings per logits block is required")
    if not logits:
        return []
    rows = torch.cat(list(logits)) if len(logits) > 1 else logits[0]  # (T, 64)
    dtype, device = rows.dtype, rows.device
    counts = torch.tensor([int(x.shape[0]) for x in logits], device=device)

    def per_row(values: list[float]) -> torch.Tensor:  # (T, 1) in the logits' dtype
        column = torch.tensor(values, dtype=dtype, device=device)
        return column.repeat_interleave(counts)[:, None]

    top_p = per_row([s.top_p if s.top_p < 1.0 else math.inf for s in settings])
    allowed = torch.stack([s.allowed.to(device) for s in settings]).repeat_interleave(counts, 0)
    filtered = filter_logits(rows, top_p, allowed)  # (T, 64)
    log_probs = filtered.log_softmax(-1)
    row_entropy = entropy(log_probs)  # (T,)
    temperatures = per_row([s.temperature for s in settings])
    tempered = temperatures != 0
    probs = None
    if bool(tempered.any()):
        probs = tempered_probabilities(filtered, torch.where(tempered, temperatures, 1.0))
    out, start = [], 0
    for x, t in zip(logits, temperatures[counts.cumsum(0) - 1, 0].tolist()):
        part = slice(start, start + int(x.shape[0]))
        start = part.stop
        out.append(
            SamplingRows(
                filtered[part],
                log_probs[part],
                row_entropy[part],
                None if t == 0 else probs[part],
            )
        )
    return out


def sample_logits_step(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    allowed: torch.Tensor,
    generator: torch.Generator | None,
) -> SampledLogits:
    """Sample one id per row of ``logits`` (N, 64) as the reference's sampler does.

    Temperature 0 takes the argmax (no random draw); otherwise one multinomial draw per
    row from softmax(filtered / T) with ``generator``. The sampling runs on the logits'
    device; pass CPU float32 logits and a CPU generator for reproducible runs.
    """
    settings = RowSettings(temperature, top_p, allowed)
    return prepare_rows([logits], [settings])[0].draw(generator)


# -- validation ------------------------------------------------------------------------------


def check_track(track: str) -> None:
    """Raise :class:`UnsupportedTrackError` unless ``track`` is the sequence track."""
    if track in SEQUENCE_TRACKS:
        return
    if track in TRACKS:
        raise UnsupportedTrackError(
            f"ESMC has no {track!r} track; only 'sequence' can be sampled or generated"
        )
    raise UnsupportedTrackError(f"unknown track {track!r}; ESMC generates only 'sequence'")


def check_temperature(temperature: float, field: str = "temperature") -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise SamplingConfigError(f"{field} must be a number, got {temperature!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SamplingConfigError(f"{field} must be finite and >= 0, got {temperature}")


def check_top_p(top_p: float, field: str = "top_p") -> None:
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise SamplingConfigError(f"{field} must be in (0, 1], got {top_p!r}")


def check_invalid_ids(invalid_ids: Sequence[int], field: str = "invalid_ids") -> None:
    if isinstance(invalid_ids, (str, bytes)) or not isinstance(invalid_ids, Iterable):
        raise SamplingConfigError(f"{field} must be a list of integers, got {invalid_ids!r}")
    for token_id in invalid_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise SamplingConfigError(f"{field} must hold integers, got {token_id!r}")
        if not 0 <= token_id < EMBED_ROWS:
            raise SamplingConfigError(
                f"{field} holds {token_id}, outside the vocabulary ids 0..{EMBED_ROWS - 1}"
            )
    if not allowed_ids(invalid_ids).any():
        raise SamplingConfigError(f"{field} excludes every residue id: nothing left to sample")


def validate_generation_config(config: GenerationConfig) -> None:
    """Raise a :class:`SamplingConfigError` naming the first field ESMC cannot honour."""
    check_track(config.track)
    if config.schedule not in SCHEDULE_NAMES:
        raise SamplingConfigError(
            f"unknown schedule {config.schedule!r}; expected one of {', '.join(SCHEDULE_NAMES)}"
        )
    if config.strategy not in STRATEGIES:
        raise SamplingConfigError(
            f"unknown strategy {config.strategy!r}; expected one of {', '.join(STRATEGIES)}"
        )
    steps = config.num_steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise SamplingConfigError(f"num_steps must be an integer >= 1, got {steps!r}")
    check_temperature(config.temperature)
    check_top_p(config.top_p)
    check_invalid_ids(config.invalid_ids)


def generation_config(**fields) -> GenerationConfig:
    """A :class:`GenerationConfig` from field values, checked with this module's messages.

    Use it to build configs from untrusted input: the attrs class itself would reject an
    unknown schedule or strategy with a less helpful message.
    """
    known = {f.name for f in attrs.fields(GenerationConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise SamplingConfigError(f"unknown GenerationConfig field(s): {', '.join(unknown)}")
    defaults = GenerationConfig()
    checked = SimpleNamespace(**{name: fields.get(name, getattr(defaults, name)) for name in known})
    validate_generation_config(checked)
    return GenerationConfig(**fields)


def validate_track_config(config: SamplingTrackConfig, track: str = "sequence") -> None:
    """Check one track's sampling settings; field names are prefixed with the track."""
    check_temperature(config.temperature, f"{track}.temperature")
    check_top_p(config.top_p, f"{track}.top_p")
    check_invalid_ids(config.invalid_ids, f"{track}.invalid_ids")
    k = config.topk_logprobs
    in_range = isinstance(k, numbers.Integral) and 0 <= k <= MAX_TOPK_LOGPROBS
    if isinstance(k, bool) or not in_range:
        raise SamplingConfigError(
            f"{track}.topk_logprobs must be an integer in 0..{MAX_TOPK_LOGPROBS}, got {k!r}"
        )


def validate_sampling_config(config: SamplingConfig) -> None:
    """Only the sequence track may be set; its settings must be valid."""
    for track in TRACKS:
        if track != "sequence" and getattr(config, track) is not None:
            check_track(track)
    if config.sequence is not None:
        validate_track_config(config.sequence)
