"""``torch.compile`` of the block stack, shared by every block and every batch shape.

Each block runs as two compiled functions around an eager attention:

- ``project(block, x, rotary)``: norm, q;k;v projection, q/k norms, rotary (one fused region);
- ``finish(block, x, context)``: out projection, residual, norm, SwiGLU, residual.

Attention stays eager because its layout is data-dependent (per-sequence SDPA on the CPU,
varlen flash attention on CUDA). The functions take the block as an argument, so its weights
are graph inputs: one graph serves all the blocks (dynamo does not specialise on which
module it got), and ``dynamic=True`` makes the token count symbolic, so packed batches of any
size reuse it. What can still trigger a compile is a new rank or dtype: packed (T, d) and
padded (B, L, d) inputs, batch size 1 vs more in the padded forward, float32 vs bf16, grad mode.
``torch._dynamo.config.recompile_limit`` (8 by default) bounds them; past it dynamo falls back
to eager for that function instead of compiling again.

:func:`compile_blocks` compiles and warms up the shapes a server feeds (packed by default) before
it serves, so that no request waits for a compile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from esmc.attention import SequenceLayout
from esmc.inference import autocast_for
from esmc.model import Block, ESMCNetwork, Rotary
from esmc.tokenizer import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)

WARMUP_LENGTHS = (37, 61)
"""Token counts of the warm-up sequences (any sizes > 1 do: the graphs are dynamic)."""


def _project(block: Block, x: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, ...]:
    return block.attn.project(x, rotary)


def _finish(block: Block, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    return block.finish(x, context)


class CompiledBlocks:
    """Runs one block as compiled ``project`` -> eager attention -> compiled ``finish``."""

    def __init__(self, dynamic: bool = True, mode: str | None = None):
        self.project = torch.compile(_project, dynamic=dynamic, mode=mode)
        self.finish = torch.compile(_finish, dynamic=dynamic, mode=mode)

    def __call__(
        self, block: Block, x: torch.Tensor, layout: SequenceLayout, rotary: Rotary
    ) -> torch.Tensor:
        q, k, v = self.project(block, x, rotary)
        # contiguous: one stride pattern whatever the attention returned (else a guard fails
        # and dynamo compiles ``finish`` again); eager's flatten would copy it anyway
        return self.finish(block, x, layout.attend(q, k, v).contiguous())


def compile_blocks(
    model: ESMCNetwork,
    *,
    warmup: Sequence[str] = ("packed",),
    dynamic: bool = True,
    mode: str | None = None,
) -> ESMCNetwork:
    """Make ``model``'s forwards run the compiled block stack; compile ``warmup`` shapes now.

    ``warmup``: any of ``packed`` (the server's default layout), ``padded`` (one row and two
    rows). Returns ``model`` itself; :func:`uncompile` undoes it.
    """
    model.compiled_blocks = CompiledBlocks(dynamic=dynamic, mode=mode)
    start = time.perf_counter()
    warm_up(model, warmup)
    if warmup:
        log.info("compiled the block stack (%s) in %.1f s", ", ".join(warmup), time.perf_counter() - start)
    return model


def uncompile(model: ESMCNetwork) -> ESMCNetwork:
    model.compiled_blocks = None
    return model


def is_compiled(model: ESMCNetwork) -> bool:
    return model.compiled_blocks is not None


@torch.no_grad()
def warm_up(model: ESMCNetwork, layouts: Sequence[str]) -> None:
    """One forward per layout in ``layouts`` on throwaway tokens (under the model's autocast)."""
    device = model.device
    sequences = [_tokens(n, device) for n in WARMUP_LENGTHS]
    with autocast_for(model):
        for layout in layouts:
            if layout == "packed":
                lengths = torch.tensor(WARMUP_LENGTHS)
                cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
                cu[1:] = lengths.cumsum(0)
                model.forward_packed(torch.cat(sequences), cu.to(device), max(WARMUP_LENGTHS))
            elif layout == "padded":
                model(sequences[0][None], hidden_layers=())
                batch = torch.nn.utils.rnn.pad_sequence(sequences, batch_first=True, padding_value=PAD_ID)
                model(batch, hidden_layers=())
            else:
                raise ValueError(f"unknown warm-up layout {layout!r}; use packed or padded")


def _tokens(length: int, device: torch.device) -> torch.Tensor:
    body = torch.arange(length - 2, device=device) % 20 + 4  # residue ids 4..23
    bos = torch.tensor([BOS_ID], device=device)
    eos = torch.tensor([EOS_ID], device=device)
    return torch.cat([bos, body, eos])
