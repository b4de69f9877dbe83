"""Batched logits for many proteins at once, one forward, per-protein outputs.

This is what a server's batcher calls: a list of token sequences (each ``<cls> ... <eos>``)
and one :class:`LogitsConfig` per sequence; the result is one :class:`LogitsOutput` per
sequence with per-protein shapes (no batch dimension) in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from esmc.model import ESMC, ESMCOutput
from esmc.tokenizer import PAD_ID
from esmc.types import ForwardTrackData, LogitsConfig, LogitsOutput


class InvalidLayerError(ValueError):
    """``ith_hidden_layer`` names a block the model does not have."""


def hidden_layer_indices(config: LogitsConfig, n_layers: int) -> list[int]:
    """Blocks whose outputs ``config`` asks for (reference numbering: 0 = first block).

    -1 means all blocks; other negative values count from the end (-2 = second to last).
    """
    if not config.needs_hidden_states:
        return []
    i = config.ith_hidden_layer
    if i == -1:
        return list(range(n_layers))
    if not -n_layers <= i < n_layers:
        raise InvalidLayerError(
            f"ith_hidden_layer={i} does not exist: the model has {n_layers} layers "
            f"(valid: -1 for all, 0..{n_layers - 1}, or -{n_layers}..-2 from the end)"
        )
    return [i % n_layers]


def autocast_for(model: ESMC):
    """bf16 autocast on CUDA as the reference runs; nothing on the CPU."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_logits(
    model: ESMC,
    tokens: Sequence[torch.Tensor],
    configs: Sequence[LogitsConfig],
    *,
    packed: bool = True,
) -> list[LogitsOutput]:
    """One forward over all ``tokens`` (packed end to end, or padded), split per protein."""
    if len(tokens) != len(configs):
        raise ValueError("one LogitsConfig per token sequence is required")
    n_layers = model.config.n_layers
    wanted = [hidden_layer_indices(c, n_layers) for c in configs]
    keep = sorted({i for w in wanted for i in w})
    lengths = [int(t.shape[0]) for t in tokens]
    with autocast_for(model):
        if packed:
            out = _forward_packed(model, tokens, keep)
            rows = _packed_rows(lengths)
        else:
            out = _forward_padded(model, tokens, keep)
            rows = [(b, slice(0, n)) for b, n in enumerate(lengths)]
    return [
        _slice_output(out, row, config, [keep.index(i) for i in w])
        for row, config, w in zip(rows, configs, wanted)
    ]


def _forward_packed(model: ESMC, tokens: Sequence[torch.Tensor], keep: list[int]) -> ESMCOutput:
    device = model.device
    flat = torch.cat([t.to(device) for t in tokens])
    lengths = torch.tensor([int(t.shape[0]) for t in tokens])
    cu = torch.zeros(len(tokens) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    return model.forward_packed(flat, cu.to(device), int(lengths.max()), hidden_layers=keep)


def _forward_padded(model: ESMC, tokens: Sequence[torch.Tensor], keep: list[int]) -> ESMCOutput:
    batch = torch.nn.utils.rnn.pad_sequence(list(tokens), batch_first=True, padding_value=PAD_ID)
    return model(batch.to(model.device), hidden_layers=keep)


def _packed_rows(lengths: list[int]) -> list[tuple]:
    rows, start = [], 0
    for n in lengths:
        rows.append((slice(start, start + n),))
        start += n
    return rows


def _slice_output(out: ESMCOutput, row: tuple, config: LogitsConfig, layers: list[int]) -> LogitsOutput:
    """One protein's outputs in float32; ``row`` indexes its tokens in the forward's outputs."""
    embeddings = out.embeddings[row].float()  # (L+2, d)
    hidden = None
    if layers:
        hidden = out.hidden_states[(layers, *row)].float()  # (layers, L+2, d)
    return LogitsOutput(
        logits=ForwardTrackData(sequence=out.sequence_logits[row].float() if config.sequence else None),
        embeddings=embeddings if config.return_embeddings else None,
        hidden_states=hidden if config.return_hidden_states else None,
        mean_embedding=embeddings[1:-1].mean(0) if config.return_mean_embedding else None,
        mean_hidden_states=hidden[:, 1:-1].mean(1) if config.return_mean_hidden_states else None,
    )
