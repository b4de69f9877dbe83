"""The data files tests read. A missing file fails the test that needs it (never a skip):
a checkout without its data is a broken checkout, not a reason to test less."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
"""The repository's root."""


def proteome_path() -> Path:
    """The shared proteome: ``$ESMC_PROTEOME`` if set, else ``../shared/data/proteome.fasta``
    beside the checkout (or beside the worktree folder holding it)."""
    if os.environ.get("ESMC_PROTEOME"):
        candidates = [Path(os.environ["ESMC_PROTEOME"])]
    else:
        candidates = [
            ROOT.parent / "shared" / "data" / "proteome.fasta",
            ROOT.parents[1] / "shared" / "data" / "proteome.fasta",
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.fail(f"the proteome is not at {' nor '.join(map(str, candidates))}")
