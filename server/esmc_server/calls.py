"""One validated call per request: who asks, what it costs, and what it asks for.

Every wire layer (the gRPC readers, the HTTP JSON reader, the in-process embedder) turns its
request into one of the call types below, once; admission (:mod:`esmc_server.admission`)
charges its :class:`Cost` to its :class:`Caller` before anything is queued, and the engine
takes it as is. Plain frozen dataclasses: no protobuf, no JSON, no checks left to do.

Caller identity is the name the authentication layer gives the call's token (the token file's
``name:token`` lines); without authentication every call is the shared caller ``anonymous``,
or the client's own label from the ``esmc-caller`` metadata, bounded in length, characters
and number (:class:`CallerLabels`). Never a peer address.
"""

from __future__ import annotations

import contextvars
import dataclasses
import re
import threading

import torch

from esmc.generation import resolve_seed
from esmc.inference import InvalidLayerError, hidden_layer_indices
from esmc.sampling import validate_sampling_config
from esmc.scoring import ScoringPlan
from esmc.tokenizer import MASK_ID
from esmc.types import GenerationConfig, LogitsConfig, SamplingConfig
from esmc_server.errors import InvalidRequest


@dataclasses.dataclass(frozen=True)
class Caller:
    """Whom a call is charged to; ``name`` is the only metric label callers get."""

    name: str


ANONYMOUS = Caller("anonymous")
"""The caller of every call without a name (no authentication, no label)."""
INTERNAL = Caller("internal")
"""The server's own calls (warm-up)."""
OTHER = Caller("other")
"""Client labels beyond :attr:`CallerLabels.max_labels` share this caller."""

CURRENT_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar(
    "esmc_caller", default=None
)
"""Set by the authentication interceptor for the call it admitted (the token's name)."""

CALLER_METADATA = "esmc-caller"
"""Metadata key of a client's own label, used only when authentication is off."""
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CallerLabels:
    """Client-sent labels as callers: at most 64 characters of ``[A-Za-z0-9._-]``, and at most
    ``max_labels`` distinct ones (later labels share :data:`OTHER`); anything else, or no label,
    is :data:`ANONYMOUS`. Thread-safe."""

    def __init__(self, max_labels: int = 64):
        self.max_labels = max_labels
        self._known: dict[str, Caller] = {}
        self._lock = threading.Lock()

    def caller(self, label: str | None) -> Caller:
        if not label or not _LABEL.fullmatch(label):
            return ANONYMOUS
        with self._lock:
            known = self._known.get(label)
            if known is not None:
                return known
            if len(self._known) >= self.max_labels:
                return OTHER
            known = self._known[label] = Caller(label)
            return known


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a call costs the device: ``forwards`` sequences of ``tokens`` tokens each (BOS and
    EOS included), and the size of its response (an upper bound, 0 when not known)."""

    tokens: int
    forwards: int = 1
    response_bytes: int = 0

    @property
    def token_forwards(self) -> int:
        """Tokens the device computes for the whole call: its unit of admission."""
        return self.tokens * self.forwards

    def describe(self) -> str:
        """E.g. ``"16,386 forwards of 16,386 tokens (268,500,996 token-forwards)"``."""
        forwards = "1 forward" if self.forwards == 1 else f"{self.forwards:,} forwards"
        return f"{forwards} of {self.tokens:,} tokens ({self.token_forwards:,} token-forwards)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Call:
    """What every call carries besides its work."""

    caller: Caller = ANONYMOUS
    deadline: float | None = None  # monotonic seconds; None: none
    cost: Cost


@dataclasses.dataclass(frozen=True, kw_only=True)
class LogitsCall(Call):
    """One protein's forward outputs (Logits, one Embed item, the HTTP logits route)."""

    tokens: torch.Tensor  # (L+2,) int64 on the CPU
    config: LogitsConfig
    layers: tuple[int, ...] = ()  # hidden blocks the config asks for (reference numbering)
    dtype: torch.dtype = torch.float32  # of the outputs (means taken in float32 first)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleCall(Call):
    """One forward, then sampling (ForwardAndSample)."""

    tokens: torch.Tensor
    sampling: SamplingConfig
    seed: int | None = None
    dtype: torch.dtype = torch.float32  # of the float outputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerateCall(Call):
    """Iterative unmasking (Generate): ``cost.forwards`` is its number of steps."""

    tokens: torch.Tensor  # with at least one masked position
    config: GenerationConfig
    seed: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoreCall(Call):
    """Masked copies of one protein (ScoreVariants, PseudoLogLikelihood): ``plan`` is an
    :class:`esmc.scoring.ScoringPlan`; ``cost.forwards`` is its number of copies."""

    plan: ScoringPlan
    id: str = ""  # a PseudoLogLikelihoodStream item's id


# -- building calls: each check in one place ----------------------------------------------


def checked_layers(config: LogitsConfig, n_layers: int, field: str = "config.ith_hidden_layer"
                   ) -> tuple[int, ...]:
    """The hidden blocks ``config`` asks for, or InvalidRequest naming ``field``."""
    try:
        return tuple(hidden_layer_indices(config, n_layers))
    except InvalidLayerError as error:
        raise InvalidRequest(f"{field}: {error}") from error


def embed_config(layer: int, pooled: bool) -> LogitsConfig:
    """What an Embed item computes: the final embeddings (``layer`` -1) or one block's output
    (check it with :func:`checked_layers`), mean-pooled or per position."""
    if layer == -1:
        return LogitsConfig(return_mean_embedding=pooled, return_embeddings=not pooled)
    return LogitsConfig(
        ith_hidden_layer=layer, return_mean_hidden_states=pooled, return_hidden_states=not pooled
    )


def cpu_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` as a flat int64 CPU tensor (what every call holds)."""
    return tokens.detach().to("cpu", torch.long).reshape(-1)


def logits_call(
    tokens: torch.Tensor,
    config: LogitsConfig,
    layers: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    caller: Caller = ANONYMOUS,
    deadline: float | None = None,
    response_bytes: int = 0,
) -> LogitsCall:
    """A logits call over checked ``layers`` (:func:`checked_layers`)."""
    if not dtype.is_floating_point:
        raise InvalidRequest("outputs are floating point: ask for float32, float16 or bfloat16")
    tokens = cpu_tokens(tokens)
    return LogitsCall(
        tokens=tokens, config=config, layers=tuple(layers), dtype=dtype, caller=caller,
        deadline=deadline, cost=Cost(len(tokens), 1, response_bytes),
    )


def sample_call(
    tokens: torch.Tensor,
    sampling: SamplingConfig,
    seed: int | None,
    *,
    caller: Caller = ANONYMOUS,
    deadline: float | None = None,
    response_bytes: int = 0,
) -> SampleCall:
    """A forward-and-sample call; the sampling config is checked here (the library's check)."""
    try:
        validate_sampling_config(sampling)
        seed = resolve_seed(seed)
    except ValueError as error:
        raise InvalidRequest(str(error)) from error
    tokens = cpu_tokens(tokens)
    return SampleCall(
        tokens=tokens, sampling=sampling, seed=seed, caller=caller, deadline=deadline,
        cost=Cost(len(tokens), 1, response_bytes),
    )


def generate_call(
    tokens: torch.Tensor,
    config: GenerationConfig,
    seed: int | None,
    *,
    caller: Caller = ANONYMOUS,
    deadline: float | None = None,
) -> GenerateCall:
    """A generation: at least one masked position; it costs one forward per step (``num_steps``
    clamped to the number of masks, as the library does)."""
    tokens = cpu_tokens(tokens)
    masks = int((tokens[1:-1] == MASK_ID).sum())
    if masks == 0:
        raise InvalidRequest(
            "protein has no masked position ('_' or <mask>): there is nothing to generate "
            "(the input has no masks)"
        )
    steps = masks if config.num_steps is None else max(1, min(int(config.num_steps), masks))
    return GenerateCall(
        tokens=tokens, config=config, seed=seed, caller=caller, deadline=deadline,
        cost=Cost(len(tokens), steps),
    )


def score_call(
    plan: ScoringPlan, *, caller: Caller = ANONYMOUS, deadline: float | None = None,
    id: str = "", response_bytes: int = 0,
) -> ScoreCall:
    """Masked copies of a plan: as many forwards as copies, of its longest sequence."""
    longest = max(len(s) for s in plan.sequences) + 2
    return ScoreCall(
        plan=plan, id=id, caller=caller, deadline=deadline,
        cost=Cost(longest, max(1, len(plan.copies)), response_bytes),
    )


def current_caller(default: Caller = ANONYMOUS) -> Caller:
    """The caller the authentication interceptor named for this call, or ``default``."""
    return CURRENT_CALLER.get() or default
