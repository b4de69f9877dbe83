"""The client's FASTA reader (standard library only: no torch, no grpc).

The client and the CLI read files by these rules; the model library, which may not import
the client, has its own reader by the same rules (``esmc.fasta``; a test checks that both
give the same records):

- a record starts at a ``>`` header; its id is the header's first word
  (``>sp|P69905|HBA_HUMAN Hemoglobin`` -> ``sp|P69905|HBA_HUMAN``);
- sequence lines are joined with all whitespace removed, and one trailing stop ``*`` dropped;
- blank lines and ``;`` comment lines are skipped;
- sequence text before the first header is an error naming the file and line (a file with
  no header at all is not FASTA);
- letters keep their case unless ``uppercase=True`` (which keeps ``<mask>`` as written): ESMC
  reads upper-case one-letter codes, and the server refuses lowercase with a hint, so turning
  lowercase into residues is the caller's explicit choice (``esmc embed --uppercase``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

MASK = "<mask>"


class FastaError(ValueError):
    """A file that is not FASTA; the message names the file and line."""


def read_fasta(path: str | Path, *, uppercase: bool = False) -> Iterator[tuple[str, str]]:
    """Yield ``(id, sequence)`` records of ``path`` (see the module docstring)."""
    header: str | None = None
    chunks: list[str] = []
    with open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith(";"):
                continue
            if line.startswith(">"):
                if header is not None:
                    yield header, _clean(chunks, uppercase)
                words = line[1:].split()
                header = words[0] if words else ""
                chunks = []
            elif header is None:
                raise FastaError(
                    f"{path}:{number}: sequence data before the first '>' header (not FASTA?)"
                )
            else:
                chunks.append("".join(line.split()))
    if header is not None:
        yield header, _clean(chunks, uppercase)


def _clean(chunks: list[str], uppercase: bool) -> str:
    sequence = "".join(chunks).removesuffix("*")
    if uppercase:
        sequence = sequence.upper().replace(MASK.upper(), MASK)
    return sequence


def first_lowercase(sequence: str) -> tuple[int, str] | None:
    """``(residue index, letter)`` of the first lowercase letter outside ``<mask>``, or None."""
    residue = 0
    pos = 0
    while pos < len(sequence):
        if sequence.startswith(MASK, pos):
            pos += len(MASK)
        else:
            if sequence[pos].islower():
                return residue, sequence[pos]
            pos += 1
        residue += 1
    return None


def residue_count(sequence: str) -> int:
    """Residues of ``sequence`` (``<mask>`` counts as one)."""
    return len(sequence) - (len(MASK) - 1) * sequence.count(MASK)


def truncate(sequence: str, residues: int) -> str:
    """The first ``residues`` residues of ``sequence`` (``<mask>`` counts as one)."""
    if MASK not in sequence:
        return sequence[:residues]
    out, pos = [], 0
    while pos < len(sequence) and len(out) < residues:
        step = len(MASK) if sequence.startswith(MASK, pos) else 1
        out.append(sequence[pos : pos + step])
        pos += step
    return "".join(out)


def duplicate_ids(records: Iterable[tuple[str, str]]) -> list[str]:
    """Ids that occur more than once, in order of their second occurrence."""
    seen: set[str] = set()
    duplicates: dict[str, None] = {}
    for uid, _ in records:
        if uid in seen:
            duplicates[uid] = None
        seen.add(uid)
    return list(duplicates)
