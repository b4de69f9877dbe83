"""Plain esmc outputs -> wire messages, and wire tensors both ways.

Builders take plain esmc outputs and the engine's ``Timing``; they run off the event loop (the
servicer's response pool). Large responses are assembled by :class:`SerializedMessage`: tensor
bytes copied once, without the GIL.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Sequence

import numpy as np
import torch

from esmc import tokenizer
from esmc.generation import GenerationStep
from esmc.types import ForwardAndSampleOutput, LogitsConfig, LogitsOutput
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
_LITTLE_ENDIAN = sys.byteorder == "little"


def wire_dtype(dtype: torch.dtype) -> int:
    """The float wire dtype of a torch output dtype (float32, float16, bfloat16)."""
    return next(wire for wire in FLOAT_OUTPUTS if WIRE_DTYPES[wire][0] == dtype)


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


def protein_to_proto(tokens: torch.Tensor | Sequence[int]) -> pb.ESMProtein:
    return pb.ESMProtein(sequence=tokenizer.decode(tokens))


def protein_tensor_to_proto(tokens: torch.Tensor | Sequence[int]) -> pb.ESMProteinTensor:
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return pb.ESMProteinTensor(sequence=values)


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
