"""FASTA reading for the library, the training code and the benchmarks (standard library only).

The rules are those of the client's reader (:mod:`esmc_client.fasta`, which the command line
uses; the library may not import the client, and the test suite checks that both give the
same records):

- a record starts at a ``>`` header; its id is the header's first word
  (``>sp|P69905|HBA_HUMAN Hemoglobin`` -> ``sp|P69905|HBA_HUMAN``);
- sequence lines are joined with all whitespace removed, and one trailing stop ``*`` dropped;
- blank lines and ``;`` comment lines are skipped;
- sequence text before the first header is an error naming the file and line;
- letters keep their case.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


class FastaError(ValueError):
    """A file that is not FASTA; the message names the file and line."""


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
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
                    yield header, "".join(chunks).removesuffix("*")
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
        yield header, "".join(chunks).removesuffix("*")
