"""The torch implementation of the HiF4 primitives: plain tensor ops, any device.

It is the reference the C++ (cpu_kernels) and Triton (triton_kernels) kernels are tested
against bit for bit, and what runs where neither can (MPS, meta, a CPU without a
compiler). backend.py puts its three entry points in the dispatch table:
`quantize_groups`, `pack_groups` and `unpack_groups`, over (n, 64) groups.

Exactness strategy (why the code looks the way it does):
* Per-group scale arithmetic (1/64 of the data) is a lookup in spec.scale_table.
* Per-element work runs in float32. For bf16/fp16 inputs every product is exact
  there. For float32 inputs a product |x| * R can round onto a decision
  threshold (a half-integer for the code, 4 or 2 for the level bits); those
  positions are re-decided from the exact sign of the rounding error, computed
  with a hi/lo split of |x| (both partial products are exact in float32).
* Work is done in chunks of groups so temporaries stay bounded (cache-sized on a
  CPU, large enough on a GPU that launches don't dominate) and peak memory is
  O(output) whatever the input size.
* No host synchronisation: no data-dependent Python branch, no .item(), no
  per-call host-to-device copy (tables are cached per device). Corrections for
  rare cases (NaN/Inf, float32 ties) are applied unconditionally as masks, so the
  same ops run whatever the data (packing alone returns a bool: it refuses NaN/Inf).
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .spec import saturate_, scale_table

# Groups per chunk: on a CPU 128 Ki values fit L2 with all temporaries; elsewhere
# 2 Mi values (~8 MiB per float32 temporary) keep launches few and memory bounded.
_CHUNK_GROUPS = {"cpu": 2048, "other": 1 << 15}
_LOW_BITS = 0xFFF  # hi/lo split of a float32 mantissa: hi keeps 12 bits, lo 12 bits
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)


def lookup_scales(vmax: Tensor) -> tuple[Tensor, Tensor]:
    """`group_scales` by binary search in `scale_table` (a few ops instead of ~25)."""
    thresholds, scales, recips = scale_table(vmax.device)
    idx = torch.bucketize(vmax, thresholds, right=True).sub_(1)
    return scales[idx], recips[idx]


def _below_exact(a: Tensor, mult: Tensor, prod: Tensor) -> Tensor:
    """True where the exact product a * mult is below its float32 rounding `prod`.

    `mult` has at most 8 significant bits; a = hi + lo with 12-bit halves, so
    hi*mult and lo*mult are exact, hi*mult - prod is exact (Sterbenz), and the
    sign of the final sum is the sign of the exact error.
    """
    hi = (a.view(torch.int32) & ~_LOW_BITS).view(torch.float32)
    lo = a - hi
    return (hi * mult - prod) + lo * mult < 0


def _level_bit(a: Tensor, mult: Tensor, threshold: float, exact_products: bool) -> Tensor:
    """1.0 where a * mult >= threshold (exactly), else 0.0; float32, same shape as a.

    Comparisons write straight into float32: a bool -> float conversion costs
    more than the comparison itself on CPU.
    """
    prod = a * mult
    bit = torch.ge(prod, threshold, out=torch.empty_like(prod))
    if not exact_products:  # a rounded product equal to the threshold may be just below it
        bit.masked_fill_((prod == threshold) & _below_exact(a, mult, prod), 0.0)
    return bit


def _codes(a: Tensor, mult: Tensor, exact_products: bool) -> Tensor:
    """n = min(floor(a * mult + 0.5), 7): the code magnitude of each value, as float32.

    With bf16/fp16 inputs a * mult + 0.5 is exact in float32 (at most 19
    significant bits below 16), so one fused multiply-add suffices. With float32
    inputs the product is rounded; it can only go wrong where the rounded
    fraction is exactly one half, and those values are re-decided exactly.
    """
    if exact_products:
        n = torch.mul(a, mult).add_(0.5).floor_()  # both steps exact: no fusion needed
    else:
        v = a * mult
        n = v.floor()
        frac = v - n  # exact
        up = (frac >= 0.5) & ~((frac == 0.5) & _below_exact(a, mult, v))
        n += up
    return n.clamp_(max=7.0)  # m >= 2 saturates to 1.75


def _repeat(values: Tensor, times: int) -> Tensor:
    """Repeat each value of the last axis `times` (2 or 4) times, as float32.

    A broadcast over a short inner axis runs an order of magnitude slower than
    a contiguous op on CPU, so copies are made by one integer multiply inside an
    int64: two float32 copies, or four bf16 copies (exact only for values that
    bf16 represents, as R * 2^k and S * 2^k are). Values must be non-negative.
    """
    if times == 2:
        bits = values.view(torch.int32).to(torch.int64)
        return (bits * 0x100000001).view(torch.float32)
    bits = values.to(torch.bfloat16).view(torch.int16).to(torch.int64)
    return (bits * 0x0001000100010001).view(torch.bfloat16).float()


def _pair_max(v: Tensor) -> Tensor:
    """Max of each 2 consecutive values along the last axis (halves its length)."""
    v2 = v.unflatten(-1, (-1, 2))
    return torch.maximum(v2[..., 0], v2[..., 1])


@dataclass
class GroupCodes:
    """A chunk of groups, encoded: everything the packed format stores, in float32.

    `codes` (g, 64) are code magnitudes 0..7; `step` (g, 16) the value of one
    code step in each 4-value block, S * 2^(d-2); `b8`/`b16` (g, 16) the level
    bits of each block as 0/1; `scale` (g, 1) the E6M2 scale S.
    """

    signed: Tensor  # the input as float32 (sign source; NaN/Inf kept)
    nonfinite: Tensor  # (g, 64) bool: NaN/Inf positions
    codes: Tensor
    step: Tensor
    scale: Tensor
    b8: Tensor
    b16: Tensor


def _block_max(a: Tensor) -> Tensor:
    """Max of every 4 consecutive values: (g, 64) -> (g, 16)."""
    a4 = a.view(-1, 4)
    return torch.maximum(torch.maximum(a4[:, 0], a4[:, 1]), torch.maximum(a4[:, 2], a4[:, 3])).view(-1, 16)


def encode_groups(x: Tensor) -> GroupCodes:
    """Encode groups `x` (g, 64) of any float dtype, following the spec exactly."""
    exact_products = x.dtype in (torch.bfloat16, torch.float16)
    xf = x.float()  # for float32 this is x itself: never modify it in place
    a = xf.abs()
    nonfinite = ~torch.isfinite(a)
    a.masked_fill_(nonfinite, 0.0)  # NaN/Inf count as 0 for their group
    v16 = _block_max(a)
    v8 = _pair_max(v16)  # (g, 8)
    scale, recip = lookup_scales(v8.amax(-1, keepdim=True))  # (g, 1)
    recip16 = _repeat(_repeat(recip, 4), 4)  # (g, 16), exact: R is a bf16 value
    b8 = _level_bit(_repeat(v8, 2), recip16, 4.0, exact_products)
    r16 = torch.addcmul(recip16, recip16, b8, value=-0.5)  # R * 2^-b8, exact
    b16 = _level_bit(v16, r16, 2.0, exact_products)
    mult = torch.addcmul(r16 * 4.0, r16, b16, value=-2.0)  # R * 2^(2-d), d = b8 + b16
    step = _repeat(_repeat(scale * 0.25, 4), 4).mul_((b8 + 1.0).mul_(b16 + 1.0))  # S * 2^(d-2)
    codes = _codes(a, _repeat(mult, 4), exact_products)
    return GroupCodes(xf, nonfinite, codes, step, scale, b8, b16)


def decode_values(codes: Tensor, step: Tensor, signs: Tensor, out: Tensor) -> None:
    """out (g, 64) = sign * code * step, rounded once to out.dtype (fp16 saturates).

    `signs` is any float32 tensor whose sign bits are the values' signs.
    """
    q = saturate_(codes.mul(_repeat(step, 4)), out.dtype)
    if out.dtype == torch.float32:
        torch.copysign(q, signs, out=out)
    else:
        out.copy_(q.copysign_(signs))


def chunks(n: int, device: torch.device) -> Iterator[slice]:
    """Slices of at most _CHUNK_GROUPS groups for `device`: temporaries stay bounded."""
    size = _CHUNK_GROUPS["cpu" if device.type == "cpu" else "other"]
    return (slice(i, i + size) for i in range(0, n, size))


def quantize_groups(groups: Tensor, out: Tensor) -> None:
    """(n, 64) groups of any float dtype -> out (n, 64) HiF4 values in out.dtype: chunked, sync-free."""
    for sl in chunks(groups.shape[0], groups.device):
        enc = encode_groups(groups[sl])
        decode_values(enc.codes, enc.step, enc.signed, out[sl])
        out[sl] = torch.where(enc.nonfinite, groups[sl], out[sl])


def _bits_to_bytes(bits: Tensor) -> Tensor:
    """(n, 8k) 0/1 floats -> (n, k) uint8, bit i of byte j = bits[:, 8j + i]."""
    return (bits.to(torch.uint8).view(bits.shape[0], -1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def _encode_scale(scale: Tensor) -> Tensor:
    """E6M2 scale (n, 1) float32 -> (n, 1) uint8."""
    frac, exp = torch.frexp(scale)  # scale = frac * 2^exp, frac in [0.5, 1)
    mantissa = (frac * 8.0 - 4.0).to(torch.uint8)  # (1 + m/4) / 2 = frac
    return ((exp - 1 + 48).to(torch.uint8) << 2) | mantissa


def pack_groups(groups: Tensor, data: Tensor) -> bool:
    """(n, 64) groups -> (n, 36) bytes; False if NaN/Inf.

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


def unpack_groups(data: Tensor, out: Tensor) -> None:
    """(n, 36) bytes -> out (n, 64) in out.dtype, sync-free.

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
