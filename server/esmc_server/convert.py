"""Protobuf <-> esmc types and torch tensors; the one module that reads or builds wire messages.

Readers parse the wire: sizes first (in O(1) from the wire where it allows, before anything is
read element by element), then the library's own validators (``esmc.tokenizer``,
``esmc.sampling``, ``esmc.inference``) turned into :class:`InvalidRequest` naming the field.
Nothing is validated here that the library validates. Builders take plain esmc outputs and the
engine's ``Timing``; they run off the event loop (the servicer's response pool).
:func:`response_bytes` tells the size of a response before the request is queued.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import math
import sys
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from esmc import sampling, tokenizer
from esmc.generation import GenerationStep
from esmc.inference import hidden_layer_indices
from esmc.types import (
    ForwardAndSampleOutput,
    TRACKS,
    GenerationConfig,
    LogitsConfig,
    LogitsOutput,
    SamplingConfig,
    SamplingTrackConfig,
)
from esmc_proto.v1 import esmc_pb2 as pb
from esmc_server.errors import InvalidRequest

# wire dtype -> (torch dtype, little-endian numpy dtype of the raw bytes)
WIRE_DTYPES: dict[int, tuple[torch.dtype, str]] = {
    pb.DTYPE_FLOAT32: (torch.float32, "<f4"),
    pb.DTYPE_FLOAT16: (torch.float16, "<f2"),
    pb.DTYPE_BFLOAT16: (torch.bfloat16, "<u2"),  # the upper 16 bits of a float32
    pb.DTYPE_INT32: (torch.int32, "<i4"),
    pb.DTYPE_INT64: (torch.int64, "<i8"),
}
FLOAT_OUTPUTS = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
OTHER_TRACKS = tuple(t for t in TRACKS if t != "sequence")
MAX_ID_CHARS = 1024
"""Longest ``id`` of a keyed stream request (Embed, PseudoLogLikelihoodStream), in characters."""
MAX_INVALID_IDS = tokenizer.EMBED_ROWS
"""Longest ``invalid_ids`` list: there are only 64 ids to exclude."""
_LITTLE_ENDIAN = sys.byteorder == "little"


@contextlib.contextmanager
def invalid_request(field: str) -> Iterator[None]:
    """Turn a library ``ValueError`` (tokenizer, layer, config checks) into InvalidRequest."""
    try:
        yield
    except ValueError as e:
        raise InvalidRequest(f"{field}: {e}") from e


# -- tensors -------------------------------------------------------------------------------


def tensor_to_proto(tensor: torch.Tensor, dtype: int = pb.DTYPE_FLOAT32) -> pb.Tensor:
    """Raw little-endian bytes of ``tensor`` cast to ``dtype`` (bf16 rounds to nearest even).

    A contiguous CPU tensor already in ``dtype`` (what the engine hands over when it cast on
    the device) is copied once, into the bytes; anything else is cast first.
    """
    torch_dtype, wire = WIRE_DTYPES[dtype]
    t = tensor.detach()
    if t.device.type != "cpu" or t.dtype != torch_dtype:
        t = t.to("cpu", torch_dtype)
    if not t.is_contiguous():
        t = t.contiguous()
    array = t.view(torch.int16).numpy() if dtype == pb.DTYPE_BFLOAT16 else t.numpy()
    if not _LITTLE_ENDIAN:
        array = array.astype(wire)
    return pb.Tensor(dtype=dtype, shape=list(t.shape), data=array.tobytes())


def tensor_from_proto(message: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """The torch tensor a wire Tensor holds (a copy; bf16 comes back as torch.bfloat16)."""
    if message.dtype not in WIRE_DTYPES:
        raise InvalidRequest(f"{field}: unknown dtype {message.dtype}")
    torch_dtype, wire = WIRE_DTYPES[message.dtype]
    shape = tuple(message.shape)
    if any(n < 0 for n in shape):
        raise InvalidRequest(f"{field}: negative dimension in shape {list(shape)}")
    count = math.prod(shape)
    itemsize = np.dtype(wire).itemsize
    if len(message.data) != count * itemsize:
        raise InvalidRequest(
            f"{field}: {len(message.data)} bytes do not hold shape {list(shape)} of "
            f"{pb.DType.Name(message.dtype)} ({count * itemsize} bytes)"
        )
    array = np.frombuffer(message.data, dtype=wire).reshape(shape)
    if message.dtype == pb.DTYPE_BFLOAT16:
        return torch.from_numpy(array.astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype a wire dtype is computed in (the engine casts on the device)."""
    return WIRE_DTYPES[wire][0]


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


def protein_to_proto(tokens: torch.Tensor | Sequence[int]) -> pb.ESMProtein:
    return pb.ESMProtein(sequence=tokenizer.decode(tokens))


def protein_tensor_to_proto(tokens: torch.Tensor | Sequence[int]) -> pb.ESMProteinTensor:
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return pb.ESMProteinTensor(sequence=values)


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
    with invalid_request("config.ith_hidden_layer"):
        layers = hidden_layer_indices(config, n_layers)
    return config, layers


def logits_response(
    output: LogitsOutput, layers: Sequence[int], dtype: int, metadata: pb.ResponseMetadata
) -> pb.LogitsResponse:
    response = pb.LogitsResponse(metadata=metadata)
    if output.logits is not None and output.logits.sequence is not None:
        response.logits.sequence.CopyFrom(tensor_to_proto(output.logits.sequence, dtype))
    for name in ("embeddings", "hidden_states", "mean_embedding", "mean_hidden_states"):
        value = getattr(output, name)
        if value is not None:
            getattr(response, name).CopyFrom(tensor_to_proto(value, dtype))
    if output.hidden_states is not None or output.mean_hidden_states is not None:
        response.hidden_layers.extend(layers)
    return response


def embed_config_from_proto(request: pb.EmbedRequest, n_layers: int) -> LogitsConfig:
    """Final embeddings (layer unset or -1) or one block's output, pooled or per position."""
    if request.pooling not in (pb.POOLING_UNSPECIFIED, pb.POOLING_MEAN, pb.POOLING_NONE):
        raise InvalidRequest(
            f"pooling: unknown value {request.pooling}; use POOLING_MEAN or POOLING_NONE"
        )
    pooled = request.pooling != pb.POOLING_NONE
    layer = request.layer if request.HasField("layer") else -1
    if layer == -1:
        return LogitsConfig(return_mean_embedding=pooled, return_embeddings=not pooled)
    config = LogitsConfig(
        ith_hidden_layer=layer, return_mean_hidden_states=pooled, return_hidden_states=not pooled
    )
    with invalid_request("layer"):
        hidden_layer_indices(config, n_layers)
    return config


def embed_response(
    id_: str, output: LogitsOutput, config: LogitsConfig, dtype: int, metadata: pb.ResponseMetadata
) -> pb.EmbedResponse:
    return pb.EmbedResponse(
        id=id_, embedding=tensor_to_proto(embedding_of(output, config), dtype), metadata=metadata
    )


def embedding_of(output: LogitsOutput, config: LogitsConfig) -> torch.Tensor:
    """The one tensor an Embed response carries: (d) pooled or (L+2, d)."""
    if config.return_mean_embedding:
        return output.mean_embedding
    if config.return_embeddings:
        return output.embeddings
    if config.return_mean_hidden_states:
        return output.mean_hidden_states[0]
    return output.hidden_states[0]


# -- serialized responses: tensor bytes copied once, without the GIL -----------------------------

_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1  # where a bytes object's data starts (CPython)
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _wire_tensor(tensor: torch.Tensor, dtype: int) -> torch.Tensor:
    """``tensor`` as a contiguous CPU tensor whose memory is the wire bytes (little-endian)."""
    torch_dtype, _ = WIRE_DTYPES[dtype]
    t = tensor.detach()
    if t.device.type != "cpu" or t.dtype != torch_dtype:
        t = t.to("cpu", torch_dtype)
    return t.contiguous()


class SerializedMessage:
    """A serialized response assembled from its small fields (serialized by protobuf) and its
    tensors' raw memory, spliced in as length-delimited fields. :meth:`tobytes` copies each
    tensor once, straight into the final bytes, with ``memmove`` outside the GIL, so building
    a large response in the response pool does not stall the event loop's thread."""

    def __init__(self, small_fields) -> None:
        self._parts: list[bytes | torch.Tensor] = [small_fields.SerializeToString()]

    def add_tensor(self, path: Sequence[int], tensor: torch.Tensor, dtype: int) -> None:
        """Set the Tensor field at ``path`` (field numbers, outermost first)."""
        if not _LITTLE_ENDIAN:
            raise NotImplementedError("wire tensors are little-endian")
        t = _wire_tensor(tensor, dtype)
        nbytes = t.numel() * t.element_size()
        head = pb.Tensor(dtype=dtype, shape=list(t.shape)).SerializeToString()
        head += _varint(3 << 3 | 2) + _varint(nbytes)  # Tensor.data = 3
        length = len(head) + nbytes
        for number in reversed(path):
            key = _varint(number << 3 | 2) + _varint(length)
            head = key + head
            length += len(key)
        self._parts += [head, t]

    def tobytes(self) -> bytes:
        sizes = [len(p) if isinstance(p, bytes) else p.numel() * p.element_size() for p in self._parts]
        out = _new_bytes(None, sum(sizes))  # uninitialised, written once below
        address = id(out) + _BYTES_DATA_OFFSET
        for part, size in zip(self._parts, sizes):
            source = part if isinstance(part, bytes) else part.data_ptr()
            ctypes.memmove(address, source, size)  # a ctypes call: the GIL is released
            address += size
        return out


def logits_response_serialized(
    output: LogitsOutput, layers: Sequence[int], dtype: int, metadata: pb.ResponseMetadata
) -> bytes:
    """The serialized :func:`logits_response`, each tensor copied once outside the GIL."""
    hidden = output.hidden_states is not None or output.mean_hidden_states is not None
    message = SerializedMessage(
        pb.LogitsResponse(metadata=metadata, hidden_layers=layers if hidden else [])
    )
    if output.logits is not None and output.logits.sequence is not None:
        message.add_tensor((1, 1), output.logits.sequence, dtype)  # logits.sequence
    for number, name in (
        (2, "embeddings"),
        (3, "hidden_states"),
        (4, "mean_embedding"),
        (5, "mean_hidden_states"),
    ):
        value = getattr(output, name)
        if value is not None:
            message.add_tensor((number,), value, dtype)
    return message.tobytes()


def embed_response_serialized(
    id_: str, output: LogitsOutput, config: LogitsConfig, dtype: int, metadata: pb.ResponseMetadata
) -> bytes:
    """The serialized :func:`embed_response`, its tensor copied once outside the GIL."""
    message = SerializedMessage(pb.EmbedResponse(id=id_, metadata=metadata))
    message.add_tensor((2,), embedding_of(output, config), dtype)
    return message.tobytes()


# -- sizes ------------------------------------------------------------------------------------

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


def forward_and_sample_response(
    output: ForwardAndSampleOutput, dtype: int, metadata: pb.ResponseMetadata
) -> pb.ForwardAndSampleResponse:
    tokens = output.protein_tensor.sequence  # (L+2,)
    response = pb.ForwardAndSampleResponse(
        protein_tensor=protein_tensor_to_proto(tokens),
        protein=protein_to_proto(tokens),
        metadata=metadata,
    )
    for name in ("entropy", "prob", "logprob", "top_prob", "topk_logprob"):
        track = getattr(output, name)
        if track is not None and track.sequence is not None:
            getattr(response, name).CopyFrom(tensor_to_proto(track.sequence, dtype))
    if output.topk_tokens is not None and output.topk_tokens.sequence is not None:
        response.topk_tokens.CopyFrom(tensor_to_proto(output.topk_tokens.sequence, pb.DTYPE_INT64))
    for name in ("per_residue_embedding", "mean_embedding"):
        value = getattr(output, name)
        if value is not None:
            getattr(response, name).CopyFrom(tensor_to_proto(value, dtype))
    return response


def generation_step_response(
    step: GenerationStep, metadata: pb.ResponseMetadata
) -> pb.GenerateResponse:
    """One step of a generation: what it filled, and the whole sequence after it."""
    return pb.GenerateResponse(
        step=step.step,
        num_steps=step.num_steps,
        positions=step.positions,
        tokens=step.tokens,
        probabilities=step.probabilities,
        entropies=step.entropies,
        temperature=step.temperature,
        sequence=step.sequence,
        metadata=metadata,
    )


def generation_final_response(
    step: GenerationStep, metadata: pb.ResponseMetadata
) -> pb.GenerateResponse:
    """The message after the last step: the finished protein, metadata over the whole stream."""
    return pb.GenerateResponse(
        step=step.step,
        num_steps=step.num_steps,
        temperature=step.temperature,
        sequence=step.sequence,
        final=True,
        protein=protein_to_proto(step.sequence_tokens),
        protein_tensor=protein_tensor_to_proto(step.sequence_tokens),
        metadata=metadata,
    )


def seed_of(request) -> int | None:
    return request.seed if request.HasField("seed") else None


# -- metadata -------------------------------------------------------------------------------


def metadata_to_proto(timing) -> pb.ResponseMetadata:
    """ResponseMetadata from the engine's ``Timing``."""
    return pb.ResponseMetadata(
        queue_ms=timing.queue_ms,
        compute_ms=timing.compute_ms,
        batch_size=timing.batch_size,
        batch_tokens=timing.batch_tokens,
        forwards=timing.forwards,
    )
