"""FASTA reading for the client (no dependencies, no torch)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)`` records.

    The id is the header's first word (``>sp|P69905|HBA_HUMAN Hemoglobin`` ->
    ``sp|P69905|HBA_HUMAN``); sequence lines are joined, upper-cased (``<mask>`` kept), and a
    trailing stop ``*`` is dropped. Text before the first header is an error naming its line.
    """
    header: str | None = None
    chunks: list[str] = []
    with open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith(";"):
                continue
            if line.startswith(">"):
                if header is not None:
                    yield header, _clean(chunks)
                words = line[1:].split()
                header = words[0] if words else ""
                chunks = []
            elif header is None:
                raise ValueError(f"{path}:{number}: sequence data before the first '>' header")
            else:
                chunks.append("".join(line.split()))
    if header is not None:
        yield header, _clean(chunks)


def _clean(chunks: list[str]) -> str:
    return "".join(chunks).upper().replace("<MASK>", "<mask>").removesuffix("*")
