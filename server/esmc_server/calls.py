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

from esmc.types import GenerationConfig, LogitsConfig, SamplingConfig


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

    plan: object  # esmc.scoring.ScoringPlan (kept untyped: the library's plan is opaque here)
    id: str = ""  # a PseudoLogLikelihoodStream item's id


def current_caller(default: Caller = ANONYMOUS) -> Caller:
    """The caller the authentication interceptor named for this call, or ``default``."""
    return CURRENT_CALLER.get() or default
