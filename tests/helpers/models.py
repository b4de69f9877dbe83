"""Tiny random models, reference models on the same weights, and comparison helpers."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from esmc import ESMC, ESMCConfig
from esmc.tokenizer import PAD_ID, encode

TINY = ESMCConfig(d_model=128, n_heads=2, n_layers=3, name="test-tiny")
"""Head dim 64 like the published models; a few hundred thousand parameters."""
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Fill every parameter with seeded noise: norm scales around 1, the rest N(0, std)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator) * std
            if param.ndim == 1 and name.endswith("weight"):
                noise += 1.0
            param.copy_(noise)
    return module


def random_model(config: ESMCConfig = TINY, seed: int = 0) -> ESMC:
    return randomize_(ESMC(config), seed=seed).eval()


def seeded_model(d_model: int = 64, n_heads: int = 2, n_layers: int = 3, seed: int = 0) -> ESMC:
    """An ESMC with torch's default initialisation under ``seed``, float32 on the CPU, eval
    mode: the same for the same arguments (the servers' tests use these shapes)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ESMC(ESMCConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers))
    return model.eval()


def random_sequences(lengths: list[int], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(AMINO_ACIDS) for _ in range(n)) for n in lengths]


def random_sequence(rng: np.random.Generator, length: int) -> str:
    """One random protein of ``length`` residues drawn from ``rng``."""
    return "".join(rng.choice(list(AMINO_ACIDS), size=length))


def pad(tokens: list[torch.Tensor]) -> torch.Tensor:
    """(B, L) right-padded batch."""
    return torch.nn.utils.rnn.pad_sequence(tokens, batch_first=True, padding_value=PAD_ID)


def encode_all(sequences: list[str]) -> list[torch.Tensor]:
    return [encode(s) for s in sequences]


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|."""
    actual, reference = actual.double(), reference.double()
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def reference_esmc(config: ESMCConfig, state_dict: dict | None = None):
    """The official ``esm`` ESMC (SDPA path) with ``state_dict`` loaded strictly."""
    import esm.sdk  # noqa: F401  (must come before esm.models.esmc: circular import)
    from esm.models.esmc import ESMC as ReferenceESMC
    from esm.tokenization import get_esmc_model_tokenizers

    model = ReferenceESMC(
        d_model=config.d_model,
        n_heads=config.n_heads,
        n_layers=config.n_layers,
        tokenizer=get_esmc_model_tokenizers(),
        use_flash_attn=False,
    )
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def transformers_config(config: ESMCConfig):
    """A ``transformers`` EsmcConfig of the same shape."""
    from transformers import EsmcConfig

    return EsmcConfig(
        hidden_size=config.d_model,
        num_attention_heads=config.n_heads,
        num_hidden_layers=config.n_layers,
        intermediate_size=config.ffn_hidden,
    )


def reference_tokenizers():
    """The tokenizer collection ``esm.utils.generation`` needs for sequence generation."""
    from esmc_client.esm_sdk import sdk_tokenizers

    return sdk_tokenizers()
