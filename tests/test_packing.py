"""Packed HiF4 storage: 36 bytes per 64 values, bit-exact with fake quantization."""
from __future__ import annotations

import pytest
import torch

from hifloat4 import pack, quantize_dequantize, unpack, unpack_rows
from hifloat4.spec import BYTES_PER_GROUP

# every behaviour holds for both implementations: the C++ CPU kernel and pure torch
pytestmark = pytest.mark.usefixtures("implementation")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Byte equality, so that -0.0 and 0.0 count as different."""
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def wide_range(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 14, shape[:-1] + (1,), generator=g).float())
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpack_equals_quantize_dequantize_bit_for_bit(dtype):
    x = wide_range((33, 320), dtype)
    assert same_bits(unpack(pack(x)), quantize_dequantize(x))


def test_negative_values_that_flush_to_zero_keep_their_sign_bit():
    x = torch.tensor([-1e-30, 1e-30, 7.0] + [0.0] * 61)
    assert same_bits(unpack(pack(x)), quantize_dequantize(x))


def test_saturated_and_flushed_groups_round_trip():
    x = torch.tensor([[1e30] + [-5e5] * 63, [2.0**-60] * 64, [0.0] * 64])
    assert same_bits(unpack(pack(x)), quantize_dequantize(x))


@pytest.mark.parametrize("shape,dim", [((5, 100), -1), ((130, 3, 2), 0), ((4, 70, 6), 1), ((64,), 0)])
def test_any_axis_and_ragged_k_round_trip(shape, dim):
    x = wide_range(shape, torch.float32)
    p = pack(x, dim=dim)
    assert p.shape == shape
    assert same_bits(unpack(p), quantize_dequantize(x, dim=dim))


def test_storage_is_36_bytes_per_64_values():
    x = torch.randn(10, 640)
    assert pack(x).nbytes == 10 * 10 * BYTES_PER_GROUP


def test_storage_is_4_5_bits_per_value_which_is_28_125_percent_of_bf16():
    x = torch.randn(128, 1024, dtype=torch.bfloat16)
    assert pack(x).nbytes * 8 / x.numel() == 4.5
    assert pack(x).nbytes / (x.numel() * 2) == 0.28125


def test_row_slices_unpack_to_the_same_rows():
    w = wide_range((40, 200), torch.bfloat16)
    p = pack(w)
    assert same_bits(unpack_rows(p, 7, 23), quantize_dequantize(w)[7:23])


def test_nan_or_inf_cannot_be_packed():
    x = torch.zeros(64)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        pack(x)

