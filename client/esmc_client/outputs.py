"""Embedding files written by ``esmc embed``, and reading them back.

Every format holds the same things:

- ``ids``: one per protein, in input order;
- ``embeddings``: with ``pooling="mean"`` a (proteins, d) matrix; with ``pooling="none"``
  the per-position rows of all proteins stacked, (sum of L+2, d) with BOS and EOS rows
  included, and ``offsets`` (proteins + 1): protein i is ``embeddings[offsets[i]:offsets[i+1]]``;
- ``truncated``: one boolean per protein (``--long truncate`` cut it);
- the run's metadata: ``model``, ``layer``, ``pooling``, ``dtype`` (the wire dtype asked for;
  bfloat16 is stored widened to float32), ``server_version``, ``d_model``, ``n_layers``,
  ``max_residues`` (the length limit of the run) and ``format`` (this layout's version).

Where they live: ``.npz`` one array per name (metadata as 0-d arrays: ``data["model"].item()``);
``.h5``/``.hdf5`` datasets ``ids``, ``embeddings``, ``offsets``, ``truncated`` and the
metadata as file attributes (h5py); ``.parquet`` one row per protein with columns ``id``,
``embedding`` (a list of d floats, or a list of L+2 such lists) and ``truncated``, the
metadata in the schema's key-value metadata (pyarrow).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
FORMATS = {".npz": None, ".h5": "h5py", ".hdf5": "h5py", ".parquet": "pyarrow"}
METADATA_KEYS = (
    "model", "layer", "pooling", "dtype", "server_version", "d_model", "n_layers", "max_residues",
    "format",
)
_INT_KEYS = ("layer", "d_model", "n_layers", "max_residues", "format")


@dataclass(frozen=True, eq=False)
class Embeddings:
    """What an embedding file holds (see the module docstring)."""

    ids: list[str]
    embeddings: np.ndarray
    offsets: np.ndarray | None  # pooling "none" only
    truncated: np.ndarray
    metadata: dict[str, object]

    def __getitem__(self, i: int) -> np.ndarray:
        """Protein ``i``'s embedding: (d) pooled, or (L+2, d)."""
        if self.offsets is None:
            return self.embeddings[i]
        return self.embeddings[self.offsets[i] : self.offsets[i + 1]]


def write_embeddings(
    path: str | Path,
    ids: Sequence[str],
    arrays: Sequence[np.ndarray],
    metadata: Mapping[str, object],
    truncated: Sequence[bool] | None = None,
) -> None:
    """Write one embedding per id in the format named by ``path``'s suffix."""
    path = Path(path)
    if len(ids) != len(arrays):
        raise ValueError(f"{len(ids)} ids for {len(arrays)} embeddings")
    meta = {**{k: metadata.get(k) for k in METADATA_KEYS}, "format": FORMAT_VERSION}
    flags = np.zeros(len(ids), dtype=bool) if truncated is None else np.asarray(truncated, bool)
    pooled = meta["pooling"] != "none"
    if pooled:
        matrix = np.stack(arrays) if arrays else np.zeros((0, meta["d_model"] or 0), np.float32)
        offsets = None
    else:
        lengths = [len(a) for a in arrays]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        matrix = np.concatenate(arrays) if arrays else np.zeros((0, 0), np.float32)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        extra = {} if offsets is None else {"offsets": offsets}
        np.savez(
            path,
            ids=np.array(list(ids), dtype=str),
            embeddings=matrix,
            truncated=flags,
            **extra,
            **{k: np.array(_plain(v)) for k, v in meta.items()},
        )
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as handle:
            handle.create_dataset("ids", data=list(ids), dtype=h5py.string_dtype())
            handle.create_dataset("embeddings", data=matrix)
            handle.create_dataset("truncated", data=flags)
            if offsets is not None:
                handle.create_dataset("offsets", data=offsets)
            for key, value in meta.items():
                handle.attrs[key] = _plain(value)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if pooled:
            column = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        else:
            rows = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
            column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), rows)
        table = pa.table({"id": list(ids), "embedding": column, "truncated": flags})
        schema_meta = {k: json.dumps(_plain(v)) for k, v in meta.items()}
        pq.write_table(table.replace_schema_metadata(schema_meta), path)
    else:
        raise ValueError(f"unknown embedding file type {suffix!r}; expected one of {list(FORMATS)}")


def read_embeddings(path: str | Path) -> Embeddings:
    """Read a file written by :func:`write_embeddings` (any of its formats)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path) as data:
            meta = {k: data[k].item() for k in METADATA_KEYS if k in data}
            offsets = data["offsets"] if "offsets" in data else None
            return Embeddings(
                data["ids"].tolist(), data["embeddings"], offsets, data["truncated"], _typed(meta)
            )
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path) as handle:
            meta = {k: handle.attrs[k] for k in METADATA_KEYS if k in handle.attrs}
            offsets = handle["offsets"][:] if "offsets" in handle else None
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in handle["ids"][:]]
            return Embeddings(
                ids, handle["embeddings"][:], offsets, handle["truncated"][:], _typed(meta)
            )
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = table.schema.metadata or {}
        meta = {k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in METADATA_KEYS}
        column = table.column("embedding").combine_chunks()
        if meta.get("pooling") == "none":
            offsets = column.offsets.to_numpy().astype(np.int64)
            rows = column.flatten()
            matrix = np.asarray(rows.flatten().to_numpy()).reshape(len(rows), -1)
        else:
            offsets = None
            matrix = np.asarray(column.flatten().to_numpy()).reshape(len(column), -1)
        truncated = np.asarray(table.column("truncated").to_numpy(), dtype=bool)
        return Embeddings(table.column("id").to_pylist(), matrix, offsets, truncated, _typed(meta))
    raise ValueError(f"unknown embedding file type {suffix!r}; expected one of {list(FORMATS)}")


def _plain(value: object) -> object:
    """A value every format stores (None is stored as "")."""
    return "" if value is None else value


def _typed(meta: dict[str, object]) -> dict[str, object]:
    out = {}
    for key, value in meta.items():
        if isinstance(value, bytes):
            value = value.decode()
        if key in _INT_KEYS:
            value = int(value) if value not in ("", None) else None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = str(value) if key not in _INT_KEYS and value is not None else value
    return out
