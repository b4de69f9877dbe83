"""One forward over a batch of token sequences, and its outputs split per sequence.

Runs on the engine's device thread only. The steps are separate so that the engine can
collate the next batch while the current forward runs:

- :func:`collate` builds the model inputs on the host and copies them to the device
  (pinned memory and ``non_blocking`` on CUDA, so the copy queues behind a running forward);
- :func:`forward` runs one packed (or padded) forward, keeping only the hidden layers asked for;
- :func:`to_host` brings the parts any request needs to the CPU in float32, one copy per
  tensor for the whole batch; :func:`slice_output` cuts one sequence's :class:`LogitsOutput`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from esmc.generation import GenerationState, prepare_steps
from esmc.inference import autocast_for
from esmc.sampling import SamplingRows
from esmc.model import ESMC, ESMCOutput
from esmc.tokenizer import PAD_ID
from esmc.types import ForwardTrackData, LogitsConfig, LogitsOutput


@dataclasses.dataclass(frozen=True)
class Collated:
    """Model inputs on the device, sequences in batch order."""

    tokens: torch.Tensor  # (T,) packed end to end, or (B, L) padded with PAD_ID
    cu_seqlens: torch.Tensor | None  # (N+1,) int32 offsets when packed, None when padded
    lengths: tuple[int, ...]  # tokens of each sequence, BOS/EOS included

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def rows(self) -> list[tuple]:
        """Index of each sequence's tokens in the forward's outputs."""
        if not self.packed:
            return [(b, slice(0, n)) for b, n in enumerate(self.lengths)]
        rows, start = [], 0
        for n in self.lengths:
            rows.append((slice(start, start + n),))
            start += n
        return rows


def collate(tokens: Sequence[torch.Tensor], packed: bool, device: torch.device) -> Collated:
    """Pack (or pad) 1-D token tensors and start their copy to ``device``."""
    lengths = tuple(int(t.shape[0]) for t in tokens)
    if packed:
        host = torch.cat(list(tokens))  # (T,)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(lengths).cumsum(0)
        return Collated(_to_device(host, device), _to_device(cu, device), lengths)
    host = torch.nn.utils.rnn.pad_sequence(list(tokens), batch_first=True, padding_value=PAD_ID)
    return Collated(_to_device(host, device), None, lengths)  # (B, L)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def forward(model: ESMC, batch: Collated, keep: Sequence[int]) -> ESMCOutput:
    """One forward; hidden states only for the blocks in ``keep`` (sorted, reference numbering).

    On CUDA this returns once the kernels are queued; reading the outputs waits for them.
    """
    with torch.no_grad(), autocast_for(model):
        if batch.packed:
            max_len = max(batch.lengths)
            return model.forward_packed(batch.tokens, batch.cu_seqlens, max_len, hidden_layers=keep)
        return model(batch.tokens, hidden_layers=list(keep))


@dataclasses.dataclass(frozen=True)
class HostOutput:
    """The batch's outputs on the CPU in float32 (None: no request needed that part)."""

    logits: torch.Tensor | None  # (T, 64) or (B, L, 64)
    embeddings: torch.Tensor | None  # (T, d) or (B, L, d)
    hidden: torch.Tensor | None  # (kept, T, d) or (kept, B, L, d)


def to_host(out: ESMCOutput, configs: Sequence[LogitsConfig]) -> HostOutput:
    """Copy to the CPU what at least one of ``configs`` asks for."""

    def host(tensor: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
        if tensor is None or not wanted:
            return None
        return tensor.float().cpu()

    wants_embeddings = any(c.return_embeddings or c.return_mean_embedding for c in configs)
    return HostOutput(
        logits=host(out.sequence_logits, any(c.sequence for c in configs)),
        embeddings=host(out.embeddings, wants_embeddings),
        hidden=host(out.hidden_states, any(c.needs_hidden_states for c in configs)),
    )


def slice_output(
    host: HostOutput, row: tuple, config: LogitsConfig, layers: Sequence[int]
) -> LogitsOutput:
    """One sequence's outputs; ``layers`` index the kept hidden states. Means skip BOS/EOS."""
    logits = host.logits[row].clone() if config.sequence else None  # (L+2, 64)
    embeddings = None
    if config.return_embeddings or config.return_mean_embedding:
        embeddings = host.embeddings[row].clone()  # (L+2, d)
    hidden = host.hidden[(list(layers), *row)] if layers else None  # (layers, L+2, d)
    return LogitsOutput(
        logits=ForwardTrackData(sequence=logits),
        embeddings=embeddings if config.return_embeddings else None,
        hidden_states=hidden if config.return_hidden_states else None,
        mean_embedding=embeddings[1:-1].mean(0) if config.return_mean_embedding else None,
        mean_hidden_states=hidden[:, 1:-1].mean(1) if config.return_mean_hidden_states else None,
    )


class BatchExecutor:
    """The steps of a pass as one object the engine is given (``Engine(executor=...)``).

    The default runs the functions above; tests subclass it to inject faults at a stage.
    """

    def collate(self, tokens: Sequence[torch.Tensor], packed: bool, device: torch.device):
        return collate(tokens, packed, device)

    def forward(self, model: ESMC, batch: Collated, keep: Sequence[int]) -> ESMCOutput:
        return forward(model, batch, keep)

    def to_host(self, out: ESMCOutput, configs: Sequence[LogitsConfig]) -> HostOutput:
        return to_host(out, configs)

    def slice_output(
        self, host: HostOutput, row: tuple, config: LogitsConfig, layers: Sequence[int]
    ) -> LogitsOutput:
        return slice_output(host, row, config, layers)

    def prepare_steps(
        self, states: Sequence[GenerationState], logits: Sequence[torch.Tensor]
    ) -> list[SamplingRows]:
        """Every generation's next step up to its random draw, all rows at once."""
        return prepare_steps(states, logits)
