"""One batch type for every caller that runs many proteins in one forward.

:class:`TokenBatch` packs 1-D token sequences end to end (``cu_seqlens``; attention never
crosses sequences) or pads them to a rectangle, copies them to the device, runs the forward,
and splits the outputs back per sequence: :meth:`TokenBatch.rows` index one sequence's
positions, :meth:`TokenBatch.residue_mask` marks residues (not BOS, EOS or padding),
:meth:`TokenBatch.split` cuts a (T, ...) / (B, L, ...) output into per-sequence views. Used by :func:`esmc.inference.run_logits`,
the server's engine, ``ESMC.logits``, the forward benchmark and the training evaluation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from esmc.tokenizer import BOS_ID, EOS_ID, PAD_ID


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Token sequences on a device, packed or padded, in the order given."""

    tokens: torch.Tensor  # (T,) packed end to end, or (B, L) padded with PAD_ID
    cu_seqlens: torch.Tensor | None  # (N+1,) int32 offsets when packed, None when padded
    lengths: tuple[int, ...]  # tokens of each sequence, BOS/EOS included

    @classmethod
    def pack(
        cls,
        tokens: Sequence[torch.Tensor],
        *,
        packed: bool = True,
        device: torch.device | str | None = None,
    ) -> TokenBatch:
        """Pack (or pad) 1-D token tensors and start their copy to ``device`` (pinned memory
        and ``non_blocking`` on CUDA, so the copy queues behind a running forward)."""
        if not tokens:
            raise ValueError("a batch needs at least one sequence")
        lengths = tuple(int(t.shape[0]) for t in tokens)
        device = torch.device("cpu") if device is None else torch.device(device)
        if packed:
            host = torch.cat([t.to("cpu") for t in tokens])  # (T,)
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.tensor(lengths).cumsum(0)
            return cls(_to_device(host, device), _to_device(cu, device), lengths)
        host = torch.nn.utils.rnn.pad_sequence(
            [t.to("cpu") for t in tokens], batch_first=True, padding_value=PAD_ID
        )
        return cls(_to_device(host, device), None, lengths)  # (B, L)

    @classmethod
    def from_padded(cls, tokens: torch.Tensor) -> TokenBatch:
        """A (B, L) batch that is already padded (lengths count the non-pad tokens)."""
        lengths = tuple(int(n) for n in (tokens != PAD_ID).sum(-1).tolist())
        return cls(tokens, None, lengths)

    # -- shape -------------------------------------------------------------------------------

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths)

    @property
    def cost(self) -> int:
        """Tokens the forward pays: each token packed, the whole rectangle padded."""
        return sum(self.lengths) if self.packed else self.size * int(self.tokens.shape[1])

    def rows(self) -> list[tuple]:
        """Index of each sequence's positions in a (T, ...) or (B, L, ...) output."""
        if not self.packed:
            return [(b, slice(0, n)) for b, n in enumerate(self.lengths)]
        rows, start = [], 0
        for n in self.lengths:
            rows.append((slice(start, start + n),))
            start += n
        return rows

    def offsets(self) -> list[int]:
        """Where each sequence starts in the packed (T,) order (padded: row * L)."""
        width = None if self.packed else int(self.tokens.shape[1])
        starts, start = [], 0
        for b, n in enumerate(self.lengths):
            starts.append(start if width is None else b * width)
            start += n
        return starts

    def residue_mask(self) -> torch.Tensor:
        """(T,) or (B, L) bool on the device: True at residues, not BOS, EOS or padding."""
        return residue_mask(self.tokens)

    # -- the forward and its outputs ---------------------------------------------------------

    def forward(self, model, hidden_layers: Sequence[int] | None = (), **kwargs):
        """``model``'s packed or padded forward over this batch (an ``ESMCOutput``)."""
        if self.packed:
            return model.forward_packed(
                self.tokens, self.cu_seqlens, self.max_length, hidden_layers=hidden_layers,
                **kwargs,
            )
        return model(self.tokens, hidden_layers=hidden_layers, **kwargs)

    def split(self, output: torch.Tensor, leading: int = 0) -> list[torch.Tensor]:
        """Per-sequence views of ``output`` (``leading`` dims before the token dim(s), e.g. 1
        for hidden states (layers, T, d)): each (..., L_i+2, ...)."""
        lead = (slice(None),) * leading
        return [output[(*lead, *row)] for row in self.rows()]


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def residue_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True at residue positions of any token tensor: not BOS, EOS or padding."""
    return (tokens != BOS_ID) & (tokens != EOS_ID) & (tokens != PAD_ID)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (..., B, L, d) over the positions where mask (B, L) is True: (..., B, d), fp32."""
    weights = mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (x.float() * weights).sum(-2) / weights.sum(-2).clamp(min=1)
