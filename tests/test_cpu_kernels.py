"""The C++ CPU kernels and the torch implementation compute the same bits."""
from __future__ import annotations

import pytest
import torch

from hifloat4 import cpu_kernels
from hifloat4.format import quantize_groups_torch, to_groups
from hifloat4.packing import pack_groups_torch, unpack_groups_torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels.load()
    if k is None:
        pytest.skip("C++ CPU kernels could not be built here (no compiler or ninja)")
    return k


def sample(dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1024, generator=g) * torch.exp2(torch.randint(-40, 15, (64, 1), generator=g).float())
    return to_groups(x.to(dtype), -1)[0].contiguous()


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_agrees_bit_for_bit(kernels, dtype):
    groups = sample(dtype)
    groups[3, 17] = float("nan")
    groups[5, 0] = -float("inf")
    a, b = torch.empty_like(groups), torch.empty_like(groups)
    kernels.quantize_dequantize_groups(groups, a)
    quantize_groups_torch(groups, b)
    assert torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_agrees_byte_for_byte(kernels, dtype):
    groups = sample(dtype)
    a = torch.empty(groups.shape[0], 36, dtype=torch.uint8)
    b = torch.empty_like(a)
    assert kernels.pack_groups(groups, a) and pack_groups_torch(groups, b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_agrees_bit_for_bit(kernels, dtype):
    data = torch.empty(sample(dtype).shape[0], 36, dtype=torch.uint8)
    kernels.pack_groups(sample(dtype), data)
    a = torch.empty(data.shape[0], 64, dtype=dtype)
    b = torch.empty_like(a)
    kernels.unpack_groups(data, a)
    unpack_groups_torch(data, b)
    assert torch.equal(raw(a), raw(b))


def test_kernel_refuses_non_contiguous_groups(kernels):
    groups = sample(torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.quantize_dequantize_groups(groups.t(), torch.empty_like(groups).t())
