"""Python client for esmc-serve (no torch needed).

    from esmc_client import ESMCClient, LogitsConfig

    with ESMCClient("127.0.0.1:50051") as client:
        out = client.logits("MKTAYIAK", LogitsConfig(sequence=True, return_mean_embedding=True))
        results = client.embed({"p1": "MKTAYIAK", "p2": "MLLV"}, layer=-1, progress=True)

The names below are imported on first use, so that ``esmc_client.fasta`` (the project's one
FASTA reader, which the ``esmc`` library re-exports) loads without grpc.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DEFAULT_MAX_MESSAGE_BYTES": "esmc_client.channel",
    "DEFAULT_TARGET": "esmc_client.channel",
    "AsyncESMCClient": "esmc_client.aio",
    "ESMCClient": "esmc_client.client",
    "RetryBudget": "esmc_client.retry",
    "RetryPolicy": "esmc_client.retry",
    "BatchingLimits": "esmc_client.types",
    "EmbedResult": "esmc_client.types",
    "ESMCError": "esmc_client.types",
    "ESMProtein": "esmc_client.types",
    "ESMProteinTensor": "esmc_client.types",
    "ForwardAndSampleOutput": "esmc_client.types",
    "ForwardTrackData": "esmc_client.types",
    "GenerateStep": "esmc_client.types",
    "GenerationConfig": "esmc_client.types",
    "LogitsConfig": "esmc_client.types",
    "LogitsOutput": "esmc_client.types",
    "ResponseMetadata": "esmc_client.types",
    "SamplingConfig": "esmc_client.types",
    "SamplingTrackConfig": "esmc_client.types",
    "ServerInfo": "esmc_client.types",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from esmc_client.channel import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET
    from esmc_client.aio import AsyncESMCClient
    from esmc_client.client import ESMCClient
    from esmc_client.retry import RetryBudget, RetryPolicy
    from esmc_client.types import (
        BatchingLimits,
        EmbedResult,
        ESMCError,
        ESMProtein,
        ESMProteinTensor,
        ForwardAndSampleOutput,
        ForwardTrackData,
        GenerateStep,
        GenerationConfig,
        LogitsConfig,
        LogitsOutput,
        ResponseMetadata,
        SamplingConfig,
        SamplingTrackConfig,
        ServerInfo,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'esmc_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
