"""Building request messages, shared by the sync and async clients.

A protein may be given as a sequence string (``"MKT_L"``), an object with a string
``sequence`` attribute (:class:`ESMProtein`, the reference's), token ids (a list, a numpy
array, or an object whose ``sequence`` holds ids, such as :class:`ESMProteinTensor`). Configs
are read by field name, so the reference ``esm``/``esmc`` config objects work too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.tensors import dtype_enum
from esmc_client.types import GenerationConfig, LogitsConfig, SamplingConfig

ProteinLike = Any  # str | ESMProtein | ESMProteinTensor | Sequence[int] | np.ndarray

POOLINGS = {"mean": pb.POOLING_MEAN, "none": pb.POOLING_NONE, None: pb.POOLING_NONE}

_OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
_TRACK_FLAGS = ("structure", "secondary_structure", "sasa", "function", "residue_annotations")


def set_input(request, protein: ProteinLike) -> None:
    """Fill the ``input`` oneof of ``request`` from ``protein``."""
    sequence = getattr(protein, "sequence", protein)
    if isinstance(sequence, str):
        request.protein.sequence = sequence
        return
    if sequence is None:
        raise ValueError("protein has no sequence")
    request.tokens.CopyFrom(token_message(sequence))


def token_message(tokens: Any) -> pb.ESMProteinTensor:
    """Token ids (a list, an array, or an object whose ``sequence`` holds them) -> message."""
    ids = np.asarray(getattr(tokens, "sequence", tokens))
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"token ids must be a 1-d integer sequence, got dtype {ids.dtype} and shape {ids.shape}"
        )
    return pb.ESMProteinTensor(sequence=ids.tolist())


def output_dtype_enum(output_dtype: str) -> int:
    if output_dtype not in _OUTPUT_DTYPES:
        raise ValueError(f"output_dtype must be one of {_OUTPUT_DTYPES}, got {output_dtype!r}")
    return dtype_enum(output_dtype)


def logits_config_message(config: LogitsConfig | Any | None) -> pb.LogitsConfig:
    """``LogitsConfig`` (ours or the reference's) -> message; ``None`` asks for logits."""
    if config is None:
        config = LogitsConfig(sequence=True)
    message = pb.LogitsConfig(
        sequence=bool(getattr(config, "sequence", False)),
        return_embeddings=bool(getattr(config, "return_embeddings", False)),
        return_hidden_states=bool(getattr(config, "return_hidden_states", False)),
        return_mean_embedding=bool(getattr(config, "return_mean_embedding", False)),
        return_mean_hidden_states=bool(getattr(config, "return_mean_hidden_states", False)),
    )
    for flag in _TRACK_FLAGS:  # declared tracks: the server answers INVALID_ARGUMENT
        setattr(message, flag, bool(getattr(config, flag, False)))
    layer = int(getattr(config, "ith_hidden_layer", -1))
    if layer != -1:  # unset means all blocks, the reference's -1
        message.ith_hidden_layer = layer
    return message


def logits_request(
    protein: ProteinLike, config: LogitsConfig | Any | None = None, output_dtype: str = "float32"
) -> pb.LogitsRequest:
    request = pb.LogitsRequest(
        config=logits_config_message(config), output_dtype=output_dtype_enum(output_dtype)
    )
    set_input(request, protein)
    return request


def embed_request(
    request_id: str,
    protein: ProteinLike,
    *,
    layer: int | None = -1,
    pool: str | None = "mean",
    output_dtype: str = "float32",
    model: str = "",
) -> pb.EmbedRequest:
    """``layer``: -1 (or None) final embeddings, 0..n-1 a block's output, -2.. from the end."""
    if pool not in POOLINGS:
        raise ValueError(f"pool must be 'mean' or 'none', got {pool!r}")
    request = pb.EmbedRequest(
        id=request_id, pooling=POOLINGS[pool], output_dtype=output_dtype_enum(output_dtype),
        model=model,
    )
    if layer is not None:
        request.layer = int(layer)
    set_input(request, protein)
    return request


def embed_items(sequences: Iterable | Mapping) -> list[tuple[str, ProteinLike]]:
    """``(id, protein)`` pairs from a mapping, ``(id, protein)`` pairs, or bare proteins
    (whose ids become their positions ``"0"``, ``"1"``, ...)."""
    if isinstance(sequences, Mapping):
        return [(str(k), v) for k, v in sequences.items()]
    items = []
    for i, item in enumerate(sequences):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            items.append(item)
        else:
            items.append((str(i), item))
    return items


def generation_config_message(config: GenerationConfig | Any | None) -> pb.GenerationConfig:
    """``GenerationConfig`` (ours or the reference's) -> message, every field explicit."""
    if config is None:
        config = GenerationConfig()
    return pb.GenerationConfig(
        track=getattr(config, "track", "") or "",
        invalid_ids=[int(i) for i in getattr(config, "invalid_ids", ())],
        schedule=getattr(config, "schedule", "cosine"),
        strategy=getattr(config, "strategy", "random"),
        num_steps=int(getattr(config, "num_steps", GenerationConfig.num_steps)),
        temperature=float(getattr(config, "temperature", 1.0)),
        temperature_annealing=bool(getattr(config, "temperature_annealing", True)),
        top_p=float(getattr(config, "top_p", 1.0)),
    )


def generate_request(
    protein: ProteinLike, config: GenerationConfig | Any | None = None, seed: int | None = None
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(config=generation_config_message(config))
    if seed is not None:
        request.seed = int(seed)
    set_input(request, protein)
    return request


def sampling_track_message(track: Any) -> pb.SamplingTrackConfig:
    return pb.SamplingTrackConfig(
        temperature=float(getattr(track, "temperature", 1.0)),
        top_p=float(getattr(track, "top_p", 1.0)),
        only_sample_masked_tokens=bool(getattr(track, "only_sample_masked_tokens", True)),
        invalid_ids=[int(i) for i in getattr(track, "invalid_ids", ())],
        topk_logprobs=int(getattr(track, "topk_logprobs", 0)),
    )


def sampling_config_message(config: SamplingConfig | Any | None) -> pb.SamplingConfig:
    """``SamplingConfig`` -> message; ``None`` samples the sequence track with defaults."""
    if config is None:
        return pb.SamplingConfig(sequence=pb.SamplingTrackConfig())
    message = pb.SamplingConfig(
        return_per_residue_embeddings=bool(getattr(config, "return_per_residue_embeddings", False)),
        return_mean_embedding=bool(getattr(config, "return_mean_embedding", False)),
    )
    for track in ("sequence", "structure", "secondary_structure", "sasa", "function"):
        value = getattr(config, track, None)
        if value is not None:
            getattr(message, track).CopyFrom(sampling_track_message(value))
    return message


def forward_and_sample_request(
    protein: ProteinLike,
    sampling_config: SamplingConfig | Any | None = None,
    seed: int | None = None,
    output_dtype: str = "float32",
) -> pb.ForwardAndSampleRequest:
    request = pb.ForwardAndSampleRequest(
        sampling_config=sampling_config_message(sampling_config),
        output_dtype=output_dtype_enum(output_dtype),
    )
    if seed is not None:
        request.seed = int(seed)
    set_input(request, protein)
    return request
