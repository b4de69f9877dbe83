"""Requests -> validated calls: the gRPC wire layer's readers.

Readers parse the wire: sizes first (in O(1) from the wire where it allows, before anything is
read element by element), then the library's own validators (``esmc.tokenizer``,
``esmc.sampling``, ``esmc.inference``) turned into :class:`InvalidRequest` naming the field.
Nothing is validated here that the library validates. ``read_*`` turn one request into its
call (:mod:`esmc_server.calls`), its response size checked against the message limit, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from esmc import sampling, tokenizer
from esmc.types import (
    TRACKS,
    GenerationConfig,
    LogitsConfig,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.calls import (
    Caller,
    GenerateCall,
    LogitsCall,
    SampleCall,
    checked_layers,
    embed_config,
    generate_call,
    logits_call,
    sample_call,
)
from esmc_server.errors import InvalidRequest
from esmc_server.sizes import (
    EMBED_SIZE_ADVICE,
    LOGITS_SIZE_ADVICE,
    SAMPLE_SIZE_ADVICE,
    Shapes,
    check_response_size,
    logits_response_bytes,
    sample_response_bytes,
)
from esmc_server.wire import FLOAT_OUTPUTS, torch_dtype

OTHER_TRACKS = tuple(t for t in TRACKS if t != "sequence")
MAX_ID_CHARS = 1024
"""Longest ``id`` of a keyed stream request (Embed, PseudoLogLikelihoodStream), in characters."""
MAX_INVALID_IDS = tokenizer.EMBED_ROWS
"""Longest ``invalid_ids`` list: there are only 64 ids to exclude."""


@contextlib.contextmanager


def invalid_request(field: str) -> Iterator[None]:
    """Turn a library ``ValueError`` (tokenizer, layer, config checks) into InvalidRequest."""
    try:
        yield
    except ValueError as e:
        raise InvalidRequest(f"{field}: {e}") from e


def output_dtype(value: int, field: str = "output_dtype") -> int:
    """The float wire dtype to answer in; unspecified means float32."""
    if value == pb.DTYPE_UNSPECIFIED:
        return pb.DTYPE_FLOAT32
    if value not in FLOAT_OUTPUTS:
        name = pb.DType.Name(value) if value in pb.DType.values() else str(value)
        raise InvalidRequest(
            f"{field}: {name} is not an output dtype; use float32, float16 or bfloat16"
        )
    return value


# -- inputs --------------------------------------------------------------------------------


def tokens_from_request(request, max_length: int) -> torch.Tensor:
    """``<cls> ids... <eos>`` (int64) from a request's ``protein`` or ``tokens`` oneof.

    ``max_length`` counts tokens, BOS and EOS included; it is checked before the input is read.
    """
    which = request.WhichOneof("input")
    if which == "protein":
        return tokens_from_protein(request.protein, max_length)
    if which == "tokens":
        return tokens_from_tensor(request.tokens, max_length)
    raise InvalidRequest("request has neither protein nor tokens; set one of them")


def tokens_from_protein(protein: pb.ESMProtein, max_length: int | None) -> torch.Tensor:
    if protein.secondary_structure or len(protein.sasa):
        raise InvalidRequest(
            "protein: ESMC models only the sequence track; "
            "secondary_structure and sasa must be empty"
        )
    with invalid_request("protein.sequence"):
        return tokenizer.encode(protein.sequence, max_length=max_length)


def tokens_from_tensor(tokens: pb.ESMProteinTensor, max_length: int | None) -> torch.Tensor:
    extra = [
        name for name in ("structure", "secondary_structure", "sasa") if len(getattr(tokens, name))
    ]
    if tokens.HasField("function"):
        extra.append("function")
    if extra:
        raise InvalidRequest(f"tokens: ESMC models only the sequence track; got {', '.join(extra)}")
    with invalid_request("tokens.sequence"):
        if max_length is not None:
            tokenizer.check_token_count(len(tokens.sequence), max_length)
        ids = torch.tensor(np.asarray(tokens.sequence, dtype=np.int64))
        tokenizer.validate_ids(ids)
    return ids


# -- logits and embeddings ----------------------------------------------------------------


def logits_config_from_proto(
    message: pb.LogitsConfig, n_layers: int
) -> tuple[LogitsConfig, list[int]]:
    """The library config and the block indices of its hidden-state rows."""
    for track in (*OTHER_TRACKS, "residue_annotations"):
        if getattr(message, track):
            raise InvalidRequest(
                f"config.{track}: ESMC has no {track} head; it returns sequence logits, "
                "embeddings and hidden states only"
            )
    has_layer = message.HasField("ith_hidden_layer")
    wants_hidden = message.return_hidden_states or message.return_mean_hidden_states
    if has_layer and not wants_hidden:
        raise InvalidRequest(
            "config.ith_hidden_layer is set but neither return_hidden_states nor "
            "return_mean_hidden_states is"
        )
    config = LogitsConfig(
        sequence=message.sequence,
        return_embeddings=message.return_embeddings,
        return_hidden_states=message.return_hidden_states,
        ith_hidden_layer=message.ith_hidden_layer if has_layer else -1,
        return_mean_embedding=message.return_mean_embedding,
        return_mean_hidden_states=message.return_mean_hidden_states,
    )
    return config, list(checked_layers(config, n_layers))


def embed_config_from_proto(request: pb.EmbedRequest, n_layers: int) -> LogitsConfig:
    """Final embeddings (layer unset or -1) or one block's output, pooled or per position."""
    return embed_config_and_layers(request, n_layers)[0]


def embed_config_and_layers(
    request: pb.EmbedRequest, n_layers: int
) -> tuple[LogitsConfig, tuple[int, ...]]:
    """:func:`embed_config_from_proto` and the block index it asks for (checked)."""
    if request.pooling not in (pb.POOLING_UNSPECIFIED, pb.POOLING_MEAN, pb.POOLING_NONE):
        raise InvalidRequest(
            f"pooling: unknown value {request.pooling}; use POOLING_MEAN or POOLING_NONE"
        )
    pooled = request.pooling != pb.POOLING_NONE
    layer = request.layer if request.HasField("layer") else -1
    config = embed_config(layer, pooled)
    if layer == -1:
        return config, ()
    return config, checked_layers(config, n_layers, "layer")


def deadline_of(context) -> float | None:
    """A call's deadline (a gRPC servicer context's) as ``time.monotonic()`` seconds, or None
    without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def stream_id_of(request_id: str) -> str:
    """A keyed stream request's id, its length checked."""
    if len(request_id) > MAX_ID_CHARS:
        raise InvalidRequest(f"id: {len(request_id)} characters; the limit is {MAX_ID_CHARS}")
    return request_id


# -- sampling and generation ----------------------------------------------------------------


def _set_fields(message, names: Sequence[str]) -> dict:
    """The optional fields of ``message`` that are set: unset ones take the library defaults."""
    return {name: getattr(message, name) for name in names if message.HasField(name)}


def invalid_ids_of(message, field: str) -> list[int]:
    """``invalid_ids``, its length checked from the wire before it is read."""
    count = len(message.invalid_ids)
    if count > MAX_INVALID_IDS:
        raise InvalidRequest(
            f"{field}: {count} ids; the limit is {MAX_INVALID_IDS} (there are only "
            f"{tokenizer.EMBED_ROWS} token ids)"
        )
    return list(message.invalid_ids)


def sampling_track_from_proto(message: pb.SamplingTrackConfig, field: str) -> SamplingTrackConfig:
    """Unset optional fields take the library's (the reference's) defaults."""
    return SamplingTrackConfig(
        **_set_fields(message, ("temperature", "top_p", "only_sample_masked_tokens")),
        invalid_ids=invalid_ids_of(message, f"{field}.invalid_ids"),
        topk_logprobs=message.topk_logprobs,
    )


def sampling_config_from_request(request: pb.ForwardAndSampleRequest) -> SamplingConfig:
    """The request's config; without one, sample the sequence track with the defaults."""
    if not request.HasField("sampling_config"):
        return SamplingConfig(sequence=SamplingTrackConfig())
    return sampling_config_from_proto(request.sampling_config)


def sampling_config_from_proto(message: pb.SamplingConfig) -> SamplingConfig:
    """Every track the message sets goes to the library, which refuses those ESMC lacks."""
    tracks = {
        track: sampling_track_from_proto(getattr(message, track), f"sampling_config.{track}")
        for track in TRACKS
        if message.HasField(track)
    }
    config = SamplingConfig(
        **tracks,
        return_per_residue_embeddings=message.return_per_residue_embeddings,
        return_mean_embedding=message.return_mean_embedding,
    )
    with invalid_request("sampling_config"):
        sampling.validate_sampling_config(config)
    return config


def generation_config_from_proto(message: pb.GenerationConfig) -> GenerationConfig:
    """Library defaults for unset fields; checked by the library's own validation."""
    fields = _set_fields(
        message, ("num_steps", "temperature", "temperature_annealing", "top_p")
    )
    fields.update({name: getattr(message, name) for name in ("schedule", "strategy") if getattr(message, name)})
    with invalid_request("config"):
        return sampling.generation_config(
            track=message.track,
            invalid_ids=invalid_ids_of(message, "config.invalid_ids"),
            **fields,
        )


def seed_of(request) -> int | None:
    return request.seed if request.HasField("seed") else None


# -- whole requests -> calls ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)


class RequestLimits:
    """What reading a request depends on besides the request: the served model and limits."""

    max_tokens: int  # per protein, BOS and EOS included
    n_layers: int
    shapes: Shapes
    max_message_bytes: int


def read_logits(
    request: pb.LogitsRequest, limits: RequestLimits, caller: Caller, deadline: float | None
) -> LogitsCall:
    tokens = tokens_from_request(request, limits.max_tokens)
    config, layers = logits_config_from_proto(request.config, limits.n_layers)
    dtype = output_dtype(request.output_dtype)
    size = logits_response_bytes(config, layers, len(tokens), limits.shapes, dtype)
    check_response_size(size, limits.max_message_bytes, LOGITS_SIZE_ADVICE)
    return logits_call(
        tokens, config, tuple(layers), dtype=torch_dtype(dtype), caller=caller,
        deadline=deadline, response_bytes=size,
    )


def read_embed(
    request: pb.EmbedRequest, limits: RequestLimits, caller: Caller, deadline: float | None
) -> LogitsCall:
    """One Embed item (its id is the stream's business)."""
    tokens = tokens_from_request(request, limits.max_tokens)
    config, layers = embed_config_and_layers(request, limits.n_layers)
    dtype = output_dtype(request.output_dtype)
    size = logits_response_bytes(config, layers, len(tokens), limits.shapes, dtype)
    size += len(request.id.encode())
    check_response_size(size, limits.max_message_bytes, EMBED_SIZE_ADVICE)
    return logits_call(
        tokens, config, layers, dtype=torch_dtype(dtype), caller=caller, deadline=deadline,
        response_bytes=size,
    )


def read_sample(
    request: pb.ForwardAndSampleRequest, limits: RequestLimits, caller: Caller,
    deadline: float | None,
) -> SampleCall:
    tokens = tokens_from_request(request, limits.max_tokens)
    config = sampling_config_from_request(request)
    dtype = output_dtype(request.output_dtype)
    size = sample_response_bytes(config, len(tokens), limits.shapes, dtype)
    check_response_size(size, limits.max_message_bytes, SAMPLE_SIZE_ADVICE)
    call = sample_call(
        tokens, config, seed_of(request), caller=caller, deadline=deadline, response_bytes=size
    )
    return dataclasses.replace(call, dtype=torch_dtype(dtype))


def read_generate(
    request: pb.GenerateRequest, limits: RequestLimits, caller: Caller, deadline: float | None
) -> GenerateCall:
    tokens = tokens_from_request(request, limits.max_tokens)
    config = generation_config_from_proto(request.config)
    return generate_call(tokens, config, seed_of(request), caller=caller, deadline=deadline)
