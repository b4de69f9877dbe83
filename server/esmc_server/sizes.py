"""Response sizes, known before a request is queued: upper bounds, and the refusal of what
could never be sent."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from esmc.types import LogitsConfig, SamplingConfig
from esmc_server.errors import InvalidRequest
from esmc_server.wire import WIRE_DTYPES

_MESSAGE_OVERHEAD = 1024
"""Bytes a response may hold beyond its tensors' data (metadata, tags, shapes): an upper bound."""


def _tensor_bytes(shape: Sequence[int], itemsize: int) -> int:
    """Wire size of a Tensor: its data plus tags, lengths, dtype and shape (upper bound)."""
    return math.prod(shape) * itemsize + 16 + 11 * len(shape)


def _itemsize(dtype: int) -> int:
    return np.dtype(WIRE_DTYPES[dtype][1]).itemsize


@dataclasses.dataclass(frozen=True)


class Shapes:
    """What the size of a response depends on besides the request."""

    d_model: int
    logits_width: int


def logits_response_bytes(
    config: LogitsConfig, layers: Sequence[int], tokens: int, shapes: Shapes, dtype: int
) -> int:
    """The size of the LogitsResponse (or Embed response) for ``tokens`` tokens: an upper bound."""
    item, d = _itemsize(dtype), shapes.d_model
    size = _MESSAGE_OVERHEAD + 6 * len(layers)
    if config.sequence:
        size += _tensor_bytes((tokens, shapes.logits_width), item)
    if config.return_embeddings:
        size += _tensor_bytes((tokens, d), item)
    if config.return_hidden_states:
        size += _tensor_bytes((len(layers), tokens, d), item)
    if config.return_mean_embedding:
        size += _tensor_bytes((d,), item)
    if config.return_mean_hidden_states:
        size += _tensor_bytes((len(layers), d), item)
    return size


def sample_response_bytes(config: SamplingConfig, tokens: int, shapes: Shapes, dtype: int) -> int:
    """The size of a ForwardAndSampleResponse for ``tokens`` tokens: an upper bound."""
    item, d = _itemsize(dtype), shapes.d_model
    size = _MESSAGE_OVERHEAD + 3 * tokens  # sampled ids (varints < 128) and the decoded string
    if config.sequence is not None:
        size += 4 * _tensor_bytes((tokens,), item)  # entropy, prob, logprob, top_prob
        k = config.sequence.topk_logprobs
        if k:
            size += _tensor_bytes((tokens, k), item) + _tensor_bytes((tokens, k), 8)
    if config.return_per_residue_embeddings:
        size += _tensor_bytes((tokens, d), item)
    if config.return_mean_embedding:
        size += _tensor_bytes((d,), item)
    return size


def check_response_size(size: int, limit: int, advice: str) -> None:
    """Refuse, before any work, a request whose response could never be sent."""
    if size > limit:
        raise InvalidRequest(
            f"the response would be {size} bytes ({size / 2**20:.1f} MiB), over this server's "
            f"message limit of {limit} bytes ({limit / 2**20:.1f} MiB, max_message_bytes); "
            f"{advice}"
        )


LOGITS_SIZE_ADVICE = (
    "ask for fewer outputs: one block with config.ith_hidden_layer, a smaller output_dtype "
    "(DTYPE_FLOAT16 or DTYPE_BFLOAT16), or the Embed call for one layer per protein"
)
EMBED_SIZE_ADVICE = (
    "ask for a smaller output_dtype (DTYPE_FLOAT16 or DTYPE_BFLOAT16) or pooling=POOLING_MEAN"
)
SAMPLE_SIZE_ADVICE = (
    "ask for fewer outputs (topk_logprobs, return_per_residue_embeddings) or a smaller "
    "output_dtype (DTYPE_FLOAT16 or DTYPE_BFLOAT16)"
)
