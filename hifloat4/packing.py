"""Real 4.5-bit HiF4 storage: 36 bytes per 64 values, bit-exact with fake quantization.

The byte layouts (groups in files, planar rows in memory) are in layout.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backend
from .format import from_groups, to_groups
from .spec import BYTES_PER_GROUP, GROUP_SIZE


@dataclass(frozen=True)
class PackedHiF4:
    """HiF4 codes of a tensor: `data` uint8 (*moved_shape[:-1], groups, 36).

    `shape` is the original shape, `dim` the quantized axis, `dtype` what
    `unpack` returns.
    """

    data: Tensor
    shape: tuple[int, ...]
    dim: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of packed storage (codes and scales; shape metadata excluded)."""
        return self.data.numel()


@torch.no_grad()
def pack(x: Tensor, dim: int = -1) -> PackedHiF4:
    """Encode `x` along `dim` as HiF4 codes (`unpack` gives `quantize_dequantize(x, dim)`).

    NaN and Inf have no HiF4 code: packing a tensor holding them is refused.
    """
    if not x.is_floating_point() or x.ndim == 0:
        raise TypeError(f"pack needs a floating-point tensor with at least one axis, got {x.dtype} {tuple(x.shape)}")
    groups, moved_shape, dim = to_groups(x, dim)
    data = torch.empty(groups.shape[0], BYTES_PER_GROUP, dtype=torch.uint8, device=x.device)
    if not backend.kernels(x.device).pack_groups(groups, data):
        raise ValueError("pack: the tensor holds NaN or Inf, which HiF4 codes cannot represent")
    n_groups = math.ceil(moved_shape[-1] / GROUP_SIZE)
    return PackedHiF4(data.view(*moved_shape[:-1], n_groups, BYTES_PER_GROUP), tuple(x.shape), dim, x.dtype)


def unpack_groups_into(data: Tensor, out: Tensor) -> None:
    """(n, 36) packed groups -> out (n, 64) in out.dtype: the one decode entry point
    (`unpack` and `unpack_rows` decode through here),
    to the device's backend; all backends give the same bits."""
    backend.kernels(data.device).unpack_groups(data, out)


def _unpack_groups(data: Tensor, dtype: torch.dtype) -> Tensor:
    """(n, 36) packed groups -> (n, 64) dequantized values in `dtype`."""
    out = torch.empty(data.shape[0], GROUP_SIZE, dtype=dtype, device=data.device)
    unpack_groups_into(data, out)
    return out


@torch.no_grad()
def unpack(packed: PackedHiF4) -> Tensor:
    """Dequantize a `PackedHiF4`: bit-identical to `quantize_dequantize` of the source."""
    moved = list(packed.shape)
    moved.append(moved.pop(packed.dim))
    groups = _unpack_groups(packed.data.reshape(-1, BYTES_PER_GROUP), packed.dtype)
    return from_groups(groups, tuple(moved), packed.dim)


def unpack_rows(packed: PackedHiF4, start: int, stop: int) -> Tensor:
    """Rows start:stop of a 2-D tensor packed along its last axis (a weight, chunk-wise)."""
    if len(packed.shape) != 2 or packed.dim != 1:
        raise ValueError("unpack_rows needs a 2-D tensor packed along dim=-1")
    rows = packed.data[start:stop]
    groups = _unpack_groups(rows.reshape(-1, BYTES_PER_GROUP), packed.dtype)
    return groups.view(rows.shape[0], -1)[:, : packed.shape[1]]
