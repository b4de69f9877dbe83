"""Protobuf <-> esmc types: one import for the three jobs of the gRPC wire layer.

- :mod:`esmc_server.readers`: requests -> validated calls (sizes first, then the library's
  own validators, as ``InvalidRequest`` naming the field);
- :mod:`esmc_server.wire`: plain outputs -> response messages, and wire tensors both ways;
- :mod:`esmc_server.sizes`: response sizes known before a request is queued.

New code imports those modules; the names below keep the wire layer's one import working.
"""

from __future__ import annotations

from esmc_server.readers import (
    MAX_ID_CHARS,
    MAX_INVALID_IDS,
    OTHER_TRACKS,
    RequestLimits,
    deadline_of,
    embed_config_and_layers,
    embed_config_from_proto,
    generation_config_from_proto,
    invalid_ids_of,
    invalid_request,
    logits_config_from_proto,
    output_dtype,
    read_embed,
    read_generate,
    read_logits,
    read_sample,
    sampling_config_from_proto,
    sampling_config_from_request,
    sampling_track_from_proto,
    seed_of,
    stream_id_of,
    tokens_from_protein,
    tokens_from_request,
    tokens_from_tensor,
)
from esmc_server.sizes import (
    EMBED_SIZE_ADVICE,
    LOGITS_SIZE_ADVICE,
    SAMPLE_SIZE_ADVICE,
    Shapes,
    check_response_size,
    logits_response_bytes,
    sample_response_bytes,
)
from esmc_server.wire import (
    FLOAT_OUTPUTS,
    WIRE_DTYPES,
    SerializedMessage,
    embed_response,
    embed_response_serialized,
    embedding_of,
    forward_and_sample_response,
    generation_final_response,
    generation_step_response,
    logits_response,
    logits_response_serialized,
    metadata_to_proto,
    protein_tensor_to_proto,
    protein_to_proto,
    tensor_from_proto,
    tensor_to_proto,
    torch_dtype,
    wire_dtype,
)

__all__ = [
    "EMBED_SIZE_ADVICE", "FLOAT_OUTPUTS", "LOGITS_SIZE_ADVICE", "MAX_ID_CHARS", "MAX_INVALID_IDS",
    "OTHER_TRACKS", "RequestLimits", "SAMPLE_SIZE_ADVICE", "SerializedMessage", "Shapes",
    "WIRE_DTYPES", "check_response_size", "deadline_of", "embed_config_and_layers",
    "embed_config_from_proto", "embed_response", "embed_response_serialized", "embedding_of",
    "forward_and_sample_response", "generation_config_from_proto", "generation_final_response",
    "generation_step_response", "invalid_ids_of", "invalid_request", "logits_config_from_proto",
    "logits_response", "logits_response_bytes", "logits_response_serialized",
    "metadata_to_proto", "output_dtype", "protein_tensor_to_proto", "protein_to_proto",
    "read_embed", "read_generate", "read_logits", "read_sample", "sample_response_bytes",
    "sampling_config_from_proto", "sampling_config_from_request", "sampling_track_from_proto",
    "seed_of", "stream_id_of", "tensor_from_proto", "tensor_to_proto", "tokens_from_protein",
    "tokens_from_request", "tokens_from_tensor", "torch_dtype", "wire_dtype",
]
