"""How tokens see each other: a padded batch or sequences packed end to end.

A layout turns q, k, v of shape (..., L, heads, 64) into the attention context of the
same shape, never letting a token attend across sequences.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Protocol

import torch
import torch.nn.functional as F


class SequenceLayout(Protocol):
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


@dataclasses.dataclass
class PaddedLayout:
    """(B, L) batch; ``sequence_id`` (B, L) bool (True = residue) or int ids, as the reference.

    The (B, 1, L, L) mask is built once per forward, not per layer; on the CPU a batch without
    padding (one sequence, or equal lengths) attends with no mask at all, and a padded one gets
    the additive float mask SDPA would otherwise rebuild from the boolean one in every layer.
    """

    sequence_id: torch.Tensor

    def __post_init__(self) -> None:
        same = self.sequence_id.unsqueeze(-1) == self.sequence_id.unsqueeze(-2)  # (B, L, L)
        self.mask = same.unsqueeze(1)  # (B, 1, L, L)
        self._masks: dict[torch.dtype, torch.Tensor | None] = {}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (B, L, heads, 64) -> (B, heads, L, 64) for SDPA and back
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, self._mask_for(q)).transpose(1, 2)

    def _mask_for(self, q: torch.Tensor) -> torch.Tensor | None:
        if q.is_cuda:
            return self.mask  # no host sync to inspect it
        if q.dtype not in self._masks:
            if bool(self.mask.all()):
                self._masks[q.dtype] = None
            else:
                additive = torch.zeros(self.mask.shape, dtype=q.dtype, device=q.device)
                self._masks[q.dtype] = additive.masked_fill_(~self.mask, float("-inf"))
        return self._masks[q.dtype]


@dataclasses.dataclass
class PackedLayout:
    """Sequences end to end: ``cu_seqlens`` (N+1,) int32 offsets, tokens (T, ...).

    Nothing is read back to the host until the CPU attention needs the boundaries (once per
    forward); on CUDA the varlen kernel takes ``cu_seqlens`` as it is.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @functools.cached_property
    def bounds(self) -> list[int]:
        return self.cu_seqlens.tolist()

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    def positions(self, total: int | None = None) -> torch.Tensor:
        """(T,) position of each token inside its own sequence (restarts at every BOS).

        ``total``: T, the number of tokens (read from ``cu_seqlens`` when not given).
        """
        cu = self.cu_seqlens
        total = self.bounds[-1] if total is None else total
        index = torch.arange(total, device=cu.device, dtype=cu.dtype)
        sequence = torch.searchsorted(cu, index, right=True) - 1  # which sequence each token is in
        return (index - cu[sequence]).long()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return self._attend_varlen(q, k, v)
        return self._attend_per_sequence(q, k, v)

    def _attend_varlen(self, q, k, v) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        m = self.max_seqlen
        return varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, m, m)  # (T, heads, 64)

    def _attend_per_sequence(self, q, k, v) -> torch.Tensor:
        # SDPA gets (1, heads, L_i, 64): 4-D inputs select the fused CPU flash kernel, 3-D ones
        # fall back to the unfused math path (3x slower here, most of the non-matmul time)
        bounds = self.bounds
        if len(bounds) == 2:  # one sequence: no copy into an output buffer
            qi, ki, vi = (t.transpose(0, 1)[None] for t in (q, k, v))
            return F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
        out = q.new_empty(q.shape)  # (T, heads, 64)
        for a, b in zip(bounds[:-1], bounds[1:]):
            qi, ki, vi = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            out[a:b] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
        return out
