"""HiFloat4 (HiF4) fake quantization, bit-exact with the format's reference (HIF4_SPEC.md).

A 64-value group shares an E6M2 scale S and two levels of 1-bit exponent offsets
(one per 8 values, one per 4); each value keeps a sign and 3 magnitude bits.

Exactness strategy (why the code looks the way it does):
* Per-group scale arithmetic (1/64 of the data) runs in float64, where every step
  of the spec is exact; rounding to bf16 / E6M2 is done explicitly, never by a
  dtype cast (torch casts float64 -> bf16 through float32: double rounding).
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
  same ops run whatever the data; `backend.py` picks this path, the C++ kernel or
  the Triton kernels (same bits).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import backend, cpu_kernels

GROUP_SIZE = 64
SCALE_MIN = 2.0**-48  # smallest E6M2 scale: 2^-48 x 1.00
SCALE_MAX = 49152.0  # largest E6M2 scale: 2^15 x 1.50 (1.75 x 2^15 is NaN)
BF16_ONE_SEVENTH = 0.142578125  # bf16(1/7), the spec's c
# Groups per chunk: on a CPU 128 Ki values fit L2 with all temporaries; elsewhere
# 2 Mi values (~8 MiB per float32 temporary) keep launches few and memory bounded.
_CHUNK_GROUPS = {"cpu": 2048, "other": 1 << 15}
_LOW_BITS = 0xFFF  # hi/lo split of a float32 mantissa: hi keeps 12 bits, lo 12 bits


def _round_significand(v: Tensor, bits: int) -> Tensor:
    """Round positive float64 values to `bits` fractional significand bits, half-even."""
    _, exp = torch.frexp(v)  # v = f * 2^exp, f in [0.5, 1)
    step = torch.ldexp(torch.ones_like(v), exp - 1 - bits)
    return torch.round(v / step) * step  # division by a power of two is exact


def group_scales(vmax: Tensor) -> tuple[Tensor, Tensor]:
    """E6M2 scale S and its bf16 reciprocal R (both float32) from group maxima.

    `vmax` is the float32 per-group max |x|. This is the spec, step by step, in
    float64 where every step is exact; the quantizer uses the equivalent table
    lookup `lookup_scales`, built from this function.
    """
    s = _round_significand(vmax.double() * BF16_ONE_SEVENTH, 7)  # bf16 rounding
    s = s.clamp_(SCALE_MIN, SCALE_MAX)
    scale = _round_significand(s, 2)  # E6M2 mantissa rounding
    recip = _round_significand(1.0 / scale, 7)  # 1/S to 53 bits, then bf16: no tie is possible
    return scale.float(), recip.float()


@functools.lru_cache(maxsize=None)
def scale_table(device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor, Tensor]:
    """(thresholds, scales, reciprocals): S(vmax) is a non-decreasing step function.

    There are only 256 E6M2 values, so S(vmax) = scales[i] for the last i with
    thresholds[i] <= vmax. Each threshold is the smallest float32 reaching that
    scale, found by bisection over float32 bit patterns with `group_scales`.
    """
    exps = torch.arange(-48, 16, dtype=torch.float64)
    cands = (torch.tensor([1.0, 1.25, 1.5, 1.75], dtype=torch.float64) * torch.exp2(exps)[:, None]).flatten()
    cands = cands[cands <= SCALE_MAX]
    lo = torch.zeros(len(cands), dtype=torch.int32)  # invariant: S(lo) < cand <= S(hi), or lo == 0
    hi = torch.full((len(cands),), 0x7F7FFFFF, dtype=torch.int32)  # float32 max
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        reached = group_scales(mid.view(torch.float32))[0].double() >= cands
        hi = torch.where(reached, mid, hi)
        lo = torch.where(reached, lo, mid + 1)
    thresholds = hi.view(torch.float32)
    thresholds[0] = 0.0
    scales, recips = group_scales(thresholds)
    return thresholds.to(device), scales.to(device), recips.to(device)


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


def decode_groups(codes: Tensor, step: Tensor, signs: Tensor, out: Tensor) -> None:
    """out (g, 64) = sign * code * step, rounded once to out.dtype (fp16 saturates).

    `signs` is any float32 tensor whose sign bits are the values' signs.
    """
    q = saturate_(codes.mul(_repeat(step, 4)), out.dtype)
    if out.dtype == torch.float32:
        torch.copysign(q, signs, out=out)
    else:
        out.copy_(q.copysign_(signs))


def saturate_(q: Tensor, dtype: torch.dtype) -> Tensor:
    """Clamp HiF4 values `q` in place to what `dtype` holds, so the cast saturates.

    HiF4 reaches 7 * 49152 = 344064; float16 stops at 65504 (bf16 and float32
    hold every HiF4 value exactly). The one place that decides fp16 saturation.
    """
    limit = torch.finfo(dtype).max
    if limit < SCALE_MAX * 7:
        q.clamp_(-limit, limit)
    return q


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


def chunks(n: int, device: torch.device) -> Iterator[slice]:
    """Slices of at most _CHUNK_GROUPS groups for `device`: temporaries stay bounded."""
    size = _CHUNK_GROUPS["cpu" if device.type == "cpu" else "other"]
    return (slice(i, i + size) for i in range(0, n, size))


def quantize_groups_torch(groups: Tensor, out: Tensor) -> None:
    """The torch implementation over (n, 64) groups: any device, chunked, sync-free."""
    for sl in chunks(groups.shape[0], groups.device):
        enc = encode_groups(groups[sl])
        decode_groups(enc.codes, enc.step, enc.signed, out[sl])
        out[sl] = torch.where(enc.nonfinite, groups[sl], out[sl])


@torch.no_grad()
def quantize_dequantize(x: Tensor, dim: int = -1) -> Tensor:
    """HiF4 quantize-dequantize `x` along `dim` in groups of 64 (zero-padded).

    Returns a tensor of the same shape, dtype and device. NaN/Inf stay in place
    and the rest of their group is quantized as if they were 0. float64 input is
    quantized as its float32 rounding. The implementation is `backend.for_device`'s
    choice (C++ on CPU, Triton on CUDA, torch elsewhere): same bits everywhere.
    """
    if not x.is_floating_point():
        raise TypeError(f"HiF4 quantizes floating-point tensors, got {x.dtype}")
    if x.ndim == 0:
        return quantize_dequantize(x.reshape(1)).reshape(())
    if x.numel() == 0:
        return x.clone()
    impl = backend.for_device(x.device)
    if impl == "triton" and x.dtype != torch.float64:  # one fused pass over the rows, no grouping copy
        from . import triton_kernels
        moved = x.movedim(dim, -1)
        rows = moved.reshape(-1, moved.shape[-1])
        return triton_kernels.quantize_rows(rows).view(moved.shape).movedim(-1, dim).contiguous()
    groups, moved_shape, dim = to_groups(x, dim)
    out = torch.empty(groups.shape, dtype=x.dtype, device=x.device)
    if impl == "cpp":
        cpu_kernels.load().quantize_dequantize_groups(groups.contiguous(), out)
    else:
        quantize_groups_torch(groups, out)
    return from_groups(out, moved_shape, dim)
