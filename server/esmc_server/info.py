"""What a server says about itself (the ``Info`` RPC, the in-process embedder): built once."""

from __future__ import annotations

import dataclasses
from importlib import metadata as importlib_metadata

from esmc import tokenizer
from esmc import ESMC
from esmc.quantize import is_int8
from esmc_server.config import BatchingConfig


def server_version() -> str:
    try:
        return importlib_metadata.version("esmc-serve")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class ServerInfo:
    """The served model, its limits and the server's version (plain values)."""

    model_name: str
    d_model: int
    n_heads: int
    n_layers: int
    vocabulary: tuple[str, ...]
    max_length: int  # tokens per protein, BOS and EOS included
    dtype: str
    device: str
    batching: BatchingConfig
    max_message_bytes: int
    server_version: str
    logits_width: int
    trained_context: int


def describe(
    model_name: str, model: ESMC, max_tokens: int, batching: BatchingConfig, max_message_bytes: int
) -> ServerInfo:
    shape = model.config
    return ServerInfo(
        model_name=model_name,
        d_model=shape.d_model,
        n_heads=shape.n_heads,
        n_layers=shape.n_layers,
        vocabulary=tuple(tokenizer.VOCABULARY),
        max_length=max_tokens,
        dtype="int8" if is_int8(model) else str(model.dtype).removeprefix("torch."),
        device=str(model.device),
        batching=batching,
        max_message_bytes=max_message_bytes,
        server_version=server_version(),
        logits_width=shape.vocab_rows,
        trained_context=shape.max_length,
    )
