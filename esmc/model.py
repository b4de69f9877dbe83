"""The ESMC network: state-dict keys and shapes identical to the reference ``esm`` package.

Modules and forwards only (torch and the library's low-level modules); the class users load,
:class:`esmc.ESMC` (weights, ``logits``, the esm SDK's methods), builds on
:class:`ESMCNetwork` in :mod:`esmc.pretrained`.

Two forwards share the weights:
- :meth:`ESMCNetwork.forward` takes padded ``(B, L)`` tokens like the reference;
- :meth:`ESMCNetwork.forward_packed` takes all sequences end to end with ``cu_seqlens``:
  rotary positions restart per sequence and attention never crosses sequences (varlen flash
  attention on CUDA, per-sequence SDPA on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from esmc.attention import PackedLayout, PaddedLayout, SequenceLayout
from esmc.config import ESMCConfig
from esmc.tokenizer import PAD_ID

ROTARY_BASE = 10000.0


@dataclasses.dataclass
class ESMCOutput:
    sequence_logits: torch.Tensor | None  # (B, L, 64) or (T, 64) packed; None if not asked
    embeddings: torch.Tensor  # (B, L, d) or (T, d), after the final norm
    hidden_states: torch.Tensor | None  # (layers kept, B, L, d) or (layers kept, T, d)


class Rotary(NamedTuple):
    """cos and sin of rotary positions (both halves of a head share them): (rows, d_head / 2)
    as built, (positions, 1, d_head / 2) as a block takes them."""

    cos: torch.Tensor
    sin: torch.Tensor


class RotaryCache:
    """cos/sin tables of rotary positions 0..n-1, kept per (device, dtype) and grown on demand.

    Tables are ``(rows, d_head / 2)`` (both halves share them), angles in fp32 as the reference
    computes them, then cast to the compute dtype. Rows grow to the next power of two (at least
    256), so a server sees a handful of rebuilds at most; every forward after that takes views
    (padded) or one gather (packed). Not part of the state dict.
    """

    MIN_ROWS = 256

    def __init__(self, d_head: int):
        self.d_head = d_head
        self._tables: dict[tuple[torch.device, torch.dtype], Rotary] = {}

    def tables(self, rows: int, device: torch.device, dtype: torch.dtype) -> Rotary:
        """cos, sin of shape (>= rows, d_head / 2) on ``device`` in ``dtype``."""
        key = (torch.device(device), dtype)
        cached = self._tables.get(key)
        if cached is None or cached[0].shape[0] < rows:
            size = max(self.MIN_ROWS, 1 << max(rows - 1, 0).bit_length())
            positions = torch.arange(size, device=device)
            cached = rotary_tables(positions, self.d_head, dtype)
            self._tables[key] = cached
        return cached

    def for_length(self, length: int, device, dtype) -> Rotary:
        """Positions 0..length-1: views (length, 1, d_head / 2) for x of (..., length, heads, 64)."""
        cos, sin = self.tables(length, device, dtype)
        return Rotary(cos[:length, None], sin[:length, None])

    def for_positions(self, positions: torch.Tensor, max_position: int, dtype) -> Rotary:
        """Any positions (T,), all < ``max_position``: gathered rows (T, 1, d_head / 2)."""
        cos, sin = self.tables(max_position, positions.device, dtype)
        return Rotary(cos[positions, None], sin[positions, None])


def rotary_tables(positions: torch.Tensor, d_head: int, dtype: torch.dtype) -> Rotary:
    """cos/sin of shape (*positions.shape, d_head / 2), fp32 angles (one half; both share it)."""
    inv_freq = 1.0 / (
        ROTARY_BASE
        ** (torch.arange(0, d_head, 2, device=positions.device, dtype=torch.float32) / d_head)
    )
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., d_head / 2)
    return Rotary(torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., L, heads, d_head); cos/sin: (L, 1, d_head / 2). Halves rotated (not interleaved).

    ``[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]`` written as one multiply of both halves
    by cos into a fresh tensor and two fused multiply-adds into its halves: no concatenation,
    no negated copy (the reference builds ``cat(-x2, x1)``; the sums are the same).
    """
    half = x.shape[-1] // 2
    out = x.unflatten(-1, (2, half)) * cos.unsqueeze(-2)  # (..., L, heads, 2, half)
    x1, x2 = x[..., :half], x[..., half:]
    out[..., 0, :].addcmul_(x2, sin, value=-1)
    out[..., 1, :].addcmul_(x1, sin)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, config: ESMCConfig):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.d_head = config.d_head
        self.layernorm_qkv = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 3 * d, bias=False))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.q_ln = nn.LayerNorm(d, bias=False)
        self.k_ln = nn.LayerNorm(d, bias=False)

    def forward(self, x: torch.Tensor, layout: SequenceLayout, rotary: Rotary) -> torch.Tensor:
        q, k, v = self.project(x, rotary)
        return self.out_proj(layout.attend(q, k, v).flatten(-2))

    def project(self, x: torch.Tensor, rotary: Rotary) -> tuple[torch.Tensor, ...]:
        """q, k, v of shape (..., L, heads, 64): q/k normalised and rotated, v a view."""
        q, k, v = self.layernorm_qkv(x).chunk(3, dim=-1)  # views of one (..., L, 3d) tensor
        dtype = q.dtype
        heads = (self.n_heads, self.d_head)
        q = apply_rotary(self.q_ln(q).to(dtype).unflatten(-1, heads), *rotary)
        k = apply_rotary(self.k_ln(k).to(dtype).unflatten(-1, heads), *rotary)
        return q, k, v.unflatten(-1, heads)


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        if not _eager_inference():
            return F.silu(gate) * up
        # inference: in place, in the first half of the fc1 output (the next Linear reads the
        # strided view directly)
        return F.silu(gate, inplace=True).mul_(up)


class Block(nn.Module):
    def __init__(self, config: ESMCConfig):
        super().__init__()
        d, h = config.d_model, config.ffn_hidden
        self.attn = Attention(config)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 2 * h, bias=False), SwiGLU(), nn.Linear(h, d, bias=False)
        )
        self.scale = config.residual_scale

    def forward(self, x: torch.Tensor, layout: SequenceLayout, rotary: Rotary) -> torch.Tensor:
        q, k, v = self.attn.project(x, rotary)
        return self.finish(x, layout.attend(q, k, v))

    def finish(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """After attention: out projection, residual, feed-forward, residual.

        Eager inference computes ``x + f(x) / s`` in one pass, ``add(x, f(x), alpha=1 / s)``,
        the second residual in place into the first one's fresh sum. Under autograd and
        ``torch.compile`` it is ``x + f(x) * (1 / s)``: inductor (torch 2.13) drops an ``alpha``
        computed from a module attribute (wrong outputs), and fuses the plain form anyway.
        """
        alpha = 1.0 / self.scale
        attended = self.attn.out_proj(context.flatten(-2))
        if not _eager_inference():
            x = x + attended * alpha
            return x + self.ffn(x) * alpha
        x = torch.add(x, attended, alpha=alpha)
        return x.add_(self.ffn(x), alpha=alpha)


class TransformerStack(nn.Module):
    def __init__(self, config: ESMCConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model, bias=False)


class BlockRunner(Protocol):
    """Runs one block in place of ``block(x, layout, rotary)``: a compiled block stack
    (:class:`esmc.compiled.CompiledBlocks`)."""

    def __call__(
        self, block: Block, x: torch.Tensor, layout: SequenceLayout, rotary: Rotary
    ) -> torch.Tensor: ...


class ESMCNetwork(nn.Module):
    """ESM Cambrian's network. ``state_dict()`` matches the reference's legacy layout key for key.

    ``compiled_blocks``: when set (by :func:`esmc.compiled.compile_blocks`), every block runs
    through it instead of eagerly. ``quantization``: what :mod:`esmc.quantize` did to the
    weights (None: nothing). ``rotary_cache``: the rotary tables (not in the state dict).
    """

    def __init__(self, config: ESMCConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_rows, d)
        self.transformer = TransformerStack(config)
        self.sequence_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, config.vocab_rows)
        )
        self.rotary_cache = RotaryCache(config.d_head)
        self.compiled_blocks: BlockRunner | None = None
        self.quantization: str | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # -- forwards ---------------------------------------------------------------------------

    def forward(
        self,
        sequence_tokens: torch.Tensor,
        sequence_id: torch.Tensor | None = None,
        hidden_layers: Sequence[int] | None = None,
        *,
        return_logits: bool = True,
    ) -> ESMCOutput:
        """Padded forward like the reference: tokens (B, L); pad attends only to pad.

        ``hidden_layers``: which block outputs to keep (default all, as the reference).
        ``return_logits=False`` skips the sequence head (``sequence_logits`` is None): for
        callers that want embeddings or hidden states only.
        """
        if sequence_id is None:
            sequence_id = sequence_tokens != PAD_ID
        x = self.embed(sequence_tokens)  # (B, L, d)
        length = sequence_tokens.shape[1]
        rotary = self.rotary_cache.for_length(length, x.device, self._compute_dtype(x))
        return self._run(x, rotary, PaddedLayout(sequence_id), hidden_layers, return_logits)

    def forward_packed(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        hidden_layers: Sequence[int] | None = (),
        *,
        return_logits: bool = True,
    ) -> ESMCOutput:
        """Packed forward: tokens (T,) of sequences end to end, ``cu_seqlens`` (N+1,) int32.

        Outputs are (T, ...) in the same order; by default no hidden states are kept.
        ``return_logits=False`` skips the sequence head. Positions are computed on the device
        without reading ``cu_seqlens`` back (no host sync on CUDA).
        """
        layout = PackedLayout(cu_seqlens.to(torch.int32), int(max_seqlen))
        x = self.embed(tokens)  # (T, d)
        positions = layout.positions(tokens.shape[0])
        rotary = self.rotary_cache.for_positions(positions, int(max_seqlen), self._compute_dtype(x))
        return self._run(x, rotary, layout, hidden_layers, return_logits)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return torch.get_autocast_dtype("cuda") if _autocasting(x) else x.dtype

    def _run(
        self,
        x: torch.Tensor,
        rotary: Rotary,
        layout: SequenceLayout,
        hidden_layers: Sequence[int] | None,
        return_logits: bool,
    ) -> ESMCOutput:
        keep = set(range(self.config.n_layers) if hidden_layers is None else hidden_layers)
        compiled = self.compiled_blocks
        hiddens = []
        for i, block in enumerate(self.transformer.blocks):
            if compiled is None:
                x = block(x, layout, rotary)
            else:
                x = compiled(block, x, layout, rotary)
            if i in keep:
                hiddens.append(x)
        embeddings = self.transformer.norm(x)
        logits = self.sequence_head(embeddings) if return_logits else None
        hidden_states = torch.stack(hiddens) if hiddens else None
        return ESMCOutput(logits, embeddings, hidden_states)


def _eager_inference() -> bool:
    """No autograd and not being compiled: the in-place steps are safe and save memory traffic.

    Under ``torch.compile`` the functional form is used (inductor fuses it anyway; the in-place
    SwiGLU on a view of the fc1 output miscompiled: wrong outputs on esmc-tiny's shape).
    """
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _autocasting(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.is_autocast_enabled("cuda")
