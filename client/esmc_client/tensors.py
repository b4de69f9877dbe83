"""``esmc.v1.Tensor`` messages <-> numpy arrays.

A Tensor carries raw little-endian C-order bytes with a dtype and a shape. Reading one
wraps its bytes with :func:`numpy.frombuffer`: no copy of the data, and the array is
read-only (call ``.copy()`` to modify it). bfloat16 has no numpy dtype; it is widened to
float32 by shifting the 16 stored bits into the upper half of a float32, which is exact but
needs one new array. With ``widen_bfloat16=False`` a bfloat16 tensor is viewed without a
copy as ``ml_dtypes.bfloat16``, which needs the optional ``ml_dtypes`` package.
"""

from __future__ import annotations

import math

import numpy as np

from esmc_proto.v1 import esmc_pb2 as pb

NUMPY_DTYPES: dict[int, str] = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_BFLOAT16: "<u2",  # the stored bits; see to_numpy
    pb.DTYPE_INT32: "<i4",
    pb.DTYPE_INT64: "<i8",
}

DTYPE_NAMES: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
}

_FROM_NUMPY: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "bfloat16": pb.DTYPE_BFLOAT16,  # ml_dtypes.bfloat16 arrays
}


def dtype_enum(name: str | int) -> int:
    """``"float32"``/``"float16"``/``"bfloat16"``/... (or an enum value) -> ``DType``."""
    if isinstance(name, int):
        if name not in NUMPY_DTYPES and name != pb.DTYPE_UNSPECIFIED:
            raise ValueError(f"unknown DType value {name}")
        return name
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPE_NAMES)}") from None


def to_numpy(tensor: pb.Tensor, *, widen_bfloat16: bool = True) -> np.ndarray:
    """The array a Tensor message holds (read-only, sharing the message's bytes).

    ``DTYPE_UNSPECIFIED`` reads as float32, as the contract says for outputs.
    """
    dtype = tensor.dtype or pb.DTYPE_FLOAT32
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"unknown DType value {dtype}")
    shape = tuple(int(n) for n in tensor.shape)
    data = tensor.data
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    if math.prod(shape) * itemsize != len(data):
        raise ValueError(
            f"Tensor of dtype {pb.DType.Name(dtype)} and shape {shape} needs "
            f"{math.prod(shape) * itemsize} bytes, got {len(data)}"
        )
    array = np.frombuffer(data, dtype=NUMPY_DTYPES[dtype]).reshape(shape)
    if dtype == pb.DTYPE_BFLOAT16:
        return bfloat16_bits_to_float32(array) if widen_bfloat16 else _view_bfloat16(array)
    return array


def from_numpy(array: np.ndarray, dtype: str | None = None) -> pb.Tensor:
    """A Tensor message holding ``array`` (cast to ``dtype`` first when given).

    ``dtype="bfloat16"`` rounds float32 to bfloat16 (to nearest, ties to even).
    """
    array = np.asarray(array)
    name = dtype or array.dtype.name
    if name not in _FROM_NUMPY:
        raise ValueError(f"cannot send dtype {name!r}; expected one of {sorted(_FROM_NUMPY)}")
    if name == "bfloat16":
        bits = array.view("<u2") if array.dtype.name == "bfloat16" else float32_to_bfloat16_bits(array)
        data = np.ascontiguousarray(bits, dtype="<u2").tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[_FROM_NUMPY[name]]).tobytes()
    return pb.Tensor(dtype=_FROM_NUMPY[name], shape=array.shape, data=data)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits -> float32 values (exact; a new array)."""
    return (bits.astype("<u4") << 16).view("<f4")


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bits, rounding to nearest even; NaN stays NaN."""
    u32 = np.ascontiguousarray(values, dtype="<f4").view("<u4")
    rounding = ((u32 >> 16) & 1) + np.uint32(0x7FFF)
    bits = ((u32 + rounding) >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        bits[nan] = ((u32[nan] >> 16) | 0x0040).astype("<u2")  # keep it a quiet NaN
    return bits


def _view_bfloat16(bits: np.ndarray) -> np.ndarray:
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(
            "viewing bfloat16 without widening needs the ml_dtypes package "
            "(pip install ml_dtypes); or use widen_bfloat16=True for float32"
        ) from None
    return bits.view(ml_dtypes.bfloat16)
