"""The ESMC network: state-dict keys and shapes identical to the reference ``esm`` package.

Two forwards share the weights:
- :meth:`ESMC.forward` takes padded ``(B, L)`` tokens like the reference;
- :meth:`ESMC.forward_packed` takes all sequences end to end with ``cu_seqlens``: rotary
  positions restart per sequence and attention never crosses sequences (varlen flash
  attention on CUDA, per-sequence SDPA on the CPU).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from esmc.attention import PackedLayout, PaddedLayout, SequenceLayout
from esmc.config import ESMCConfig
from esmc.tokenizer import BOS_ID, EOS_ID, PAD_ID
from esmc.types import ESMProteinTensor, ForwardTrackData, LogitsConfig, LogitsOutput

ROTARY_BASE = 10000.0


@dataclasses.dataclass
class ESMCOutput:
    sequence_logits: torch.Tensor  # (B, L, 64) or (T, 64) packed
    embeddings: torch.Tensor  # (B, L, d) or (T, d), after the final norm
    hidden_states: torch.Tensor | None  # (layers kept, B, L, d) or (layers kept, T, d)


def rotary_tables(
    positions: torch.Tensor, d_head: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (*positions.shape, 1, d_head), halves layout, fp32 angles."""
    inv_freq = 1.0 / (
        ROTARY_BASE
        ** (torch.arange(0, d_head, 2, device=positions.device, dtype=torch.float32) / d_head)
    )
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., d_head / 2)
    cos = torch.cos(freqs).to(dtype)
    sin = torch.sin(freqs).to(dtype)
    return torch.cat([cos, cos], -1).unsqueeze(-2), torch.cat([sin, sin], -1).unsqueeze(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (..., L, heads, d_head); rotate first and second halves (not interleaved)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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

    def forward(self, x: torch.Tensor, layout: SequenceLayout, rotary: tuple) -> torch.Tensor:
        q, k, v = self.layernorm_qkv(x).chunk(3, dim=-1)  # (..., L, d) each
        q = self.q_ln(q).to(q.dtype)
        k = self.k_ln(k).to(q.dtype)
        heads = (self.n_heads, self.d_head)
        q = apply_rotary(q.unflatten(-1, heads), *rotary)  # (..., L, heads, 64)
        k = apply_rotary(k.unflatten(-1, heads), *rotary)
        context = layout.attend(q, k, v.unflatten(-1, heads))  # (..., L, heads, 64)
        return self.out_proj(context.flatten(-2))


class SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class Block(nn.Module):
    def __init__(self, config: ESMCConfig):
        super().__init__()
        d, h = config.d_model, config.ffn_hidden
        self.attn = Attention(config)
        self.ffn = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, 2 * h, bias=False), SwiGLU(), nn.Linear(h, d, bias=False)
        )
        self.scale = config.residual_scale

    def forward(self, x: torch.Tensor, layout: SequenceLayout, rotary: tuple) -> torch.Tensor:
        x = x + self.attn(x, layout, rotary) / self.scale
        return x + self.ffn(x) / self.scale


class TransformerStack(nn.Module):
    def __init__(self, config: ESMCConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.norm = nn.LayerNorm(config.d_model, bias=False)


class ESMC(nn.Module):
    """ESM Cambrian. ``state_dict()`` matches the reference's legacy layout key for key."""

    def __init__(self, config: ESMCConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_rows, d)
        self.transformer = TransformerStack(config)
        self.sequence_head = nn.Sequential(
            nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, config.vocab_rows)
        )

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @classmethod
    def from_pretrained(cls, name_or_path: str = "esmc-tiny", **kwargs) -> ESMC:
        """Load weights by registry name, Hugging Face repo id, or local file/directory.

        See :func:`esmc.weights.load_pretrained` for the arguments and layouts.
        """
        from esmc.weights import load_pretrained

        return load_pretrained(name_or_path, **kwargs)

    @torch.no_grad()
    def logits(self, input: ESMProteinTensor, config: LogitsConfig | None = None) -> LogitsOutput:
        """The reference's ``logits`` call: one padded forward over ``input.sequence``.

        ``input.sequence``: (L,) token ids (a batch dimension is added) or a padded (B, L) batch.
        Outputs keep the batch dimension as the reference's do: logits (B, L, 64), embeddings
        (B, L, d), hidden states (layers, B, L, d) in the model's compute dtype (bf16 autocast on
        CUDA). Means are over residues only (BOS, EOS and padding excluded), float32:
        mean_embedding (B, d), mean_hidden_states (layers, B, d).
        """
        from esmc.inference import autocast_for, hidden_layer_indices

        config = LogitsConfig() if config is None else config
        if input.sequence is None:
            raise ValueError("ESMC.logits needs input.sequence (token ids)")
        tokens = input.sequence.to(self.device)
        tokens = tokens.unsqueeze(0) if tokens.ndim == 1 else tokens  # (B, L)
        layers = hidden_layer_indices(config, self.config.n_layers)
        with autocast_for(self):
            out = self(tokens, hidden_layers=layers)
        residues = residue_mask(tokens)  # (B, L)
        return LogitsOutput(
            logits=ForwardTrackData(sequence=out.sequence_logits if config.sequence else None),
            embeddings=out.embeddings if config.return_embeddings else None,
            hidden_states=out.hidden_states if config.return_hidden_states else None,
            mean_embedding=(
                masked_mean(out.embeddings, residues) if config.return_mean_embedding else None
            ),
            mean_hidden_states=(
                masked_mean(out.hidden_states, residues)
                if config.return_mean_hidden_states
                else None
            ),
        )

    # -- forwards ---------------------------------------------------------------------------

    def forward(
        self,
        sequence_tokens: torch.Tensor,
        sequence_id: torch.Tensor | None = None,
        hidden_layers: Sequence[int] | None = None,
    ) -> ESMCOutput:
        """Padded forward like the reference: tokens (B, L); pad attends only to pad.

        ``hidden_layers``: which block outputs to keep (default all, as the reference).
        """
        if sequence_id is None:
            sequence_id = sequence_tokens != PAD_ID
        positions = torch.arange(sequence_tokens.shape[1], device=sequence_tokens.device)
        layout = PaddedLayout(sequence_id)
        return self._run(sequence_tokens, positions, layout, hidden_layers)

    def forward_packed(
        self,
        tokens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        hidden_layers: Sequence[int] | None = (),
    ) -> ESMCOutput:
        """Packed forward: tokens (T,) of sequences end to end, ``cu_seqlens`` (N+1,) int32.

        Outputs are (T, ...) in the same order; by default no hidden states are kept.
        """
        layout = PackedLayout(cu_seqlens.to(torch.int32), int(max_seqlen))
        return self._run(tokens, layout.positions(), layout, hidden_layers)

    def _run(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        layout: SequenceLayout,
        hidden_layers: Sequence[int] | None,
    ) -> ESMCOutput:
        keep = range(self.config.n_layers) if hidden_layers is None else hidden_layers
        keep = set(keep)
        x = self.embed(tokens)  # (B, L, d) or (T, d)
        compute_dtype = torch.get_autocast_dtype("cuda") if _autocasting(x) else x.dtype
        rotary = rotary_tables(positions, self.config.d_head, compute_dtype)
        hiddens = []
        for i, block in enumerate(self.transformer.blocks):
            x = block(x, layout, rotary)
            if i in keep:
                hiddens.append(x)
        embeddings = self.transformer.norm(x)
        logits = self.sequence_head(embeddings)
        hidden_states = torch.stack(hiddens) if hiddens else None
        return ESMCOutput(logits, embeddings, hidden_states)


def _autocasting(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and torch.is_autocast_enabled("cuda")


def residue_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) True at residue positions: not BOS, EOS or padding."""
    return (tokens != BOS_ID) & (tokens != EOS_ID) & (tokens != PAD_ID)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (..., B, L, d) over the positions where mask (B, L) is True: (..., B, d), fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (x.float() * weights).sum(-2) / weights.sum(-2).clamp(min=1)
