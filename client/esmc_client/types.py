"""Plain frozen dataclasses the client takes and returns (numpy, no torch).

The configs mirror the reference ``esm.sdk.api`` types by field name, so an
``esm``/``esmc`` ``LogitsConfig`` or ``GenerationConfig`` object can be passed where one of
these is expected (fields are read by name). Arrays are read-only numpy views of the
response bytes (see :mod:`esmc_client.tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"  # the column order of a site-saturation map
SCORING_METHODS = ("masked-marginals", "wt-marginals", "pseudo-likelihood")
SCORING_NORMALIZATIONS = ("full", "amino-acids")

# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ESMProtein:
    """A protein by its one-letter sequence; ``_`` or ``<mask>`` marks a masked position."""

    sequence: str


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ESMProteinTensor:
    """A protein by its token ids, ``<cls>`` (0) first and ``<eos>`` (2) last."""

    sequence: np.ndarray


@dataclass(frozen=True)
class LogitsConfig:
    """What a logits call returns. ``ith_hidden_layer``: -1 all blocks, else block i (0 = first)."""

    sequence: bool = False
    return_embeddings: bool = False
    return_hidden_states: bool = False
    ith_hidden_layer: int = -1
    return_mean_embedding: bool = False
    return_mean_hidden_states: bool = False


@dataclass(frozen=True)
class GenerationConfig:
    """Iterative unmasking of the sequence track (reference names and defaults)."""

    track: str = "sequence"
    invalid_ids: tuple[int, ...] = ()
    schedule: str = "cosine"
    strategy: str = "random"
    num_steps: int = 20
    temperature: float = 1.0
    temperature_annealing: bool = True
    top_p: float = 1.0


@dataclass(frozen=True)
class SamplingTrackConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    only_sample_masked_tokens: bool = True
    invalid_ids: tuple[int, ...] = ()
    topk_logprobs: int = 0


@dataclass(frozen=True)
class SamplingConfig:
    sequence: SamplingTrackConfig | None = None
    return_per_residue_embeddings: bool = False
    return_mean_embedding: bool = False


# --- outputs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseMetadata:
    queue_ms: float = 0.0  # arrival to the start of the forward that served it
    compute_ms: float = 0.0  # that forward (and sampling)
    batch_size: int = 0  # sequences in that forward
    batch_tokens: int = 0  # tokens in that forward
    forwards: int = 0  # forwards this response needed
    model: str = ""  # the model that served it ("" from servers that predate the field)
    weights_sha256: str = ""  # hash of that model's weights
    dtype: str = ""  # its compute dtype
    server_version: str = ""


@dataclass(frozen=True)
class BatchingLimits:
    max_batch_tokens: int
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    packed: bool


@dataclass(frozen=True)
class ModelInfo:
    """One model a server serves (``ServerInfo.models``)."""

    name: str
    aliases: tuple[str, ...]
    is_default: bool
    d_model: int
    n_heads: int
    n_layers: int
    max_length: int  # tokens per protein, BOS and EOS included
    dtype: str
    devices: tuple[str, ...]  # one per device worker
    batching: BatchingLimits
    weights_sha256: str
    weights_bytes: int  # parameter bytes per model copy
    activation_bytes: int  # worst-case activation bytes of one forward at the token budget
    trained_context: int


@dataclass(frozen=True)
class ServerInfo:
    model_name: str
    d_model: int
    n_heads: int
    n_layers: int
    vocabulary: tuple[str, ...]  # index = token id
    max_length: int  # tokens per protein this server accepts, BOS and EOS included
    dtype: str
    device: str
    batching: BatchingLimits
    max_message_bytes: int
    server_version: str
    logits_width: int
    trained_context: int = 0  # tokens the model was trained on, BOS/EOS included (0: unknown)
    models: tuple[ModelInfo, ...] = ()  # every served model, the default first (() if older)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ForwardTrackData:
    sequence: np.ndarray | None = None  # (L+2, 64)


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class LogitsOutput:
    """One protein's outputs (no batch dimension), as the reference ``LogitsOutput``.

    logits.sequence (L+2, 64); embeddings (L+2, d); hidden_states (layers, L+2, d) with
    ``hidden_layers`` the block index of each row; mean_embedding (d);
    mean_hidden_states (layers, d).
    """

    logits: ForwardTrackData
    embeddings: np.ndarray | None
    hidden_states: np.ndarray | None
    mean_embedding: np.ndarray | None
    mean_hidden_states: np.ndarray | None
    hidden_layers: tuple[int, ...]
    metadata: ResponseMetadata


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class EmbedResult:
    """One sequence of a bulk embed: its embedding, or its own error."""

    id: str
    embedding: np.ndarray | None  # (d) pooled, or (L+2, d)
    error: ESMCError | None
    metadata: ResponseMetadata
    attempts: int = 1  # 1 + retries after UNAVAILABLE / RESOURCE_EXHAUSTED

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class ForwardAndSampleOutput:
    """One forward plus sampling; per-position arrays have L+2 rows."""

    protein_tensor: np.ndarray  # sampled token ids (L+2,)
    protein: ESMProtein
    entropy: np.ndarray | None
    prob: np.ndarray | None
    logprob: np.ndarray | None
    top_prob: np.ndarray | None
    topk_logprob: np.ndarray | None  # (L+2, k)
    topk_tokens: np.ndarray | None  # (L+2, k)
    per_residue_embedding: np.ndarray | None  # (L+2, d)
    mean_embedding: np.ndarray | None  # (d)
    metadata: ResponseMetadata


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class GenerateStep:
    """One message of a generation stream; the last has ``final`` and the finished protein.

    Steps are numbered 1..``num_steps`` (as the CLI prints them: "step 3 of 8"); the final
    message reports no step (``step`` None): it carries the finished protein.
    """

    step: int | None  # 1-based; None on the final message
    num_steps: int  # after clamping to the number of masks
    positions: tuple[int, ...]  # residue indices (0-based) filled in this step
    tokens: tuple[int, ...]  # token ids chosen there
    probabilities: tuple[float, ...]
    entropies: tuple[float, ...]
    temperature: float
    sequence: str  # whole current sequence, "_" where still masked
    final: bool
    protein: ESMProtein | None  # final message only
    protein_tensor: np.ndarray | None  # final message only
    metadata: ResponseMetadata


class ESMCError(Exception):
    """A call (or one sequence of a stream) failed; ``code`` is the gRPC status name.

    ``str(error)`` is ``"CODE: message"`` with the status written once. ``attempts`` counts
    the tries the call made (1 + retries); ``pushback_ms`` is the server's
    ``grpc-retry-pushback-ms`` hint, when it sent one.
    """

    def __init__(
        self, code: str, message: str, *, attempts: int = 1, pushback_ms: int | None = None
    ):
        message = _without_code(code, message)
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.attempts = attempts
        self.pushback_ms = pushback_ms

    def __reduce__(self):
        return (_rebuild_error, (self.code, self.message, self.attempts, self.pushback_ms))


def _rebuild_error(code, message, attempts, pushback_ms) -> ESMCError:
    return ESMCError(code, message, attempts=attempts, pushback_ms=pushback_ms)


def _without_code(code: str, message: str) -> str:
    """``message`` without a leading copy of ``code`` (so the status is printed once)."""
    for prefix in (f"{code}: ", f"{code} "):
        if message.startswith(prefix):
            return message[len(prefix):]
    return message
