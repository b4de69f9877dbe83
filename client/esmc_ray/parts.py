"""The output directory: parquet parts, one per block, each written once under a temporary
name and renamed (``part-<hash of its ids>.parquet``, so a retried block rewrites the same
file and a crash leaves no partial part); the ids already written, for resuming; the
``esmc.*`` schema metadata a resumed job must match."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

RESUME_KEYS = ("kind", "model", "layer", "pooling", "method", "normalization")
"""Metadata a resumed job must share with the parts already written."""


class PartStore:
    """The parquet parts of one output directory (a local path or a pyarrow URI: s3://...)."""

    def __init__(self, output: str, metadata: dict[str, str] | None = None):
        import pyarrow.fs

        if "://" in output:
            self._fs, self._base = pyarrow.fs.FileSystem.from_uri(output)
        else:
            self._fs, self._base = pyarrow.fs.LocalFileSystem(), os.path.abspath(output)
        self._fs.create_dir(self._base, recursive=True)
        self._metadata = metadata

    def _dataset(self):
        import pyarrow.dataset

        return pyarrow.dataset.dataset(self._base, filesystem=self._fs, format="parquet")

    def ids(self):
        """Every id written so far (a pyarrow array)."""
        import pyarrow as pa

        dataset = self._dataset()
        if not dataset.files:
            return pa.array([], pa.string())
        return dataset.to_table(columns=["id"])["id"].combine_chunks()

    def duplicates(self) -> int:
        ids = self.ids()
        return len(ids) - len(ids.unique())

    def metadata(self) -> dict[str, str] | None:
        """The ``esmc.*`` metadata of the first part, or None when there is none yet."""
        files = self._dataset().files
        if not files:
            return None
        raw = _read_schema(self._fs, files[0]).metadata or {}
        return {k.decode()[5:]: v.decode() for k, v in raw.items() if k.startswith(b"esmc.")}

    def check_compatible(self, metadata: dict[str, str]) -> None:
        existing = self.metadata()
        if existing is None:
            return
        for key in RESUME_KEYS:
            if existing.get(key) != metadata.get(key):
                raise ValueError(
                    f"{self._base} holds {key}={existing.get(key)!r}, this job has "
                    f"{key}={metadata.get(key)!r}; use another output directory"
                )

    def write(self, records: list[tuple], results: list, build: Callable) -> Any:
        """Write the records that have a result as one part, the table ``build(kept,
        metadata)`` makes of ``(record, result)`` pairs; the block's counts as a table."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        kept = [(record, r) for record, r in zip(records, results) if r is not None]
        stats = {
            "written": [len(kept)],
            "errors": [sum(1 for _, r in kept if r.error is not None)],
            "unfinished": [len(records) - len(kept)],
        }
        if kept:
            table = build(kept, self._metadata)
            table = table.replace_schema_metadata({f"esmc.{k}": str(v) for k, v in self._metadata.items()})
            ids = "\n".join(str(record[0]) for record, _ in kept)
            final = f"{self._base}/part-{hashlib.sha256(ids.encode()).hexdigest()[:32]}.parquet"
            temporary = f"{self._base}/.tmp-{uuid.uuid4().hex}.parquet"
            with self._fs.open_output_stream(temporary) as sink:
                pq.write_table(table, sink)
            self._fs.move(temporary, final)
        return pa.table(stats)


def error_column(results: Iterable[Any]):
    """The ``error`` column: ``CODE: message`` of each result's error, or null."""
    import pyarrow as pa

    return pa.array([None if r.error is None else str(r.error) for r in results], pa.string())


def _read_schema(fs, path: str):
    import pyarrow.parquet as pq

    with fs.open_input_file(path) as handle:
        return pq.read_schema(handle)
