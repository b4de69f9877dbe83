"""How tokens see each other: a padded batch or sequences packed end to end.

A layout turns q, k, v of shape (..., L, heads, 64) into the attention context of the
same shape, never letting a token attend across sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch
import torch.nn.functional as F


class SequenceLayout(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class PaddedLayout:
    """(B, L) batch; ``sequence_id`` (B, L) bool (True = residue) or int ids, as the reference."""

    sequence_id: torch.Tensor

    def __post_init__(self) -> None:
        same = self.sequence_id.unsqueeze(-1) == self.sequence_id.unsqueeze(-2)  # (B, L, L)
        self.mask = same.unsqueeze(1)  # (B, 1, L, L)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, L, heads, 64) -> (B, heads, L, 64) for SDPA and back
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, self.mask).transpose(1, 2)


@dataclasses.dataclass
class PackedLayout:
    """Sequences end to end: ``cu_seqlens`` (N+1,) int32 offsets, tokens (T, ...)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    def __post_init__(self) -> None:
        self.bounds = self.cu_seqlens.tolist()

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def positions(self) -> torch.Tensor:
        """(T,) position of each token inside its own sequence (restarts at every BOS)."""
        device = self.cu_seqlens.device
        lengths = torch.tensor(self.lengths, device=device)
        starts = torch.repeat_interleave(self.cu_seqlens[:-1].long(), lengths)
        return torch.arange(self.bounds[-1], device=device) - starts

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return self._attend_varlen(q, k, v)
        return self._attend_per_sequence(q, k, v)

    def _attend_varlen(self, q, k, v) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        m = self.max_seqlen
        return varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, m, m)  # (T, heads, 64)

    def _attend_per_sequence(self, q, k, v) -> torch.Tensor:
        out = torch.empty_like(q)  # (T, heads, 64)
        for a, b in zip(self.bounds[:-1], self.bounds[1:]):
            # (L_i, heads, 64) -> (heads, L_i, 64): plain SDPA within one sequence
            qi, ki, vi = (t[a:b].transpose(0, 1) for t in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1)
        return out
