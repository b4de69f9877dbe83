"""Parsing response messages into the dataclasses of :mod:`esmc_client.types`.

Shared by the sync and async clients. Tensors become read-only numpy views of the
message bytes (bfloat16 widened to float32); absent tensors become ``None``.
"""

from __future__ import annotations

import numpy as np

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.retry import pushback_ms
from esmc_client.tensors import to_numpy
from esmc_client.types import (
    BatchingLimits,
    EmbedResult,
    ESMCError,
    ESMProtein,
    ForwardAndSampleOutput,
    ForwardTrackData,
    GenerateStep,
    LogitsOutput,
    ModelInfo,
    ResponseMetadata,
    ServerInfo,
)


def optional_tensor(message, field: str) -> np.ndarray | None:
    """``message.field`` as an array, or None when the field is unset."""
    return to_numpy(getattr(message, field)) if message.HasField(field) else None


def parse_metadata(message: pb.ResponseMetadata) -> ResponseMetadata:
    return ResponseMetadata(
        queue_ms=message.queue_ms,
        compute_ms=message.compute_ms,
        batch_size=message.batch_size,
        batch_tokens=message.batch_tokens,
        forwards=message.forwards,
        model=message.model,
        weights_sha256=message.weights_sha256,
        dtype=message.dtype,
        server_version=message.server_version,
    )


def check_model(asked: str, answered: str) -> None:
    """Raise ``FAILED_PRECONDITION`` unless an answer to a call that named ``asked`` says it
    was served by that model. A server that predates model selection ignores the request's
    model and names none: its answer came from whatever it serves, so it is refused."""
    if not asked or answered == asked:
        return
    if not answered:
        raise ESMCError(
            "FAILED_PRECONDITION",
            f"asked for model {asked!r} but the server's answer names no model: the server "
            "predates model selection and answered with the one model it serves",
        )
    raise ESMCError(
        "FAILED_PRECONDITION", f"asked for model {asked!r} but the answer came from {answered!r}"
    )


def check_answer(asked: str, message) -> None:
    """:func:`check_info` or :func:`check_model` on a response message."""
    if isinstance(message, pb.InfoResponse):
        check_info(asked, message)
    elif "metadata" in message.DESCRIPTOR.fields_by_name:
        check_model(asked, message.metadata.model)


def check_info(asked: str, message: pb.InfoResponse) -> None:
    """As :func:`check_model` for ``Info``: a server that knows model selection lists its
    models."""
    if asked and not message.models:
        check_model(asked, "")


def _batching(b: pb.BatchingLimits) -> BatchingLimits:
    return BatchingLimits(
        max_batch_tokens=b.max_batch_tokens,
        max_batch_size=b.max_batch_size,
        max_wait_ms=b.max_wait_ms,
        max_queue=b.max_queue,
        packed=b.packed,
    )


def parse_model_info(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=m.name, aliases=tuple(m.aliases), is_default=m.is_default, d_model=m.d_model,
        n_heads=m.n_heads, n_layers=m.n_layers, max_length=m.max_length, dtype=m.dtype,
        devices=tuple(m.devices), batching=_batching(m.batching),
        weights_sha256=m.weights_sha256, weights_bytes=m.weights_bytes,
        activation_bytes=m.activation_bytes, trained_context=m.trained_context,
    )


def parse_info(message: pb.InfoResponse) -> ServerInfo:
    b = message.batching
    return ServerInfo(
        model_name=message.model_name,
        d_model=message.d_model,
        n_heads=message.n_heads,
        n_layers=message.n_layers,
        vocabulary=tuple(message.vocabulary),
        max_length=message.max_length,
        dtype=message.dtype,
        device=message.device,
        batching=BatchingLimits(
            max_batch_tokens=b.max_batch_tokens,
            max_batch_size=b.max_batch_size,
            max_wait_ms=b.max_wait_ms,
            max_queue=b.max_queue,
            packed=b.packed,
        ),
        max_message_bytes=message.max_message_bytes,
        server_version=message.server_version,
        logits_width=message.logits_width,
        trained_context=getattr(message, "trained_context", 0),  # servers before field 13: 0
        models=tuple(parse_model_info(m) for m in message.models),
    )


def token_ids(message: pb.ESMProteinTensor) -> np.ndarray:
    """The sequence track's token ids as int64 (a small copy: repeated ints, not bytes)."""
    return np.array(message.sequence, dtype=np.int64)


def parse_encode(message: pb.EncodeResponse) -> np.ndarray:
    return token_ids(message.tokens)


def parse_decode(message: pb.DecodeResponse) -> ESMProtein:
    return ESMProtein(sequence=message.protein.sequence)


def parse_logits(message: pb.LogitsResponse) -> LogitsOutput:
    return LogitsOutput(
        logits=ForwardTrackData(sequence=optional_tensor(message.logits, "sequence")),
        embeddings=optional_tensor(message, "embeddings"),
        hidden_states=optional_tensor(message, "hidden_states"),
        mean_embedding=optional_tensor(message, "mean_embedding"),
        mean_hidden_states=optional_tensor(message, "mean_hidden_states"),
        hidden_layers=tuple(message.hidden_layers),
        metadata=parse_metadata(message.metadata),
    )


def parse_embed(message: pb.EmbedResponse, request_id: str, attempts: int = 1) -> EmbedResult:
    """``request_id`` replaces the wire id (the client numbers requests itself)."""
    error = None
    if message.HasField("error"):
        error = ESMCError(message.error.code or "UNKNOWN", message.error.message)
    return EmbedResult(
        id=request_id,
        embedding=None if error else optional_tensor(message, "embedding"),
        error=error,
        metadata=parse_metadata(message.metadata),
        attempts=attempts,
    )


def parse_forward_and_sample(message: pb.ForwardAndSampleResponse) -> ForwardAndSampleOutput:
    return ForwardAndSampleOutput(
        protein_tensor=token_ids(message.protein_tensor),
        protein=ESMProtein(sequence=message.protein.sequence),
        entropy=optional_tensor(message, "entropy"),
        prob=optional_tensor(message, "prob"),
        logprob=optional_tensor(message, "logprob"),
        top_prob=optional_tensor(message, "top_prob"),
        topk_logprob=optional_tensor(message, "topk_logprob"),
        topk_tokens=optional_tensor(message, "topk_tokens"),
        per_residue_embedding=optional_tensor(message, "per_residue_embedding"),
        mean_embedding=optional_tensor(message, "mean_embedding"),
        metadata=parse_metadata(message.metadata),
    )


def parse_generate(message: pb.GenerateResponse) -> GenerateStep:
    final = message.final
    return GenerateStep(
        step=None if final else message.step + 1,  # the wire's step is 0-based
        num_steps=message.num_steps,
        positions=tuple(message.positions),
        tokens=tuple(message.tokens),
        probabilities=tuple(message.probabilities),
        entropies=tuple(message.entropies),
        temperature=message.temperature,
        sequence=message.sequence,
        final=final,
        protein=ESMProtein(sequence=message.protein.sequence) if final else None,
        protein_tensor=token_ids(message.protein_tensor) if final else None,
        metadata=parse_metadata(message.metadata),
    )


_AIO_WRITE_FAILED = "Internal error from Core"
"""What ``grpc.aio`` reports, as ``INTERNAL``, when its core fails to send a request message
of a client stream: the connection died under the stream (a server stopped or restarted)."""


def rpc_error(error, attempts: int = 1) -> ESMCError:
    """A ``grpc.RpcError`` (sync or aio) -> :class:`ESMCError` with the status name, the
    number of attempts made and the server's retry pushback (if any).

    ``grpc.aio``'s local ``INTERNAL "Internal error from Core"`` (a request write the
    transport failed; no server sends it) becomes ``UNAVAILABLE``, what it is, so that it is
    retried like the same failure seen by the blocking client."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    trailers = getattr(error, "trailing_metadata", None)
    pushback = pushback_ms(trailers()) if callable(trailers) else None
    name = code.name if code is not None else "UNKNOWN"
    if name == "INTERNAL" and details == _AIO_WRITE_FAILED:
        name, details = "UNAVAILABLE", f"the connection failed while sending ({details})"
    return ESMCError(name, details or "", attempts=attempts, pushback_ms=pushback)
