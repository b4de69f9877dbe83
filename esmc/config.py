"""Model shapes: a frozen config and the registry of known ESMC sizes."""

from __future__ import annotations

import dataclasses
import math

from esmc.tokenizer import EMBED_ROWS

TRAINED_CONTEXT = 2048
"""Tokens (BOS and EOS included) the published models were trained on."""


@dataclasses.dataclass(frozen=True)
class ESMCConfig:
    d_model: int
    n_heads: int
    n_layers: int
    name: str = "custom"
    max_length: int = TRAINED_CONTEXT  # tokens, BOS and EOS included
    vocab_rows: int = EMBED_ROWS

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.d_model, self.n_heads, self.n_layers) < 1:
            raise ValueError("d_model, n_heads and n_layers must be positive")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        """SwiGLU width: 8/3 * d rounded up to a multiple of 256 (the reference formula)."""
        return int(((8 / 3 * self.d_model) + 255) // 256 * 256)

    @property
    def residual_scale(self) -> float:
        """Residual branches are divided by sqrt(n_layers / 36)."""
        return math.sqrt(self.n_layers / 36)


CONFIGS: dict[str, ESMCConfig] = {
    "esmc-300m": ESMCConfig(name="esmc-300m", d_model=960, n_heads=15, n_layers=30),
    "esmc-600m": ESMCConfig(name="esmc-600m", d_model=1152, n_heads=18, n_layers=36),
    "esmc-6b": ESMCConfig(name="esmc-6b", d_model=2560, n_heads=40, n_layers=80),
    "esmc-tiny": ESMCConfig(name="esmc-tiny", d_model=192, n_heads=3, n_layers=4),
}


OFFICIAL_NAMES: dict[str, str] = {
    "esmc_300m": "esmc-300m",  # esm.models.esmc.ESMC.from_pretrained
    "esmc_600m": "esmc-600m",
    "esmc-300m-2024-12": "esmc-300m",  # Forge model names
    "esmc-600m-2024-12": "esmc-600m",
    "esmc-6b-2024-12": "esmc-6b",
}
"""The official ``esm`` package's model names, accepted as aliases of the registry names."""


def get_config(name: str) -> ESMCConfig:
    """The shape of a registry model; the official names (``esmc_300m``...) are accepted."""
    try:
        return CONFIGS[OFFICIAL_NAMES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}") from None
