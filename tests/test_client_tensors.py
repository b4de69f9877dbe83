"""Tensor messages <-> numpy: every dtype, no copy of the bytes, bfloat16 widening."""

import numpy as np
import pytest

from esmc_proto.v1 import esmc_pb2 as pb
from esmc_client.tensors import (
    bfloat16_bits_to_float32,
    dtype_enum,
    float32_to_bfloat16_bits,
    from_numpy,
    to_numpy,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("dtype", "enum"),
    [
        ("float32", pb.DTYPE_FLOAT32),
        ("float16", pb.DTYPE_FLOAT16),
        ("int32", pb.DTYPE_INT32),
        ("int64", pb.DTYPE_INT64),
    ],
)
def test_round_trip(dtype, enum):
    array = (np.arange(24).reshape(2, 3, 4) * 1.5 - 7).astype(dtype)
    message = from_numpy(array)
    assert message.dtype == enum
    assert list(message.shape) == [2, 3, 4]
    assert message.data == array.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = to_numpy(pb.Tensor.FromString(message.SerializeToString()))
    assert back.dtype == np.dtype(dtype)
    assert back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, array)


def test_reading_shares_the_message_bytes():
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=np.float32([1, 2, 3, 4]).tobytes())
    array = to_numpy(message)
    assert not array.flags.owndata
    assert not array.flags.writeable  # a view of immutable bytes
    assert isinstance(array.base.base, bytes)  # reshape view -> frombuffer view -> the bytes
    np.testing.assert_array_equal(array, [[1, 2], [3, 4]])


def test_little_endian_bytes_are_read_as_little_endian():
    message = pb.Tensor(dtype=pb.DTYPE_INT32, shape=[2], data=bytes([1, 0, 0, 0, 0, 1, 0, 0]))
    np.testing.assert_array_equal(to_numpy(message), [1, 256])


def test_unspecified_dtype_reads_as_float32():
    message = pb.Tensor(shape=[3], data=np.float32([0.5, -1, 2]).tobytes())
    np.testing.assert_array_equal(to_numpy(message), np.float32([0.5, -1, 2]))


def test_scalar_and_empty_shapes():
    scalar = to_numpy(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[], data=np.float32(3).tobytes()))
    assert scalar.shape == () and scalar == 3
    empty = to_numpy(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 8], data=b""))
    assert empty.shape == (0, 8)


def test_bfloat16_widens_exactly_to_float32():
    values = np.float32([1.0, -2.5, 0.0, 3.140625, np.inf, -np.inf, 1e-40])
    bits = np.array([0x3F80, 0xC020, 0x0000, 0x4049, 0x7F80, 0xFF80, 0x0001], dtype="<u2")
    message = pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[7], data=bits.tobytes())
    out = to_numpy(message)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[:6], values[:6])
    assert out[6] == np.uint32(0x00010000).view(np.float32)  # smallest subnormal kept


def test_bfloat16_rounds_to_nearest_even():
    # 1 + 2^-8 is half-way between 1 and 1 + 2^-7: ties go to even (1.0)
    halfway = np.float32(1 + 2**-8)
    above = np.nextafter(halfway, np.float32(2))
    odd_tie = np.float32(1 + 2**-7 + 2**-8)  # halfway between odd 1+2^-7 and even 1+2^-6
    bits = float32_to_bfloat16_bits(np.array([halfway, above, odd_tie], dtype=np.float32))
    np.testing.assert_array_equal(
        bfloat16_bits_to_float32(bits), np.float32([1.0, 1 + 2**-7, 1 + 2**-6])
    )


def test_bfloat16_keeps_nan_and_round_trips_through_a_message():
    values = np.float32([[np.nan, 1.5], [-0.375, 65280.0]])
    message = from_numpy(values, "bfloat16")
    assert message.dtype == pb.DTYPE_BFLOAT16 and len(message.data) == 8
    out = to_numpy(message)
    assert np.isnan(out[0, 0])
    np.testing.assert_array_equal(out[0, 1:], [1.5])
    np.testing.assert_array_equal(out[1], [-0.375, 65280.0])


def test_bfloat16_relative_error_is_within_rounding():
    rng = np.random.default_rng(0)
    values = rng.standard_normal(1000).astype(np.float32)
    out = to_numpy(from_numpy(values, "bfloat16"))
    assert np.max(np.abs(out - values) / np.abs(values)) <= 2**-8


def test_size_mismatch_is_an_error():
    message = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) needs 24 bytes, got 20"):
        to_numpy(message)


def test_dtype_names():
    assert dtype_enum("bfloat16") == pb.DTYPE_BFLOAT16
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        dtype_enum("float64")
    with pytest.raises(ValueError, match="cannot send dtype 'float64'"):
        from_numpy(np.zeros(2))
