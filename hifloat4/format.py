"""HiF4 fake quantization, bit-exact with the format's reference (docs/hif4_spec.md):
`quantize_dequantize`, the public entry point, and the reshaping to 64-value groups
that every path shares.

The arithmetic lives in the backends (torch_kernels, cpu_kernels, triton_kernels);
`backend.kernels` picks one per device, and all compute the same bits.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backend
from .spec import GROUP_SIZE


def unit_stride_rows(x: Tensor) -> Tensor:
    """x as 2-D rows (-1, K) whose K axis has unit stride (a view when possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(1) == 1 or rows.shape[1] == 1 else rows.contiguous()


def to_groups(x: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...], int]:
    """x -> (groups (n, 64), shape with `dim` moved last, dim): zero-padded rows."""
    dim = dim % x.ndim
    moved = x.movedim(dim, -1)
    k = moved.shape[-1]
    rows = moved.reshape(math.prod(moved.shape[:-1]), k)
    pad = (-k) % GROUP_SIZE
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    return rows.reshape(-1, GROUP_SIZE), tuple(moved.shape), dim


def from_groups(groups: Tensor, moved_shape: tuple[int, ...], dim: int) -> Tensor:
    """Inverse of `to_groups`: drop the padding and move the axis back."""
    k = moved_shape[-1]
    rows = groups.reshape(math.prod(moved_shape[:-1]), math.ceil(k / GROUP_SIZE) * GROUP_SIZE)
    return rows[:, :k].reshape(moved_shape).movedim(-1, dim).contiguous()


@torch.no_grad()
def quantize_dequantize(x: Tensor, dim: int = -1) -> Tensor:
    """HiF4 quantize-dequantize `x` along `dim` in groups of 64 (zero-padded).

    Returns a tensor of the same shape, dtype and device. NaN/Inf stay in place
    and the rest of their group is quantized as if they were 0. float64 input is
    quantized as its float32 rounding. The implementation is `backend.kernels`'
    choice for the device (C++ on CPU, Triton on CUDA, torch elsewhere): same bits.
    """
    if not x.is_floating_point():
        raise TypeError(f"HiF4 quantizes floating-point tensors, got {x.dtype}")
    if x.ndim == 0:
        return quantize_dequantize(x.reshape(1)).reshape(())
    if x.numel() == 0:
        return x.clone()
    if x.dtype == torch.float64:  # every HiF4 value is a float32: quantize the float32 rounding
        return quantize_dequantize(x.float(), dim).double()
    kernels = backend.kernels(x.device)
    if kernels.quantize_rows is not None:  # fused over rows: no grouping copy
        moved = x.movedim(dim, -1)
        rows = unit_stride_rows(moved)
        out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
        kernels.quantize_rows(rows, None, False, None, out)
        return out.view(moved.shape).movedim(-1, dim).contiguous()
    groups, moved_shape, dim = to_groups(x, dim)
    out = torch.empty(groups.shape, dtype=x.dtype, device=x.device)
    kernels.quantize_groups(groups, out)
    return from_groups(out, moved_shape, dim)
