"""Reference fake-quantizers of the other 4-bit formats, for comparing HiF4 at (nearly) equal bits.

Plain, slow-but-obvious torch written from each format's public definition; every
function takes a floating-point tensor, quantizes blocks of consecutive values along
`dim` (zero-padded to a whole block, padding dropped afterwards) and returns the
dequantized values as float32 of the same shape. All scale and rounding arithmetic
is float64, where every step below is exact, so each result is one correctly
rounded value of the format (no double rounding through float32).

Bits per value (element bits + shared scale bits / block size):

    HiF4           4 + 32/64          = 4.5   (hifloat4.quantize_dequantize, docs/hif4_spec.md)
    NVFP4          4 + 8/16           = 4.5   (+ one fp32 per tensor: negligible)
    MXFP4          4 + 8/32           = 4.25
    INT4 g32 bf16  4 + 16/32          = 4.5

Rounding is round-half-to-even onto each element grid and saturating (values beyond
the largest element clamp to it), as the definitions cited per function specify.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ...format import quantize_dequantize as _hif4

E2M1_MAX = 6.0
E4M3_MAX = 448.0
E8M0_EMIN, E8M0_EMAX = -127, 127  # exponent 255 is NaN
INT4_QMAX = 7  # symmetric: codes -7..7 (the two's-complement -8 is unused)


# --------------------------------------------------------------------------- element types

def round_to_minifloat(x: Tensor, man_bits: int, emin: int, max_value: float) -> Tensor:
    """Round float64 values to a binary floating-point grid, half to even, saturating.

    The grid: zero, subnormals k * 2^(emin - man_bits) below 2^emin, and normals with
    `man_bits` fraction bits from 2^emin up to `max_value` (which must be on the
    grid). Values with |x| > max_value become +-max_value; the sign is kept (-0 for
    negative values that round to zero). NaN stays NaN.
    """
    x = x.double()
    a = x.abs().nan_to_num(nan=0.0, posinf=max_value)
    e = _floor_log2(a.clamp_min(2.0**emin)).clamp_min(emin)
    step = torch.ldexp(torch.ones_like(a), (e - man_bits).long())
    q = torch.round(a / step) * step  # a / step: exact (power of two); round: half to even
    q = torch.copysign(q.clamp_max(max_value), x)
    return torch.where(x.isnan(), x, q)


def _floor_log2(a: Tensor) -> Tensor:
    """Exact floor(log2(a)) of positive finite float64 values (as float64)."""
    e = torch.floor(torch.log2(a))
    one = torch.ones_like(a)
    e = torch.where(torch.ldexp(one, e.long()) > a, e - 1, e)  # log2 rounded up onto an integer
    return torch.where(torch.ldexp(one, (e + 1).long()) <= a, e + 1, e)


def e2m1(x: Tensor) -> Tensor:
    """FP4 E2M1 (OCP MX spec v1.0, table 5): 1 sign, 2 exponent bits (bias 1), 1 mantissa bit.

    Magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; no Inf/NaN; round half to even (ties go
    to the code whose mantissa bit is 0: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4);
    saturates at 6.
    """
    return round_to_minifloat(x, man_bits=1, emin=0, max_value=E2M1_MAX)


def e4m3(x: Tensor) -> Tensor:
    """FP8 E4M3 ("E4M3FN", OCP 8-bit floating point spec / OCP MX v1.0 table 3):
    4 exponent bits (bias 7), 3 mantissa bits, normals 2^-6 .. 448, subnormals down to
    2^-9, no Inf. Round half to even, saturating at 448 (NVIDIA's NVFP4 recipe casts
    its block scales with saturation)."""
    return round_to_minifloat(x, man_bits=3, emin=-6, max_value=E4M3_MAX)


def bf16(x: Tensor) -> Tensor:
    """bfloat16 rounding (8 exponent bits, 7 mantissa bits), half to even, single rounding."""
    return round_to_minifloat(x, man_bits=7, emin=-126, max_value=float(torch.finfo(torch.bfloat16).max))


def e8m0_scale(amax: Tensor, emax_elem: int) -> Tensor:
    """The MX shared scale X = 2^(floor(log2(amax)) - emax_elem) as float64 (OCP MX v1.0 §6.3).

    E8M0 is an exponent only (bias 127): the exponent is clamped to [-127, 127]. A zero
    block gets X = 2^-127 (its elements are all zero whatever X is).
    """
    a = amax.double()
    e = _floor_log2(a.clamp_min(2.0**-149))
    shared = (e - emax_elem).clamp(E8M0_EMIN, E8M0_EMAX)
    return torch.ldexp(torch.ones_like(a), shared.long())


# --------------------------------------------------------------------------- blocking

def _blocks(x: Tensor, dim: int, block: int) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(rows (n, block) float64 zero-padded, undo) for blocks of `block` values along dim."""
    if not x.is_floating_point():
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    dim = dim % max(x.ndim, 1)
    moved = x.reshape(1) if x.ndim == 0 else x.movedim(dim, -1)
    shape = moved.shape
    k = shape[-1]
    rows = moved.reshape(-1, k).double()
    pad = (-k) % block
    if pad:
        rows = torch.nn.functional.pad(rows, (0, pad))
    n_rows = rows.shape[0]

    def undo(q: Tensor) -> Tensor:
        out = q.reshape(n_rows, k + pad)[:, :k].reshape(shape).float()
        return out.reshape(()) if x.ndim == 0 else out.movedim(-1, dim).contiguous()

    return rows.reshape(-1, block), undo


# --------------------------------------------------------------------------- formats

def mxfp4(x: Tensor, dim: int = -1) -> Tensor:
    """MXFP4: blocks of 32 E2M1 elements sharing one E8M0 scale (4.25 bits/value).

    Definition: OCP Microscaling Formats (MX) Specification v1.0 (Sept. 2023), §5
    (MXFP4 = E2M1 elements, E8M0 scale, k = 32) and §6.3 (conversion): shared_exp =
    floor(log2(max_i |V_i|)) - emax_elem with emax_elem = 2 for E2M1, X = 2^shared_exp,
    P_i = E2M1(V_i / X) (round half to even, saturating at 6), value = X * P_i. Because
    the scale is a power of two chosen from the max's exponent, max/X lies in [4, 8):
    block maxima in (6, 8) * X clip to 6 * X - a property of the definition.
    """
    rows, undo = _blocks(x, dim, 32)
    scale = e8m0_scale(rows.abs().amax(dim=1, keepdim=True), emax_elem=2)
    return undo(e2m1(rows / scale) * scale)


def nvfp4(x: Tensor, dim: int = -1, tensor_scale: bool = True) -> Tensor:
    """NVFP4: blocks of 16 E2M1 elements sharing one E4M3 scale, plus one fp32 scale per
    tensor (4.5 bits/value, the per-tensor float is not counted).

    Definition: NVIDIA, "Introducing NVFP4 for Efficient and Accurate Low-Precision
    Inference" (NVIDIA technical blog, 2025) and the NVFP4 recipe of Transformer Engine /
    TensorRT Model Optimizer: with `tensor_scale` (the default, as NVIDIA defines the
    format) the fp32 per-tensor encode scale is g = (448 * 6) / amax(x); each block's
    scale s = E4M3(amax_block / 6 * g) (round half to even, saturating at 448), and
    value = E2M1(V_i * g / s) * s / g. With `tensor_scale=False` there is no per-tensor
    scale (g = 1): block scales live directly in E4M3's range [2^-9, 448], so blocks
    below ~2^-8 flush to zero and above ~2688 clip. A block whose scale is 0 decodes to 0.
    Here amax(x) is taken over the whole input tensor.
    """
    rows, undo = _blocks(x, dim, 16)
    g = torch.ones((), dtype=torch.float64)
    if tensor_scale:
        amax = rows.abs().amax() if rows.numel() else torch.zeros((), dtype=torch.float64)
        if amax > 0 and math.isfinite(float(amax)):
            g = (E4M3_MAX * E2M1_MAX) / amax
    s = e4m3(rows.abs().amax(dim=1, keepdim=True) / E2M1_MAX * g)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = e2m1(rows * g / safe) * safe / g
    return undo(torch.where(s > 0, q, torch.zeros_like(q)))


def int4_group(x: Tensor, dim: int = -1, group: int = 32) -> Tensor:
    """INT4 per-group, symmetric, with a bf16 scale per `group` values (4 + 16/group bits).

    The usual weight-only/W4A4 integer recipe (e.g. GPTQ/AWQ-style group quantization,
    symmetric variant): s = bf16(amax_group / 7), q_i = clamp(round_half_even(V_i / s),
    -7, 7), value = q_i * s. Codes are -7..7 (the two's-complement code -8 is unused,
    keeping the grid symmetric). A group whose scale is 0 decodes to 0. Group 32 gives
    4.5 bits/value, the same as HiF4 and NVFP4.
    """
    rows, undo = _blocks(x, dim, group)
    s = bf16(rows.abs().amax(dim=1, keepdim=True) / INT4_QMAX)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round(rows / safe).clamp(-INT4_QMAX, INT4_QMAX) * safe
    return undo(torch.where(s > 0, q, torch.zeros_like(q)))


def hif4(x: Tensor, dim: int = -1) -> Tensor:
    """HiF4 (docs/hif4_spec.md; arXiv 2602.11287): 64 values share an E6M2 scale and two levels
    of 1-bit exponent offsets, 3 magnitude bits + sign each: 4.5 bits/value. This project's
    bit-exact implementation, returned as float32."""
    return _hif4(x.float(), dim=dim)


@dataclass(frozen=True)
class Format:
    name: str
    bits_per_value: float
    quantize: Callable[[Tensor], Tensor]
    note: str


FORMATS: tuple[Format, ...] = (
    Format("HiF4", 4.5, hif4, "64 x (sign + 3 bits), E6M2 scale + 8 + 16 offset bits per 64"),
    Format("NVFP4", 4.5, nvfp4, "16 x E2M1 + E4M3 scale per 16, fp32 scale per tensor"),
    Format("NVFP4 (no tensor scale)", 4.5, lambda x: nvfp4(x, tensor_scale=False),
           "16 x E2M1 + E4M3 scale per 16, no per-tensor scale"),
    Format("MXFP4", 4.25, mxfp4, "32 x E2M1 + E8M0 scale per 32 (OCP MX v1.0)"),
    Format("INT4 g32 bf16", 4.5, int4_group, "32 x INT4 (-7..7) + bf16 scale per 32"),
)


def sqnr_db(x: Tensor, q: Tensor) -> float:
    """10 log10(sum x^2 / sum (q - x)^2), in float64: inf when q == x, nan for an all-zero x != q."""
    x64, q64 = x.double(), q.double()
    signal = float(x64.square().sum())
    noise = float((q64 - x64).square().sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return math.nan
    return 10.0 * math.log10(signal / noise)
