"""The job's inputs: FASTA, parquet and CSV files (or directories of them) read as one Ray
dataset of string columns, one read task per file streaming blocks, and the rows whose ids
the output already holds dropped (:func:`drop_done`)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from esmc_client.fasta import read_fasta

FASTA_SUFFIXES = (".fasta", ".fa", ".faa", ".fas")
INPUT_FORMATS = ("fasta", "parquet", "csv")
FASTA_BLOCK_RECORDS = 4096
READ_CPUS = 0.5  # reading is I/O: a whole CPU per read task starved the actors on 2-CPU nodes


def input_files(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(path, format)`` of every input file; a directory stands for the files in it
    (names starting with ``.`` or ``_`` skipped). Formats by suffix: FASTA
    (``.fasta``, ``.fa``, ``.faa``, ``.fas``), ``.parquet`` or ``.csv``."""
    files = []
    for path in map(str, inputs):
        if os.path.isdir(path):
            names = sorted(n for n in os.listdir(path) if not n.startswith((".", "_")))
            files += input_files([os.path.join(path, n) for n in names])
            continue
        name = path.lower()
        kind = "fasta" if name.endswith(FASTA_SUFFIXES) else name.rsplit(".", 1)[-1]
        if kind not in INPUT_FORMATS:
            raise ValueError(
                f"{path}: unknown input type; use {', '.join(FASTA_SUFFIXES)}, .parquet or .csv"
            )
        files.append((path, kind))
    if not files:
        raise ValueError(f"no input files in {', '.join(map(str, inputs))}")
    return files


def read_inputs(inputs: Sequence[str], columns: dict[str, str], rows: int = FASTA_BLOCK_RECORDS):
    """One Ray dataset of string columns named as the keys of ``columns`` (values: the
    parquet/CSV column names; FASTA gives ``id`` and ``sequence``) from every input file,
    one read task per file streaming blocks of at most ``rows`` rows (files must be readable
    from every node: a shared filesystem)."""
    import ray.data

    files = [{"path": path, "format": kind} for path, kind in input_files(inputs)]
    if set(columns) != {"id", "sequence"} and any(f["format"] == "fasta" for f in files):
        raise ValueError(f"FASTA has no {', '.join(sorted(set(columns) - {'id', 'sequence'}))} column")
    return ray.data.from_items(files).map_batches(
        read_blocks, fn_kwargs={"columns": columns, "rows": rows}, batch_size=1,
        batch_format="pyarrow", num_cpus=READ_CPUS,
    )


def read_blocks(files, columns: dict[str, str], rows: int) -> Iterator[Any]:
    """The records of each file, as tables of at most ``rows`` rows."""
    for path, kind in zip(files["path"].to_pylist(), files["format"].to_pylist()):
        if kind == "fasta":
            yield from _fasta_blocks(path, rows)
        else:
            yield from _table_blocks(path, kind, columns, rows)


def _fasta_blocks(path: str, rows: int) -> Iterator[Any]:
    import pyarrow as pa

    ids: list[str] = []
    sequences: list[str] = []
    for uid, sequence in read_fasta(path):
        ids.append(uid)
        sequences.append(sequence)
        if len(ids) == rows:
            yield pa.table({"id": ids, "sequence": sequences})
            ids, sequences = [], []
    if ids:
        yield pa.table({"id": ids, "sequence": sequences})


def _table_blocks(path: str, kind: str, columns: dict[str, str], rows: int):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    wanted = list(columns.values())
    if kind == "parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=rows, columns=wanted)
    else:
        types = {name: pa.string() for name in wanted}
        options = pyarrow.csv.ConvertOptions(column_types=types, include_columns=wanted)
        batches = pyarrow.csv.open_csv(path, convert_options=options)
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            part = batch.slice(start, rows)
            yield pa.table({
                name: part.column(column).cast(pa.string()) for name, column in columns.items()
            })


def drop_done(batch, done):
    """``batch`` without the ids in ``done`` (an array, or its Ray object ref) and without
    repeats of an id within it."""
    import pyarrow.compute as pc
    import ray

    if isinstance(done, ray.ObjectRef):
        done = ray.get(done)

    batch = batch.filter(pc.invert(pc.is_in(batch["id"], done)))
    ids = batch["id"].to_pylist()
    if len(set(ids)) == len(ids):
        return batch
    first = {uid: i for i, uid in reversed(list(enumerate(ids)))}
    return batch.take(sorted(first.values()))
