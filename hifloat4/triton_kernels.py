"""Fused Triton kernels for HiF4: one-pass quantize-dequantize of rows, packed decode, and
HiF4 x HiF4 matrix products on int8 dots.

Why: on a GPU the torch implementation (format.py) is ~74 ops per chunk; one kernel
reads each 64-value group once and writes its HiF4 value once.

Exactness: a GPU compile and TRITON_INTERPRET=1 (numpy) must give the same bits,
although the interpreter truncates float casts, never fuses a*b+c into an FMA and
divides exactly, while the GPU fuses by default and has an approximate `/`. So:
* The only float arithmetic that rounds is the input transform v = x*scale, v*mask
  or div_rn(v, mask): single IEEE float32 operations (correctly rounded on both, no
  add follows them, so nothing can be contracted into an FMA), as in torch.
* Everything after is integer arithmetic on float32 bit patterns: maxima of
  magnitudes (integer order is float order for non-negative floats), the E6M2
  scale S and bf16 reciprocal R by binary search in spec.scale_table (S comes
  from the table index: the index *is* the E6M2 byte), level bits and codes as
  exact integer products of significands (|v| has 24 bits, R 8: < 2^32 in uint32).
* Output values n * S * 2^(d-2) have at most 6 significant bits: the float32
  product is exact (no add follows, no FMA), exact in bf16 (range 2^-50..2^19);
  fp16 is rounded by integer arithmetic, half-even like torch's .to(float16),
  so subnormals and the +-65504 saturation never rely on a float cast.
Inputs are loaded as integer bit patterns where the interpreter lacks the dtype
(bf16, fp8) and decoded exactly.

On a machine without CUDA the kernels run only under TRITON_INTERPRET=1, which must
be set before this module is imported (tests/conftest.py does it).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import triton_interpreted
from .spec import BYTES_PER_GROUP, GROUP_SIZE, scale_table

# Launch shapes: the fastest on an H200 of groups per program 2..32 x 1..8 warps. The
# interpreter pays per program, not per value, so it gets large tiles (same bits: every
# decision is per group, whatever the tile).
_BLOCK, _NUM_WARPS = (256, 1) if triton_interpreted() else (4, 1)  # quantize: groups per program
_DECODE_BLOCK, _DECODE_WARPS = (256, 2) if triton_interpreted() else (64, 2)  # decode: groups per program
_MM_BLOCK = 64  # int8_matmul: 64 x 64 output tiles
_IN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_NO_MASK, _MUL_MASK, _DIV_MASK = 0, 1, 2
_TABLE_SIZE = 256  # E6M2 scales (255 below the NaN code) padded to a power of two
_NEVER = 0x7FFFFFFF  # a threshold above every finite float32 bit pattern


@functools.lru_cache(maxsize=None)
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(threshold bits, reciprocal bits), int32 (256,) on `device`: built once per device.

    thresholds[i] is the smallest float32 group max whose E6M2 scale is index i;
    the padding entry is never reached. Non-negative float bits sort like floats.
    """
    thresholds, _, recips = scale_table()
    thr = torch.full((_TABLE_SIZE,), _NEVER, dtype=torch.int32)
    rcp = torch.zeros(_TABLE_SIZE, dtype=torch.int32)
    thr[: len(thresholds)] = thresholds.view(torch.int32)
    rcp[: len(recips)] = recips.view(torch.int32)
    return thr.to(device), rcp.to(device)


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _scale_bits(index):
    """float32 bits of the E6M2 scale with byte/table index i: (1 + (i & 3)/4) * 2^((i >> 2) - 48)."""
    return (((index >> 2) + 79) << 23) | ((index & 3) << 21)


@triton.jit
def _significand(bits):
    """A non-negative finite float32 (bits) as m * 2^e, m an integer < 2^24: returns (m uint32, e).

    m times an 8-bit bf16 significand is < 2^32: exact in uint32 (int64 is slow on GPUs).
    """
    field = bits >> 23
    m = bits & 0x7FFFFF
    m = tl.where(field > 0, m | 0x800000, m)
    return m.to(tl.uint32), tl.maximum(field, 1) - 150


@triton.jit
def _at_least_pow2(x, t):
    """x >= 2^t, exactly, for uint32 x and any int32 t (shift amounts kept in [0, 31]:
    a shift past the width is undefined on a GPU)."""
    return (t < 32) & ((x >> tl.minimum(tl.maximum(t, 0), 31).to(tl.uint32)) != 0)


@triton.jit
def _to_out_bits(bits, OUT_KIND: tl.constexpr):
    """float32 bit patterns (int32) -> out-dtype bit patterns (int32, or int16 for 16-bit dtypes).

    bf16: truncation, exact for every HiF4 value (<= 6 significant bits, >= 2^-50); NaN
    stays NaN (quiet bit set, in case only low payload bits were set). fp16: half-even
    rounding in integers, subnormals included, finite values saturate at +-65504,
    Inf stays Inf (a non-finite input is kept, HIF4_SPEC.md).
    """
    # constexpr branches: only the taken one is compiled (one return type)
    if OUT_KIND == 0:
        res = bits
    elif OUT_KIND == 1:
        mag = bits & 0x7FFFFFFF
        hi = (bits >> 16) & 0xFFFF
        res = tl.where(mag > 0x7F800000, hi | 0x40, hi).to(tl.int16)
    else:
        mag = bits & 0x7FFFFFFF
        sign = (bits >> 16) & 0x8000
        t = mag - 0x38000000  # exponent bias 127 -> 15
        normal = (t + 0xFFF + ((t >> 13) & 1)) >> 13  # a carry into the exponent is correct
        sig = (mag & 0x7FFFFF) | 0x800000
        shift = tl.minimum(126 - (mag >> 23), 30)  # value / 2^-24 = sig / 2^shift; >= 25 gives 0
        sub = (sig + ((1 << shift) >> 1) - 1 + ((sig >> shift) & 1)) >> shift
        h = tl.where(mag < 0x38800000, sub, normal)  # below 2^-14: fp16 subnormal
        h = tl.where(mag >= 0x477FE000, 0x7BFF, h)  # >= 65504: saturate
        h = tl.where(mag >= 0x7F800000, tl.where(mag > 0x7F800000, 0x7E00, 0x7C00), h)
        res = (h | sign).to(tl.int16)
    return res


@triton.jit
def _load_float32(ptr, offs, inb, IN_KIND: tl.constexpr):
    """Load x and convert it to float32 exactly (x.float())."""
    if IN_KIND == 0:
        v = tl.load(ptr + offs, mask=inb, other=0.0)
    elif IN_KIND == 1:  # bf16 as int16 bits: the high half of a float32
        v = (tl.load(ptr + offs, mask=inb, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    elif IN_KIND == 2:
        v = tl.load(ptr + offs, mask=inb, other=0.0).to(tl.float32)
    elif IN_KIND == 3:  # float8_e4m3fn as uint8: s.eeee.mmm, bias 7, no Inf, NaN = s.1111.111
        b = tl.load(ptr + offs, mask=inb, other=0).to(tl.int32)
        e = (b >> 3) & 15
        m = b & 7
        pow2 = ((tl.maximum(e, 1) - 10 + 127) << 23).to(tl.float32, bitcast=True)
        mag = tl.where(e > 0, m + 8, m).to(tl.float32) * pow2  # exact: 4 bits times 2^k
        mag_bits = tl.where((e == 15) & (m == 7), 0x7FC00000, mag.to(tl.int32, bitcast=True))
        v = (mag_bits | ((b >> 7) << 31)).to(tl.float32, bitcast=True)
    else:  # float8_e5m2 as uint8: the high byte of a float16
        b = tl.load(ptr + offs, mask=inb, other=0).to(tl.int16)
        v = (b << 8).to(tl.float16, bitcast=True).to(tl.float32)
    return v


# --------------------------------------------------------------------------- quantize

@triton.jit
def _quantize_rows_kernel(x_ptr, out_ptr, mask_ptr, scale_ptr, thr_ptr, rcp_ptr,
                          n_groups, groups_per_row, K, x_stride, out_stride,
                          IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                          MASK_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK (row, 64-column group) pairs per program, each read once and written once.

    Tiles are (BLOCK, 8, 2, 4): group, level-1 block, level-2 block, value. Block maxima
    are reductions over the trailing axes and per-block values broadcast back with
    [..., None]: no reshape, so no data movement between threads.
    """
    gid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = gid // groups_per_row
    g4 = (gid - row * groups_per_row)[:, None, None, None]
    col = (g4 * 64 + tl.arange(0, 8)[None, :, None, None] * 8 + tl.arange(0, 2)[None, None, :, None] * 4
           + tl.arange(0, 4)[None, None, None, :])  # (BLOCK, 8, 2, 4)
    inb = (gid < n_groups)[:, None, None, None] & (col < K)  # the last group's padding reads as 0
    row = row.to(tl.int64)[:, None, None, None]

    v = _load_float32(x_ptr, row * x_stride + col, inb, IN_KIND)
    if HAS_SCALE:  # one IEEE multiply, like torch's v * scale
        v = v * tl.load(scale_ptr)
    if MASK_MODE == 1:
        v = v * tl.load(mask_ptr + col, mask=inb, other=1.0)
    elif MASK_MODE == 2:  # correctly rounded on both (GPU `/` is approximate)
        v = tl.math.div_rn(v, tl.load(mask_ptr + col, mask=inb, other=1.0))
    vb = v.to(tl.int32, bitcast=True)
    mag = vb & 0x7FFFFFFF
    nonfinite = mag >= 0x7F800000
    a = tl.where(nonfinite, 0, mag)  # NaN/Inf count as 0 for their group

    m16 = tl.max(a, axis=3)  # (BLOCK, 8, 2): max of each 4 values, as float bits
    m8 = tl.max(m16, axis=2)  # (BLOCK, 8)
    vmax = tl.max(m8, axis=1)  # (BLOCK,)

    # S, R: index of the last threshold <= vmax (thresholds[0] = 0), branchless search
    idx = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(8):
        cand = idx + (128 >> i)
        idx = tl.where(tl.load(thr_ptr + cand) <= vmax, cand, idx)
    s_bits = _scale_bits(idx)
    r_bits = tl.load(rcp_ptr + idx)  # bf16 value: R = r_sig * 2^r_exp, r_sig 8 bits
    r_sig = (((r_bits >> 16) & 0x7F) | 0x80).to(tl.uint32)[:, None]
    r_exp = ((r_bits >> 23) - 134)[:, None]  # (BLOCK, 1)

    # level bits, exactly: V * R >= 2^t  <=>  sig(V) * r_sig >= 2^(t - exp(V) - r_exp)
    sig8, exp8 = _significand(m8)
    b8 = _at_least_pow2(sig8 * r_sig, 2 - exp8 - r_exp).to(tl.int32)[:, :, None]  # (BLOCK, 8, 1)
    sig16, exp16 = _significand(m16)
    b16 = _at_least_pow2(sig16 * r_sig[:, :, None], 1 + b8 - exp16 - r_exp[:, :, None]).to(tl.int32)
    d = b8 + b16  # (BLOCK, 8, 2)

    # codes n = min(floor(a * R * 2^(2-d) + 1/2), 7) = min(floor(X / 2^s + 1/2), 7), exactly,
    # with X = sig(a) * r_sig < 2^32 and s = shift - exponent field of a. Subnormal a (and 0)
    # are given the implicit bit too: their s > 100 makes n = 0 either way.
    # s > 0: floor(X / 2^s + 1/2) = (floor(X / 2^(s-1)) + 1) >> 1 (X + 1 < 2^32: no overflow);
    # s > 32: the value is below 1/2, n = 0; s <= 0 only for X >= 2^30 (a >= 2^30 / R): n = 7.
    x_int = ((a & 0x7FFFFF) | 0x800000).to(tl.uint32) * r_sig[:, :, None, None]
    shift = (r_exp[:, :, None] + 2 - d)[:, :, :, None]
    s_minus_1 = 149 - shift - (a >> 23)  # s = 150 - (exponent field + r_exp + 2 - d)
    n = ((x_int >> tl.minimum(tl.maximum(s_minus_1, 0), 31).to(tl.uint32)) + 1) >> 1
    n = tl.where(s_minus_1 > 31, 0, tl.minimum(n, 7))

    # value = n * S * 2^(d-2): S * 2^(d-2) >= 2^-50 is a normal float, the product is exact
    step = (s_bits[:, None, None] + ((d - 2) << 23)).to(tl.float32, bitcast=True)[:, :, :, None]
    q = (n.to(tl.float32) * step).to(tl.int32, bitcast=True) | (vb & -0x80000000)
    q = tl.where(nonfinite, vb, q)
    tl.store(out_ptr + row * out_stride + col, _to_out_bits(q, OUT_KIND), mask=inb)


def _device_context(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def quantize_rows(x: Tensor, mask: Tensor | None = None, *, divide: bool = False,
                  scale: Tensor | None = None, out_dtype: torch.dtype | None = None,
                  out: Tensor | None = None) -> Tensor:
    """HiF4 quantize-dequantize of each row of 2-D x (R, K) along K, in one pass.

    v = float32(x), times `scale` (a 1-element tensor, read on the device), times or
    (divide=True) divided by `mask` (K values), then HiF4 of each 64-value group
    (the last one zero-padded), written in out_dtype (default x.dtype; required for
    fp8). Bit-identical to format.quantize_dequantize of that v, cast to out_dtype,
    fp16 saturating at +-65504 (NaN/Inf are kept, HIF4_SPEC.md). x.stride(1) == 1.
    """
    if x.ndim != 2 or x.dtype not in _IN_KINDS:
        raise ValueError(f"quantize_rows needs a 2-D {list(_IN_KINDS)} tensor, got {x.dtype} {tuple(x.shape)}")
    rows, k = x.shape
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else x.dtype
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"out_dtype must be one of {list(_OUT_KINDS)} (fp8 input needs one), got {out_dtype}")
    if out is None:
        out = torch.empty(rows, k, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(f"out must be {out_dtype} {tuple(x.shape)} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if k > 1 and (x.stride(1) != 1 or out.stride(1) != 1):
        raise ValueError("quantize_rows needs unit stride along K for x and out")
    if mask is not None:
        if mask.numel() != k:
            raise ValueError(f"mask must hold K={k} values, got {tuple(mask.shape)}")
        mask = mask.reshape(k).to(device=x.device, dtype=torch.float32).contiguous()
    if scale is not None:
        if scale.numel() != 1:
            raise ValueError(f"scale must be a 1-element tensor, got {tuple(scale.shape)}")
        scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    if rows == 0 or k == 0:
        return out
    thr, rcp = _tables(x.device)
    groups_per_row = triton.cdiv(k, GROUP_SIZE)
    n_groups = rows * groups_per_row
    x_arg = x.view(torch.uint8) if x.element_size() == 1 else (x.view(torch.int16) if x.dtype == torch.bfloat16 else x)
    out_arg = out.view(torch.int32 if out.element_size() == 4 else torch.int16)
    mode = _NO_MASK if mask is None else (_DIV_MASK if divide else _MUL_MASK)
    with _device_context(x):
        _quantize_rows_kernel[(triton.cdiv(n_groups, _BLOCK),)](
            x_arg, out_arg, thr if mask is None else mask, thr if scale is None else scale, thr, rcp,
            n_groups, groups_per_row, k, x.stride(0), out.stride(0),
            IN_KIND=_IN_KINDS[x.dtype], OUT_KIND=_OUT_KINDS[out_dtype], HAS_SCALE=scale is not None,
            MASK_MODE=mode, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out


def fused_rows(rows: Tensor, mask: Tensor | None, divide: bool, scale: Tensor | None, out: Tensor) -> None:
    """`quantize_rows` with the signature of backend.Kernels.quantize_rows."""
    quantize_rows(rows, mask, divide=divide, scale=scale, out=out)


# --------------------------------------------------------------------------- packed decode

@triton.jit
def _packed_fields(data_ptr, base, valid):
    """Packed groups at byte offsets `base` (R,) -> per value (R, 64): code (sign << 3 | n)
    and level d = b8 + b16; per group (R,): the float32 bits of S."""
    e = tl.arange(0, 64)[None, :]
    vmask = valid[:, None]
    byte = tl.load(data_ptr + base[:, None] + e // 2, mask=vmask, other=0).to(tl.int32)
    code = (byte >> ((e % 2) * 4)) & 15  # value 2i in the low nibble
    s_bits = _scale_bits(tl.load(data_ptr + base + 32, mask=valid, other=0).to(tl.int32))
    b8 = (tl.load(data_ptr + base + 33, mask=valid, other=0).to(tl.int32)[:, None] >> (e // 8)) & 1
    b16 = (tl.load(data_ptr + base[:, None] + 34 + e // 32, mask=vmask, other=0).to(tl.int32) >> ((e // 4) % 8)) & 1
    return code, b8 + b16, s_bits


@triton.jit
def _decode_groups_kernel(data_ptr, out_ptr, n_groups, data_stride, out_stride,
                          OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """BLOCK packed groups (packing.py layout) per program -> 64 values each."""
    gid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = gid < n_groups
    code, d, s_bits = _packed_fields(data_ptr, gid.to(tl.int64) * data_stride, valid)
    # S * 2^(d-2) >= 2^-50 is normal, code * step has <= 6 significant bits: exact
    step = (s_bits[:, None] + ((d - 2) << 23)).to(tl.float32, bitcast=True)
    q = ((code & 7).to(tl.float32) * step).to(tl.int32, bitcast=True) | ((code >> 3) << 31)
    out_offs = gid.to(tl.int64)[:, None] * out_stride + tl.arange(0, 64)[None, :]
    tl.store(out_ptr + out_offs, _to_out_bits(q, OUT_KIND), mask=valid[:, None])


def decode_groups(data: Tensor, out: Tensor) -> None:
    """(n, 36) uint8 packed groups -> out (n, 64) in out.dtype (fp16 saturating).

    Bit-identical to hifloat4.torch_kernels.unpack_groups. Rows may be strided.
    """
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != BYTES_PER_GROUP or data.stride(1) != 1:
        raise ValueError(f"data must be uint8 (n, {BYTES_PER_GROUP}) with unit column stride, got {data.dtype} {tuple(data.shape)}")
    if out.dtype not in _OUT_KINDS or out.shape != (data.shape[0], GROUP_SIZE) or out.stride(1) != 1:
        raise ValueError(f"out must be (n, {GROUP_SIZE}) in {list(_OUT_KINDS)} with unit column stride, got {out.dtype} {tuple(out.shape)}")
    if out.device != data.device:
        raise ValueError(f"out is on {out.device}, data on {data.device}")
    n = data.shape[0]
    if n == 0:
        return
    out_arg = out.view(torch.int32 if out.element_size() == 4 else torch.int16)
    with _device_context(data):
        _decode_groups_kernel[(triton.cdiv(n, _DECODE_BLOCK),)](
            data, out_arg, n, data.stride(0), out.stride(0), OUT_KIND=_OUT_KINDS[out.dtype], BLOCK=_DECODE_BLOCK,
            num_warps=_DECODE_WARPS)


# --------------------------------------------------------------------------- HiF4 x HiF4 on int8

@triton.jit
def _int8_operand(data_ptr, base, valid):
    """Packed groups -> (4 * value / S as int8 (R, 64), in [-28, 28]; S / 4 as float32 (R,))."""
    code, d, s_bits = _packed_fields(data_ptr, base, valid)
    magnitude = (code & 7) << d
    ints = tl.where(code >= 8, -magnitude, magnitude).to(tl.int8)
    return ints, (s_bits - (2 << 23)).to(tl.float32, bitcast=True)  # S / 4 >= 2^-50: exact


@triton.jit
def _int8_matmul_kernel(a_ptr, w_ptr, out_ptr, M, N, G, a_stride, w_stride, out_stride,
                        BM: tl.constexpr, BN: tl.constexpr):
    """out[BM, BN] tile = sum over groups g of int8 dot_g * (S_a / 4) * (S_w / 4), g in order.

    Exact up to the sum: |dot_g| <= 64 * 28 * 28 < 2^16 in int32; (S_a/4)(S_w/4) has 6
    significant bits and is >= 2^-100 (normal); their product (<= 22 bits) is exact, so
    acc + dot * scale rounds once whether or not it is fused into an FMA.
    """
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    a_base = rm.to(tl.int64) * a_stride
    w_base = rn.to(tl.int64) * w_stride
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for g in range(G):
        a_int, a_quarter = _int8_operand(a_ptr, a_base + g * 36, rm < M)
        w_int, w_quarter = _int8_operand(w_ptr, w_base + g * 36, rn < N)
        dot = tl.dot(a_int, tl.trans(w_int))  # int32
        acc += dot.to(tl.float32) * (a_quarter[:, None] * w_quarter[None, :])
    offs = rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    tl.store(out_ptr + offs, acc, mask=(rm < M)[:, None] & (rn < N)[None, :])


def int8_matmul(a: Tensor, w: Tensor) -> Tensor:
    """(M, N) float32 A @ W^T of HiF4-packed A (M, G, 36) and W (N, G, 36), packed along K.

    4 * q / S is an integer in [-28, 28] for every HiF4 value q of a group with scale S,
    so each 64-wide group is one exact int8 dot (int32 accumulation), scaled by
    S_a * S_w / 16 and summed over the groups in order in float32.
    """
    for name, t in (("a", a), ("w", w)):
        if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[2] != BYTES_PER_GROUP or t.stride(2) != 1 \
                or t.stride(1) != BYTES_PER_GROUP:
            raise ValueError(f"{name} must be packed HiF4 groups, uint8 (rows, groups, {BYTES_PER_GROUP}) "
                             f"with contiguous groups, got {t.dtype} {tuple(t.shape)}")
    if a.shape[1] != w.shape[1] or a.device != w.device:
        raise ValueError(f"a {tuple(a.shape)} on {a.device} and w {tuple(w.shape)} on {w.device} must share K and device")
    m, n, groups = a.shape[0], w.shape[0], a.shape[1]
    out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return out
    with _device_context(a):
        _int8_matmul_kernel[(triton.cdiv(m, _MM_BLOCK), triton.cdiv(n, _MM_BLOCK))](
            a, w, out, m, n, groups, a.stride(0), w.stride(0), out.stride(0), BM=_MM_BLOCK, BN=_MM_BLOCK)
    return out
