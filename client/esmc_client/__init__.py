"""Python client for esmc-serve (no torch needed).

    from esmc_client import ESMCClient, LogitsConfig

    with ESMCClient("127.0.0.1:50051") as client:
        out = client.logits("MKTAYIAK", LogitsConfig(sequence=True, return_mean_embedding=True))
        results = client.embed({"p1": "MKTAYIAK", "p2": "MLLV"}, layer=-1, progress=True)
"""

from esmc_client.channel import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET
from esmc_client.client import AsyncESMCClient, ESMCClient
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

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "AsyncESMCClient",
    "BatchingLimits",
    "EmbedResult",
    "ESMCClient",
    "ESMCError",
    "ESMProtein",
    "ESMProteinTensor",
    "ForwardAndSampleOutput",
    "ForwardTrackData",
    "GenerateStep",
    "GenerationConfig",
    "LogitsConfig",
    "LogitsOutput",
    "ResponseMetadata",
    "RetryBudget",
    "RetryPolicy",
    "SamplingConfig",
    "SamplingTrackConfig",
    "ServerInfo",
]
