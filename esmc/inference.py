"""Batched logits for many proteins at once, one forward, per-protein outputs.

A list of token sequences (each ``<cls> ... <eos>``) and one :class:`LogitsConfig` per
sequence; the result is one :class:`LogitsOutput` per sequence with per-protein shapes (no
batch dimension). :func:`select_outputs` and :func:`outputs_to_host` are the split the
server's engine uses too: per protein on the device (means and casts included), then one
copy of what was asked for to the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from esmc.batch import TokenBatch
from esmc.model import ESMCNetwork, ESMCOutput
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


def autocast_for(model: ESMCNetwork):
    """bf16 autocast on CUDA as the reference runs; nothing on the CPU."""
    if model.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def run_logits(
    model: ESMCNetwork,
    tokens: Sequence[torch.Tensor],
    configs: Sequence[LogitsConfig],
    *,
    packed: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[LogitsOutput]:
    """One forward over all ``tokens`` (packed end to end, or padded), split per protein.

    Outputs are CPU tensors in ``dtype`` (means computed in float32 first)."""
    if len(tokens) != len(configs):
        raise ValueError("one LogitsConfig per token sequence is required")
    n_layers = model.config.n_layers
    wanted = [hidden_layer_indices(c, n_layers) for c in configs]
    keep = sorted({i for w in wanted for i in w})
    batch = TokenBatch.pack(tokens, packed=packed, device=model.device)
    with autocast_for(model):
        out = batch.forward(model, keep, return_logits=any(c.sequence for c in configs))
    parts = [
        select_outputs(out, row, config, [keep.index(i) for i in w], dtype)
        for row, config, w in zip(batch.rows(), configs, wanted)
    ]
    return [as_logits_output(part) for part in outputs_to_host(parts)]


def select_outputs(
    out: ESMCOutput,
    row: tuple,
    config: LogitsConfig,
    layers: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """One protein's outputs per ``config``, still on the forward's device: ``row`` indexes
    its positions (:meth:`TokenBatch.rows`), ``layers`` the kept hidden states it wants.
    Means (over residues, BOS/EOS excluded) are taken in float32, then everything is cast to
    ``dtype``, so only what was asked for, in the size it will be sent, leaves the device."""
    parts: dict[str, torch.Tensor] = {}
    if config.sequence:
        parts["logits"] = out.sequence_logits[row]  # (L+2, 64)
    if config.return_embeddings or config.return_mean_embedding:
        embeddings = out.embeddings[row]  # (L+2, d)
        if config.return_embeddings:
            parts["embeddings"] = embeddings
        if config.return_mean_embedding:
            parts["mean_embedding"] = embeddings.float()[1:-1].mean(0)
    if layers:
        hidden = out.hidden_states[(list(layers), *row)]  # (layers, L+2, d)
        if config.return_hidden_states:
            parts["hidden_states"] = hidden
        if config.return_mean_hidden_states:
            parts["mean_hidden_states"] = hidden.float()[:, 1:-1].mean(1)
    return {name: tensor.to(dtype) for name, tensor in parts.items()}


def outputs_to_host(parts: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Copy every protein's selected outputs to the CPU: from a GPU one copy per dtype for
    the whole batch; on the CPU each becomes its own tensor (no view keeps the batch alive)."""
    items = [(i, name, t) for i, part in enumerate(parts) for name, t in part.items()]
    host: list[dict[str, torch.Tensor]] = [{} for _ in parts]
    if not items:
        return host
    if items[0][2].device.type == "cpu":
        for i, name, t in items:
            host[i][name] = t.clone() if t._is_view() else t
        return host
    for dtype in {t.dtype for _, _, t in items}:
        group = [(i, name, t) for i, name, t in items if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for _, _, t in group]).to("cpu")
        for (i, name, t), chunk in zip(group, flat.split([t.numel() for _, _, t in group])):
            host[i][name] = chunk.view(t.shape)
    return host


def as_logits_output(parts: dict[str, torch.Tensor]) -> LogitsOutput:
    """A :class:`LogitsOutput` of one protein's selected outputs (absent fields: None)."""
    return LogitsOutput(
        logits=ForwardTrackData(sequence=parts.get("logits")),
        embeddings=parts.get("embeddings"),
        hidden_states=parts.get("hidden_states"),
        mean_embedding=parts.get("mean_embedding"),
        mean_hidden_states=parts.get("mean_hidden_states"),
    )
