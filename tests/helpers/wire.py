"""Wire messages for tests that talk through the generated stubs: requests, and the wire
tensors decoded with numpy (no high-level client)."""

from __future__ import annotations

import numpy as np

from esmc_proto.v1 import esmc_pb2 as pb

_WIRE = {
    pb.DTYPE_FLOAT32: "<f4",
    pb.DTYPE_FLOAT16: "<f2",
    pb.DTYPE_INT32: "<i4",
    pb.DTYPE_INT64: "<i8",
}


def to_numpy(tensor: pb.Tensor) -> np.ndarray:
    """A wire Tensor as numpy; bfloat16 is widened to float32 (its bits in the upper half)."""
    if tensor.dtype == pb.DTYPE_BFLOAT16:
        bits = np.frombuffer(tensor.data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(tuple(tensor.shape))
    return np.frombuffer(tensor.data, dtype=_WIRE[tensor.dtype]).reshape(tuple(tensor.shape))


def protein_request(protein_sequence: str, /, **config) -> pb.LogitsRequest:
    """A LogitsRequest for one protein; ``config`` sets LogitsConfig fields."""
    return pb.LogitsRequest(
        protein=pb.ESMProtein(sequence=protein_sequence), config=pb.LogitsConfig(**config)
    )
