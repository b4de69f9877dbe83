"""Resuming a ``Generate`` stream on another replica after its server went away.

A seeded generation is reproducible whatever it is batched with, so when a stream fails with
a retryable status after some steps were delivered, the client sends the same request again
(to whichever replica the channel picks) and skips the steps the caller already has. Replayed
steps are checked against the delivered ones: a replica that would produce a different
generation (another model or version) fails the call with ``DATA_LOSS`` instead of handing the
caller a stream whose steps do not belong together. Without a caller's seed the client picks
one, so that every generation can be replayed. When to send it again (retryable status,
backoff, retry budget, deadline) is decided as for any call (:mod:`esmc_client.retry`).
"""

from __future__ import annotations

import logging
import random

from esmc_client.types import ESMCError, GenerateStep

log = logging.getLogger(__name__)
_SEEDS = random.SystemRandom()


def replay_seed(seed: int | None) -> int:
    """The caller's seed, or a fresh random one (the server takes an unsigned 64-bit seed)."""
    return _SEEDS.randrange(2**63) if seed is None else int(seed)


class GenerationReplay:
    """The steps one generation delivered so far, across attempts on possibly different
    replicas (steps are numbered from 1; the final message has no step)."""

    def __init__(self):
        self.sequences: list[str] = []  # the sequence after each delivered step
        self.finished = False

    def accept(self, step: GenerateStep) -> bool:
        """Whether to hand ``step`` to the caller (False: already delivered)."""
        if step.final:
            if self.finished:
                return False
            self.finished = True
            return True
        index, delivered = step.step - 1, len(self.sequences)
        if index < delivered:
            if step.sequence != self.sequences[index]:
                raise ESMCError(
                    "DATA_LOSS",
                    f"the generation resumed on another server differs at step {step.step}: "
                    "the replicas do not serve the same model",
                )
            return False
        if index > delivered:
            raise ESMCError(
                "DATA_LOSS", f"the Generate stream skipped from step {delivered} to {step.step}"
            )
        self.sequences.append(step.sequence)
        return True

    def resuming(self, error: ESMCError, attempt: int) -> None:
        """Log that the request is sent again after ``error`` (no-op before any step)."""
        if self.sequences:
            log.info(
                "Generate stream failed after %d step(s) (%s): sending it again, attempt %d",
                len(self.sequences), error.code, attempt,
            )
