"""ESMC (ESM Cambrian) as a plain PyTorch library: tokenizer, model, weights, sampling."""

from esmc.config import CONFIGS, ESMCConfig, get_config
from esmc.model import ESMCNetwork, ESMCOutput
from esmc.pretrained import ESMC
from esmc.tokenizer import TokenizationError
from esmc.types import (
    ESMProtein,
    ESMProteinError,
    ESMProteinTensor,
    ForwardAndSampleOutput,
    ForwardTrackData,
    GenerationConfig,
    LogitsConfig,
    LogitsOutput,
    SamplingConfig,
    SamplingTrackConfig,
)

__all__ = [
    "CONFIGS",
    "ESMC",
    "ESMCConfig",
    "ESMCNetwork",
    "ESMCOutput",
    "ESMProtein",
    "ESMProteinError",
    "ESMProteinTensor",
    "ForwardAndSampleOutput",
    "ForwardTrackData",
    "GenerationConfig",
    "LogitsConfig",
    "LogitsOutput",
    "SamplingConfig",
    "SamplingTrackConfig",
    "TokenizationError",
    "get_config",
]
