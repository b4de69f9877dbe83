"""The steps of one pass over a batch, as the engine's device thread runs them.

The batch itself is the library's :class:`esmc.batch.TokenBatch` and the per-protein split
is the library's (:func:`esmc.inference.select_outputs`, :func:`esmc.inference.outputs_to_host`),
the same code ``run_logits`` uses. The steps are separate so that the engine can collate the
next batch while the current forward runs, and so that an error lands on the requests it
concerns:

- :meth:`BatchExecutor.collate` packs (or pads) the tokens and starts their copy to the
  device (pinned memory and ``non_blocking`` on CUDA: the copy queues behind a running forward);
- :meth:`BatchExecutor.forward` runs one forward, keeping only the hidden layers asked for and
  skipping the sequence head when no request wants logits;
- :meth:`BatchExecutor.select` takes one request's outputs on the device, means and the cast
  to its wire dtype included; :meth:`BatchExecutor.to_host` copies what the requests selected
  to the host (one copy per dtype from a GPU);
- :meth:`BatchExecutor.prepare_steps` samples every generation step of the pass at once.

Tests subclass :class:`BatchExecutor` to inject faults at a stage (``Engine(executor=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esmc.batch import TokenBatch
from esmc.generation import GenerationState, prepare_steps
from esmc.inference import autocast_for, outputs_to_host, select_outputs
from esmc import ESMC, ESMCOutput
from esmc.sampling import SamplingRows
from esmc.types import LogitsConfig


class BatchExecutor:
    """The steps of a pass (see the module docstring); stateless."""

    def collate(
        self, tokens: Sequence[torch.Tensor], packed: bool, device: torch.device
    ) -> TokenBatch:
        return TokenBatch.pack(tokens, packed=packed, device=device)

    def forward(
        self, model: ESMC, batch: TokenBatch, keep: Sequence[int], return_logits: bool = True
    ) -> ESMCOutput:
        """One forward; on CUDA this returns once the kernels are queued."""
        with torch.no_grad(), autocast_for(model):
            return batch.forward(model, list(keep), return_logits=return_logits)

    def select(
        self,
        out: ESMCOutput,
        batch: TokenBatch,
        index: int,
        config: LogitsConfig,
        layers: Sequence[int],
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """Sequence ``index``'s outputs per ``config``, on the device, in ``dtype``."""
        return select_outputs(out, batch.rows()[index], config, layers, dtype)

    def to_host(self, parts: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        return outputs_to_host(parts)

    def prepare_steps(
        self, states: Sequence[GenerationState], logits: Sequence[torch.Tensor]
    ) -> list[SamplingRows]:
        """Every generation's next step up to its random draw, all rows at once."""
        return prepare_steps(states, logits)
