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

import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backend, cpu_kernels
from .format import GROUP_SIZE, chunks, encode_groups, from_groups, saturate_, to_groups

BYTES_PER_GROUP = 36
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


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


def _bits_to_bytes(bits: Tensor) -> Tensor:
    """(n, 8k) 0/1 floats -> (n, k) uint8, bit i of byte j = bits[:, 8j + i]."""
    return (bits.to(torch.uint8).view(bits.shape[0], -1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def _encode_scale(scale: Tensor) -> Tensor:
    """E6M2 scale (n, 1) float32 -> (n, 1) uint8."""
    frac, exp = torch.frexp(scale)  # scale = frac * 2^exp, frac in [0.5, 1)
    mantissa = (frac * 8.0 - 4.0).to(torch.uint8)  # (1 + m/4) / 2 = frac
    return ((exp - 1 + 48).to(torch.uint8) << 2) | mantissa


def pack_groups_torch(groups: Tensor, data: Tensor) -> bool:
    """The torch implementation: (n, 64) groups -> (n, 36) bytes; False if NaN/Inf.

    One host sync, at the end (the answer is a Python bool): packing refuses
    NaN/Inf, so it cannot be sync-free; it is an export step, not a forward.
    """
    nonfinite = torch.zeros((), dtype=torch.bool, device=groups.device)
    for sl in chunks(groups.shape[0], groups.device):
        enc = encode_groups(groups[sl])
        nonfinite |= enc.nonfinite.any()
        codes = enc.codes.to(torch.uint8) | (torch.signbit(enc.signed).to(torch.uint8) << 3)
        data[sl, :32] = codes[:, 0::2] | (codes[:, 1::2] << 4)
        data[sl, 32:33] = _encode_scale(enc.scale)
        data[sl, 33:34] = _bits_to_bytes(enc.b8[:, 0::2])
        data[sl, 34:36] = _bits_to_bytes(enc.b16)
    return not bool(nonfinite)


@functools.lru_cache(maxsize=16)
def _decode_tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(quarter_scale[256], signed_code[16], bit_weights[8]) on `device`, cached.

    quarter_scale[b] = S / 4 for the E6M2 scale byte b (exact in float32: S/4 is in
    [2^-50, 1.75 * 2^13]); signed_code[c] = +-(c & 7) with the sign bit c >> 3
    (code 8 is -0.0, as the encoder writes a negative value that rounds to 0).
    """
    b = torch.arange(256, dtype=torch.int64)
    quarter = torch.ldexp(1.0 + (b & 3).double() * 0.25, (b >> 2) - 48 - 2).float()
    c = torch.arange(16)
    signed = torch.where(c >= 8, -(c & 7).double(), (c & 7).double()).float()
    signed[8] = -0.0
    bits = 1 << torch.arange(8, dtype=torch.int32)
    return quarter.to(device), signed.to(device), bits.to(device)


def unpack_groups_torch(data: Tensor, out: Tensor) -> None:
    """The torch implementation: (n, 36) bytes -> out (n, 64) in out.dtype, sync-free.

    Per value: sign/code from its nibble, times S/4 * 2^(b8 + b16) of its 4-value
    block, by table lookups. Every product is exact in float32; the one rounding is
    the store to out.dtype (fp16 saturates first).
    """
    quarter, signed, bits = _decode_tables(data.device)
    for sl in chunks(data.shape[0], data.device):
        d = data[sl]
        n = d.shape[0]
        nib = torch.stack((d[:, :32] & 15, d[:, :32] >> 4), dim=-1).view(n, 64).long()
        b8 = (d[:, 33:34].int() & bits) != 0  # (n, 8): level-1 bit per 8 values
        b16 = (d[:, 34:36].int().unsqueeze(-1) & bits).ne(0).view(n, 16)  # (n, 16): per 4 values
        level = b8.repeat_interleave(2, dim=1).int() + b16.int()  # 0, 1 or 2
        step = quarter[d[:, 32].long()].unsqueeze(1) * torch.ldexp(torch.ones_like(level, dtype=torch.float32), level)
        q = signed[nib].view(n, 16, 4).mul_(step.unsqueeze(-1)).view(n, 64)
        out[sl].copy_(saturate_(q, out.dtype))


@torch.no_grad()
def pack(x: Tensor, dim: int = -1) -> PackedHiF4:
    """Encode `x` along `dim` as HiF4 codes (`unpack` gives `quantize_dequantize(x, dim)`).

    NaN and Inf have no HiF4 code: packing a tensor holding them is refused.
    """
    if not x.is_floating_point() or x.ndim == 0:
        raise TypeError(f"pack needs a floating-point tensor with at least one axis, got {x.dtype} {tuple(x.shape)}")
    groups, moved_shape, dim = to_groups(x, dim)
    data = torch.empty(groups.shape[0], BYTES_PER_GROUP, dtype=torch.uint8, device=x.device)
    if backend.for_device(x.device) == "cpp":
        ok = cpu_kernels.load().pack_groups(groups.contiguous(), data)
    else:  # Triton has no encoder: packing is an export step, the torch path does it
        ok = pack_groups_torch(groups, data)
    if not ok:
        raise ValueError("pack: the tensor holds NaN or Inf, which HiF4 codes cannot represent")
    n_groups = math.ceil(moved_shape[-1] / GROUP_SIZE)
    return PackedHiF4(data.view(*moved_shape[:-1], n_groups, BYTES_PER_GROUP), tuple(x.shape), dim, x.dtype)


def unpack_groups_into(data: Tensor, out: Tensor) -> None:
    """(n, 36) packed groups -> out (n, 64) in out.dtype: the one decode dispatch, to
    `backend.for_device`'s decoder (C++ on CPU, Triton on CUDA, the torch tables
    otherwise), all bit-identical. `unpack`, `unpack_rows` and
    `packed_linear.expand_weight` decode through here."""
    impl = backend.for_device(data.device)
    if impl == "cpp":
        cpu_kernels.load().unpack_groups(data.contiguous(), out)
    elif impl == "triton":
        from . import triton_kernels
        triton_kernels.decode_groups(data.contiguous(), out)
    else:
        unpack_groups_torch(data, out)


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
