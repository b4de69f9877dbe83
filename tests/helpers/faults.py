"""Fault injection into the real engine: a model and pass steps that fail on a poison protein.

A batch fails only when it carries the poison protein (ten tryptophans in a row, which the
other proteins of these tests never contain), so bisection and per-request handling can be
seen to land on it. ``python -m helpers.faults SERVE-ARGS...`` runs the real ``esmc serve``
(``esmc_server.cli.main``) with a faulty tiny model in place of the loaded weights.
"""

from __future__ import annotations

import sys
import threading

import torch

from esmc import ESMC
from esmc.tokenizer import encode
from esmc_server.execute import BatchExecutor

POISON = "MKT" + "W" * 10 + "LLA"
_W = int(encode("W")[1])
RELEASE = threading.Event()
"""Set to let hanging forwards return (tests set it in their cleanup)."""


class Fatal(BaseException):
    """What a poisoned forward raises in ``base`` mode: not an Exception (a device-side abort,
    a poisoned CUDA context), so the engine cannot contain it."""


def poisoned(tokens: torch.Tensor) -> bool:
    """True when ``tokens`` (any shape) hold the poison protein."""
    return int((tokens == _W).sum()) >= 10


def fault(mode: str, where: str) -> None:
    """Fail as ``mode`` says: exception, base (BaseException) or hang (until RELEASE)."""
    if mode == "exception":
        raise RuntimeError(f"injected fault in {where} at /secret/path/model.py")
    if mode == "base":
        raise Fatal(f"injected fatal fault in {where}")
    if mode == "hang":
        RELEASE.wait()
        return
    raise ValueError(mode)


class FaultyModel(ESMC):
    """The real ESMC; a forward over the poison protein fails per ``fault_mode``."""

    fault_mode = "exception"

    @classmethod
    def like(cls, model: ESMC, mode: str) -> FaultyModel:
        faulty = cls(model.config)
        faulty.load_state_dict(model.state_dict())
        faulty.fault_mode = mode
        return faulty.eval()

    def forward_packed(self, tokens, cu_seqlens, max_seqlen, **kwargs):
        if poisoned(tokens):
            fault(self.fault_mode, "the forward")
        return super().forward_packed(tokens, cu_seqlens, max_seqlen, **kwargs)


class FaultyExecutor(BatchExecutor):
    """The real pass steps; ``stage`` (collate, slice or sample) fails for the poison protein."""

    def __init__(self, stage: str, mode: str = "exception"):
        self.stage = stage
        self.mode = mode

    def collate(self, tokens, packed, device):
        if self.stage == "collate" and any(poisoned(t) for t in tokens):
            fault(self.mode, "collation")
        return super().collate(tokens, packed, device)

    def prepare_steps(self, states, logits):
        if self.stage == "sample" and any(poisoned(s.tokens) for s in states):
            fault(self.mode, "sampling")
        return super().prepare_steps(states, logits)

    def select(self, out, batch, index, config, layers, dtype):
        if self.stage == "slice" and poisoned(batch.tokens[batch.rows()[index]]):
            fault(self.mode, "slicing")
        return super().select(out, batch, index, config, layers, dtype)


def main(argv: list[str]) -> int:
    """``esmc serve`` with a tiny random model that raises ``Fatal`` on the poison protein."""
    from helpers.models import random_model

    import esmc_server.app as app

    app.load_model = lambda config: FaultyModel.like(random_model(), "base")
    from esmc_server.cli import main as serve_main

    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
