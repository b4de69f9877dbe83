"""Minimal FASTA reading (no dependencies)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)``; the id is the header's first word, the sequence upper-cased
    with whitespace and a trailing stop ``*`` removed."""
    header: str | None = None
    chunks: list[str] = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    yield header, _clean("".join(chunks))
                header = line[1:].split()[0] if line[1:].split() else ""
                chunks = []
            elif line:
                chunks.append(line)
    if header is not None:
        yield header, _clean("".join(chunks))


def _clean(sequence: str) -> str:
    return sequence.upper().rstrip("*")
