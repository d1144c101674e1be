"""Real 4.5-bit HiF4 storage: 36 bytes per 64 values, bit-exact with fake quantization.

Layout of one group (the project's choice; HIF4_SPEC.md "Storage layout"):
  bytes 0..31  codes, two per byte (value 2i in the low nibble, 2i+1 in the high);
               code = sign << 3 | m * 4, m in {0, 0.25, ..., 1.75}
  byte  32     E6M2 scale: (e + 48) << 2 | mantissa, S = (1 + mantissa/4) * 2^e
  byte  33     the 8 level-1 bits, bit k for values 8k..8k+7
  bytes 34..35 the 16 level-2 bits, little-endian, bit j for values 4j..4j+3
A packed tensor keeps the grouped axis last: a weight W[N, K] packed along
dim=-1 is data (N, ceil(K/64), 36), so rows can be expanded a slice at a time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backend
from .format import from_groups, to_groups
from .spec import BYTES_PER_GROUP, GROUP_SIZE

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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

    def metadata(self) -> dict[str, str]:
        """The fields safetensors metadata needs to rebuild this object."""
        name = str(self.dtype).removeprefix("torch.")
        return {"hif4": json.dumps({"shape": list(self.shape), "dim": self.dim, "dtype": name})}

    @classmethod
    def from_saved(cls, data: Tensor, metadata: dict[str, str]) -> PackedHiF4:
        """Rebuild from a uint8 tensor and `metadata()`, validating both (untrusted files)."""
        try:
            meta = json.loads(metadata["hif4"])
            shape = tuple(int(s) for s in meta["shape"])
            dim, dtype = int(meta["dim"]), _DTYPES[meta["dtype"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"bad HiF4 packed metadata: {e!r}") from None
        if not shape or any(s < 0 for s in shape) or not -len(shape) <= dim < len(shape):
            raise ValueError(f"bad HiF4 packed shape {shape} / dim {dim}")
        moved = list(shape)
        k = moved.pop(dim % len(shape))
        expected = (*moved, math.ceil(k / GROUP_SIZE), BYTES_PER_GROUP)
        if data.dtype != torch.uint8 or tuple(data.shape) != expected:
            raise ValueError(f"HiF4 packed data must be uint8 {expected}, got {data.dtype} {tuple(data.shape)}")
        return cls(data, shape, dim % len(shape), dtype)


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


def to_planar(data: Tensor) -> Tensor:
    """Packed rows (N, G, 36) -> the same bytes per row in planar order (N, 36 G): the G*32
    code bytes, then G little-endian words `scale | level-1 bits << 8 | level-2 bits << 16`.

    Still 4.5 bits per value, but each row's codes are contiguous and 16-byte aligned (for
    G % 4 == 0, as in every Wan2.2 layer) and each group's metadata is one aligned 32-bit
    word: what a GPU kernel reads with wide loads. Packed files keep the (N, G, 36) layout;
    layers convert on load. A single group's bytes are already planar (G = 1)."""
    if data.dtype != torch.uint8 or data.ndim != 3 or data.shape[2] != BYTES_PER_GROUP:
        raise ValueError(f"packed rows must be uint8 (N, G, {BYTES_PER_GROUP}), got {data.dtype} {tuple(data.shape)}")
    n = data.shape[0]
    return torch.cat((data[:, :, :32].reshape(n, -1), data[:, :, 32:].reshape(n, -1)), dim=1)


def from_planar(planar: Tensor) -> Tensor:
    """Inverse of `to_planar`: (N, 36 G) -> (N, G, 36)."""
    if planar.dtype != torch.uint8 or planar.ndim != 2 or planar.shape[1] % BYTES_PER_GROUP:
        raise ValueError(f"planar rows must be uint8 (N, 36 G), got {planar.dtype} {tuple(planar.shape)}")
    n, g = planar.shape[0], planar.shape[1] // BYTES_PER_GROUP
    return torch.cat((planar[:, : 32 * g].reshape(n, g, 32), planar[:, 32 * g :].reshape(n, g, 4)), dim=2)


def unpack_groups_into(data: Tensor, out: Tensor) -> None:
    """(n, 36) packed groups -> out (n, 64) in out.dtype: the one decode entry point
    (`unpack`, `unpack_rows` and `packed_linear.expand_weight` decode through here),
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
