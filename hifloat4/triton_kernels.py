"""Fused Triton kernels for HiF4: one-pass quantization of rows (to HiF4 values, or to the
int8 codes of the int8 GEMM), one-launch decode of packed weights, and the HiF4 x HiF4
matrix product on int8 tensor cores.

Why: on a GPU the torch implementation (torch_kernels.py) is ~74 ops per chunk; these
kernels read each value once and write its result once, at memory speed, and the GEMM
turns the 4 bits into tensor-core throughput.

Exactness: a GPU compile and TRITON_INTERPRET=1 (numpy) must give the same bits, although
the interpreter truncates float casts, never fuses a*b+c into an FMA, divides exactly and
has no round-toward-zero operations, while the GPU fuses by default and has an
approximate `/`. So:
* The only float arithmetic that rounds to nearest is the input transform v = x*scale,
  v*mask or div_rn(v, mask): single IEEE float32 operations (correctly rounded on both,
  no add follows them, so nothing can be contracted into an FMA), as in torch.
* Maxima are taken on the magnitudes' bit patterns (integer order is float order for
  non-negative floats). The E6M2 scale S and R = bf16(1/S) come from the group max's bit
  pattern by a closed formula (`_group_scale_bits`; the thresholds of spec.scale_table
  are periodic in the exponent field), the same integer ops on both.
* The level bits and codes are decided in one of two formulations, the same bits:
  - on a GPU (RZ=True), by float operations rounded toward zero, each one instruction
    (`_decide_rz`): round-toward-zero is monotone and the thresholds (2, 4, integers
    below 2^24) are floats, so comparing or flooring a product rounded toward zero
    decides exactly what the exact product would;
  - in the interpreter (RZ=False), which has no such operations, by exact integer
    products of significands (`_decide_int`): |v| has 24 bits and R 8, < 2^32 in uint32.
  tests/test_rz_emulation.py proves the GPU formulation on the CPU with a numpy
  emulation of those operations, bit for bit against the reference vectors.
* Output values n * S * 2^(d-2) have at most 6 significant bits: exact in float32 and
  bf16 (range 2^-50..2^19); fp16 is rounded by integer arithmetic, half-even like torch's
  .to(float16), so subnormals and the +-65504 saturation never rely on a float cast.
* The int8 GEMM sums exact per-group int32 dots, each scaled exactly by (S_a/4)(S_w/4),
  in float32 in group order: one rounding per group, the same whether fused or not.
Inputs are loaded as integer bit patterns where the interpreter lacks the dtype (bf16,
fp8) and decoded exactly.

On a machine without CUDA the kernels run only under TRITON_INTERPRET=1, which must be
set before this module is imported (tests/conftest.py does it).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .runtime import triton_interpreted
from .spec import BYTES_PER_GROUP, GROUP_SIZE

INTERPRETED = triton_interpreted()
try:  # round-toward-zero float ops (FMUL.RZ, FFMA.RZ, FADD.RZ); compiled code only
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover - every Triton with the CUDA backend has it
    _libdevice = None
RZ = not INTERPRETED and _libdevice is not None
if _libdevice is None:  # the names must exist for the (never compiled) RZ branch
    class _NoLibdevice:
        mul_rz = fma_rz = add_rz = None
    _libdevice = _NoLibdevice()
_mul_rz, _fma_rz, _add_rz = _libdevice.mul_rz, _libdevice.fma_rz, _libdevice.add_rz


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


# Launch shapes: (rows per loop step, groups per program, warps); each thread holds 8
# consecutive values (one 16-byte load of bf16). Chosen by gpucheck's sweep on an H200
# (docs/gpucheck_nvidia_h200.json). The interpreter pays per program and per loop step, not
# per value, so it gets large tiles (same bits: every decision is per group, whatever the tile).
QUANT_TILE = (64, 16, 1) if INTERPRETED else (4, 8, 8)
DECODE_TILE = (64, 16, 1) if INTERPRETED else (8, 4, 4)
PROGRAMS_PER_SM = 64  # row-loop kernels: enough programs in flight to cover memory latency (H200 sweep)
_IN_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}
_OUT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT8_CODES = 3  # out kind: int8 codes +-(n << d) and S/4 per group
_PLANAR = 4  # out kind: planar packed rows (packing.to_planar)
_NO_MASK, _MUL_MASK, _DIV_MASK = 0, 1, 2
TWO_23 = tl.constexpr(8388608.0)  # 2^23: x + 2^23 rounded toward zero is 2^23 + floor(x) for 0 <= x < 2^23


def _device_context(t: Tensor) -> contextlib.AbstractContextManager:
    """Launch on t's GPU, not the current one."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _row_grid(rows: int, col_programs: int, rows_per_step: int, device: torch.device) -> tuple[int, int]:
    """(column programs, row programs): enough programs for every SM, each looping over rows
    (no integer division per value, and the per-column data is loaded once per program)."""
    want = max(1, _multiprocessors(device) * PROGRAMS_PER_SM // col_programs)
    return col_programs, max(1, min(triton.cdiv(rows, rows_per_step), want))


# --------------------------------------------------------------------------- device helpers

@triton.jit
def _scale_bits(index):
    """float32 bits of the E6M2 scale with byte/table index i: (1 + (i & 3)/4) * 2^((i >> 2) - 48)."""
    return (((index >> 2) + 79) << 23) | ((index & 3) << 21)


@triton.jit
def _group_scale_bits(vmax):
    """(E6M2 index, S bits, R bits) of groups from the float32 bits of their max |v| (finite, >= 0).

    spec.scale_table's thresholds (the smallest float32 max reaching each scale) are periodic
    in the bit pattern, thr[i + 4] = thr[i] + 2^23: the index is 4 x the exponent field, less
    327, plus how many of the 4 mantissa thresholds the mantissa reaches, clamped to the E6M2
    range [0, 254]. R = bf16(1/S) repeats the same way: its exponent field falls by one per
    scale octave, and its 7 mantissa bits take 4 values, by the scale's mantissa (the bytes of
    0x122B4D00). tests/test_triton_kernels.py checks both against the table, all 255 entries.
    """
    e = vmax >> 23
    m = vmax & 0x7FFFFF
    idx = (4 * e - 327 + (m >= 0x19DCEF).to(tl.int32) + (m >= 0x36CB66).to(tl.int32)
           + (m >= 0x51F8FD).to(tl.int32) + (m >= 0x7D5EB0).to(tl.int32))
    idx = tl.minimum(tl.maximum(idx, 0), 254)
    f = idx & 3
    r_bits = ((175 - (idx >> 2) - (f > 0).to(tl.int32)) << 23) | (((0x122B4D00 >> (8 * f)) & 0x7F) << 16)
    return idx, _scale_bits(idx), r_bits


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
def _decide_rz(a, m16, m8, r_bits):
    """Level bits and codes by round-toward-zero float ops (GPU only). Shapes: a (.., 8, 2, 4)
    magnitudes' bits, m16 (.., 8, 2) and m8 (.., 8) block maxima, r_bits (..) R = bf16(1/S).
    Returns b8 (.., 8), d = b8 + b16 (.., 8, 2) and the codes n (.., 8, 2, 4), as int32 and
    as float32.

    b8 = [V8 * R >= 4] = [mul_rz(V8, R) >= 4]: rz is monotone and 4 is a float, so the rounded
    product reaches 4 exactly when the exact one does; likewise b16 = [V16 * R * 2^-b8 >= 2] =
    [mul_rz(V16, R) >= 2^(1 + b8)]. n = min(floor(a * R * 2^(2-d) + 1/2), 7): fma_rz gives the
    sum rounded down to a float, whose floor is the exact floor (an integer below 2^24 is a
    float, so rounding down cannot pass it); min(., 7) then add_rz(., 2^23) keeps 2^23 + floor,
    whose low mantissa bits are n. R * 2^(2-d) is a power-of-two multiple of R: exact.
    """
    rf = r_bits.to(tl.float32, bitcast=True)
    b8 = (_mul_rz(m8.to(tl.float32, bitcast=True), rf[:, :, None]) >= 4.0).to(tl.int32)
    limit = tl.where(b8 != 0, 4.0, 2.0)[:, :, :, None]
    b16 = (_mul_rz(m16.to(tl.float32, bitcast=True), rf[:, :, None, None]) >= limit).to(tl.int32)
    d = b8[:, :, :, None] + b16
    mult = (r_bits[:, :, None, None] + ((2 - d) << 23)).to(tl.float32, bitcast=True)
    t = tl.minimum(_fma_rz(a.to(tl.float32, bitcast=True), mult[:, :, :, :, None], 0.5), 7.0)
    biased = _add_rz(t, TWO_23)  # 2^23 + n
    return b8, d, biased.to(tl.int32, bitcast=True) & 7, biased - TWO_23


@triton.jit
def _decide_int(a, m16, m8, r_bits):
    """`_decide_rz`'s results by exact integer arithmetic (the interpreter has no rz ops).

    V * R >= 2^t  <=>  sig(V) * r_sig >= 2^(t - exp(V) - r_exp), both significands integers.
    n = min(floor(X / 2^s + 1/2), 7) with X = sig(a) * r_sig < 2^32 and s = shift - exponent
    field of a: for s > 0, floor(X / 2^s + 1/2) = (floor(X / 2^(s-1)) + 1) >> 1 (X + 1 < 2^32,
    no overflow); s > 32: below 1/2, n = 0; s <= 0 only for X >= 2^30 (a >= 2^30 / R): n = 7.
    Subnormal a (and 0) get the implicit bit too: their s > 100 makes n = 0 either way.
    """
    r_sig = (((r_bits >> 16) & 0x7F) | 0x80).to(tl.uint32)
    r_exp = (r_bits >> 23) - 134
    sig8, exp8 = _significand(m8)
    b8 = _at_least_pow2(sig8 * r_sig[:, :, None], 2 - exp8 - r_exp[:, :, None]).to(tl.int32)
    sig16, exp16 = _significand(m16)
    b16 = _at_least_pow2(sig16 * r_sig[:, :, None, None],
                         1 + b8[:, :, :, None] - exp16 - r_exp[:, :, None, None]).to(tl.int32)
    d = b8[:, :, :, None] + b16
    x_int = ((a & 0x7FFFFF) | 0x800000).to(tl.uint32) * r_sig[:, :, None, None, None]
    s_minus_1 = (149 - (r_exp[:, :, None, None] + 2 - d))[:, :, :, :, None] - (a >> 23)
    n = ((x_int >> tl.minimum(tl.maximum(s_minus_1, 0), 31).to(tl.uint32)) + 1) >> 1
    n = tl.where(s_minus_1 > 31, 0, tl.minimum(n, 7)).to(tl.int32)
    return b8, d, n, n.to(tl.float32)


@triton.jit
def _to_out_bits(bits, OUT_KIND: tl.constexpr):
    """float32 bit patterns (int32) -> out-dtype bit patterns (int32, or int16 for 16-bit dtypes).

    bf16: truncation, exact for every HiF4 value (<= 6 significant bits, >= 2^-50); NaN
    stays NaN (quiet bit set, in case only low payload bits were set). fp16: half-even
    rounding in integers, subnormals included, finite values saturate at +-65504,
    Inf stays Inf (a non-finite input is kept, docs/hif4_spec.md).
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


# --------------------------------------------------------------------------- quantize rows

@triton.jit
def _encode_kernel(x_ptr, out_ptr, sc_ptr, mask_ptr, scale_ptr, flag_ptr, R, K, G, x_stride, out_stride, sc_stride,
                   IN_KIND: tl.constexpr, OUT_KIND: tl.constexpr, HAS_SCALE: tl.constexpr,
                   MASK_MODE: tl.constexpr, RZ_OPS: tl.constexpr, RB: tl.constexpr, GPP: tl.constexpr):
    """Rows of x -> HiF4 values (OUT_KIND 0..2), int8 codes +-(n << d) and S/4 (OUT_KIND 3),
    or planar packed rows (OUT_KIND 4: out_ptr the bytes, sc_ptr the same rows as int32
    words; flag_ptr becomes 1 where an input is NaN/Inf, which packing refuses).

    Program (c, r) owns GPP groups of columns and loops over rows r, r + #programs, ...: the
    mask of its columns is loaded once, no index is divided. A tile is (RB rows, GPP groups,
    8 level-1 blocks, 2 level-2 blocks, 4 values); each thread holds 8 consecutive values.
    Columns past K read as 0 (the padding of the last group).
    """
    CB: tl.constexpr = GPP * 64
    cols = tl.program_id(0) * CB + tl.arange(0, CB)
    in_k = cols < K
    if MASK_MODE != 0:
        mvec = tl.load(mask_ptr + cols, mask=in_k, other=1.0)[None, :]
    if HAS_SCALE:
        s = tl.load(scale_ptr)
    groups = tl.program_id(0) * GPP + tl.arange(0, GPP)
    for r0 in tl.range(tl.program_id(1) * RB, R, tl.num_programs(1) * RB):
        rows = r0 + tl.arange(0, RB)
        in_r = (rows < R)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        v = _load_float32(x_ptr, rows64 * x_stride + cols[None, :], in_r & in_k[None, :], IN_KIND)
        if HAS_SCALE:  # one IEEE multiply, like torch's v * scale
            v = v * s
        if MASK_MODE == 1:
            v = v * mvec
        elif MASK_MODE == 2:  # correctly rounded on both (GPU `/` is approximate)
            v = tl.math.div_rn(v, mvec)
        vb = tl.reshape(v.to(tl.int32, bitcast=True), (RB, GPP, 8, 2, 4))
        mag = vb & 0x7FFFFFFF
        nonfinite = mag >= 0x7F800000
        a = tl.where(nonfinite, 0, mag)  # NaN/Inf count as 0 for their group
        m16 = tl.max(a, axis=4)  # (RB, GPP, 8, 2): maxima as float bits
        m8 = tl.max(m16, axis=3)  # (RB, GPP, 8)
        idx, s_bits, r_bits = _group_scale_bits(tl.max(m8, axis=2))  # (RB, GPP)
        if RZ_OPS:
            b8, d, n, nf = _decide_rz(a, m16, m8, r_bits)
        else:
            b8, d, n, nf = _decide_int(a, m16, m8, r_bits)
        negative = vb < 0
        if OUT_KIND == 4:  # planar packed rows: code nibbles, then one word per group
            code = tl.reshape(n | (negative.to(tl.int32) << 3), (RB, GPP * 32, 2))
            lo, hi = tl.split(code)
            byte_cols = tl.program_id(0) * (GPP * 32) + tl.arange(0, GPP * 32)
            tl.store(out_ptr + rows64 * out_stride + byte_cols[None, :], (lo | (hi << 4)).to(tl.uint8),
                     mask=in_r & (byte_cols < G * 32)[None, :])
            b16 = tl.reshape(d - b8[:, :, :, None], (RB, GPP, 16))
            word = (idx | (tl.sum(b8 << tl.arange(0, 8)[None, None, :], axis=2) << 8)
                    | (tl.sum(b16 << tl.arange(0, 16)[None, None, :], axis=2) << 16))
            tl.store(sc_ptr + rows64 * sc_stride + G * 8 + groups[None, :], word, mask=in_r & (groups < G)[None, :])
            tl.atomic_max(flag_ptr, tl.max(tl.max(tl.reshape(nonfinite.to(tl.int32), (RB, CB)), axis=1), axis=0))
        elif OUT_KIND == 3:  # int8 codes 4q/S = +-(n << d), and S/4 per (group, row)
            code = n << d[:, :, :, :, None]
            code = tl.reshape(tl.where(negative, -code, code), (RB, CB)).to(tl.int8)
            tl.store(out_ptr + rows64 * out_stride + cols[None, :], code, mask=in_r & (cols < G * 64)[None, :])
            bad = tl.max(tl.max(tl.max(nonfinite.to(tl.int32), axis=4), axis=3), axis=2) != 0
            # S/4 >= 2^-50 is exact; a NaN/Inf input gets a NaN scale, making its output row NaN
            quarter = tl.where(bad, 0x7FC00000, s_bits - (2 << 23)).to(tl.float32, bitcast=True)
            tl.store(sc_ptr + groups[None, :] * sc_stride + rows[:, None], quarter,
                     mask=in_r & (groups < G)[None, :])
        else:
            # value = n * S * 2^(d-2): S * 2^(d-2) >= 2^-50 is a normal float, the product exact
            step = (s_bits[:, :, None, None] + ((d - 2) << 23)).to(tl.float32, bitcast=True)
            q = (nf * step[:, :, :, :, None]).to(tl.int32, bitcast=True) | (vb & -0x80000000)
            q = tl.reshape(tl.where(nonfinite, vb, q), (RB, CB))
            tl.store(out_ptr + rows64 * out_stride + cols[None, :], _to_out_bits(q, OUT_KIND), mask=in_r & in_k[None, :])


def _launch_encode(x: Tensor, out_arg: Tensor, scales: Tensor | None, mask: Tensor | None, divide: bool,
                   scale: Tensor | None, out_kind: int, tile: tuple[int, int, int], flag: Tensor | None = None) -> None:
    rows, k = x.shape
    rb, gpp, warps = tile
    g = triton.cdiv(k, GROUP_SIZE)
    x_arg = x.view(torch.uint8) if x.element_size() == 1 else (x.view(torch.int16) if x.dtype == torch.bfloat16 else x)
    mode = _NO_MASK if mask is None else (_DIV_MASK if divide else _MUL_MASK)
    dummy = out_arg  # never read: the constexpr flags compile the loads out
    with _device_context(x):
        _encode_kernel[_row_grid(rows, triton.cdiv(g, gpp), rb, x.device)](
            x_arg, out_arg, dummy if scales is None else scales, dummy if mask is None else mask,
            dummy if scale is None else scale, dummy if flag is None else flag, rows, k, g, x.stride(0), out_arg.stride(0),
            0 if scales is None else scales.stride(0),
            IN_KIND=_IN_KINDS[x.dtype], OUT_KIND=out_kind, HAS_SCALE=scale is not None, MASK_MODE=mode,
            RZ_OPS=RZ, RB=rb, GPP=gpp, num_warps=warps)


def _check_rows(x: Tensor, mask: Tensor | None, scale: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Validate the row quantizers' inputs; (mask, scale) as float32 on x's device."""
    if x.ndim != 2 or x.dtype not in _IN_KINDS:
        raise ValueError(f"quantizing rows needs a 2-D {list(_IN_KINDS)} tensor, got {x.dtype} {tuple(x.shape)}")
    if x.shape[1] > 1 and x.stride(1) != 1:
        raise ValueError("quantizing rows needs unit stride along K")
    k = x.shape[1]
    if mask is not None:
        if mask.numel() != k:
            raise ValueError(f"mask must hold K={k} values, got {tuple(mask.shape)}")
        mask = mask.reshape(k).to(device=x.device, dtype=torch.float32).contiguous()
    if scale is not None:
        if scale.numel() != 1:
            raise ValueError(f"scale must be a 1-element tensor, got {tuple(scale.shape)}")
        scale = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    return mask, scale


def quantize_rows(x: Tensor, mask: Tensor | None = None, *, divide: bool = False,
                  scale: Tensor | None = None, out_dtype: torch.dtype | None = None,
                  out: Tensor | None = None, tile: tuple[int, int, int] | None = None) -> Tensor:
    """HiF4 quantize-dequantize of each row of 2-D x (R, K) along K, in one pass.

    v = float32(x), times `scale` (a 1-element tensor, read on the device), times or
    (divide=True) divided by `mask` (K values), then HiF4 of each 64-value group
    (the last one zero-padded), written in out_dtype (default x.dtype; required for
    fp8). Bit-identical to format.quantize_dequantize of that v, cast to out_dtype,
    fp16 saturating at +-65504 (NaN/Inf are kept, docs/hif4_spec.md). x.stride(1) == 1.
    `tile` (rows per step, groups per program, warps) overrides QUANT_TILE (benchmarks).
    """
    mask, scale = _check_rows(x, mask, scale)
    rows, k = x.shape
    if out_dtype is None:
        out_dtype = out.dtype if out is not None else x.dtype
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"out_dtype must be one of {list(_OUT_KINDS)} (fp8 input needs one), got {out_dtype}")
    if out is None:
        out = torch.empty(rows, k, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(f"out must be {out_dtype} {tuple(x.shape)} on {x.device}, got {out.dtype} {tuple(out.shape)}")
    if k > 1 and out.stride(1) != 1:
        raise ValueError("quantize_rows needs unit stride along K for out")
    if rows and k:
        out_arg = out.view(torch.int32 if out.element_size() == 4 else torch.int16)
        _launch_encode(x, out_arg, None, mask, divide, scale, _OUT_KINDS[out_dtype], tile or QUANT_TILE)
    return out


def fused_rows(rows: Tensor, mask: Tensor | None, divide: bool, scale: Tensor | None, out: Tensor) -> None:
    """`quantize_rows` with the signature of backend.Kernels.quantize_rows."""
    quantize_rows(rows, mask, divide=divide, scale=scale, out=out)


def encode_int8_rows(x: Tensor, mask: Tensor | None = None, *, divide: bool = False,
                     scale: Tensor | None = None, tile: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The int8 GEMM's operand from rows of x (R, K): (codes int8 (R, G*64), quarter scales
    float32 (G, R)), G = ceil(K/64), with v = float32(x) [* scale] [* or / mask] as in
    `quantize_rows`.

    Every HiF4 value of a group is q = code * S/4 with an integer code +-(n << d) in
    [-28, 28]: codes[r, k] * quarter[k // 64, r] == quantize_rows(x)[r, k] exactly, padding
    columns hold 0. A group holding NaN/Inf gets a NaN scale (its output row is NaN).
    The scales are stored group-major so the GEMM reads a tile's scales contiguously.
    """
    mask, scale = _check_rows(x, mask, scale)
    rows, k = x.shape
    g = triton.cdiv(k, GROUP_SIZE)
    codes = torch.empty(rows, g * GROUP_SIZE, dtype=torch.int8, device=x.device)
    quarter = torch.empty(g, rows, dtype=torch.float32, device=x.device)
    if rows and k:
        _launch_encode(x, codes, quarter, mask, divide, scale, _INT8_CODES, tile or QUANT_TILE)
    return codes, quarter


def pack_rows(x: Tensor, mask: Tensor | None = None, *, divide: bool = False, scale: Tensor | None = None,
              tile: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Planar packed rows (R, 36 G) of HiF4(v), v = float32(x) [* scale] [* or / mask] as in
    `quantize_rows`, in one pass, and a 1-element int32 flag that is 1 where v held NaN/Inf
    (HiF4 codes cannot hold them: the caller refuses those rows; reading the flag is its
    one host sync). `decode_rows` of the bytes gives `quantize_rows(x, ...)` exactly."""
    mask, scale = _check_rows(x, mask, scale)
    rows, k = x.shape
    g = triton.cdiv(k, GROUP_SIZE)
    planar = torch.empty(rows, g * BYTES_PER_GROUP, dtype=torch.uint8, device=x.device)
    flag = torch.zeros(1, dtype=torch.int32, device=x.device)
    if rows and k:
        _launch_encode(x, planar, planar.view(torch.int32), mask, divide, scale, _PLANAR, tile or QUANT_TILE, flag)
    return planar, flag


# --------------------------------------------------------------------------- decode packed rows

@triton.jit
def _decode_kernel(codes_ptr, words_ptr, out_ptr, sc_ptr, N, K, G, row_bytes, row_words, out_stride, sc_stride,
                   OUT_KIND: tl.constexpr, RB: tl.constexpr, GPP: tl.constexpr):
    """Planar packed rows (packing.to_planar: per row G*32 code bytes, then G words of
    scale byte | level-1 byte << 8 | level-2 bits << 16) -> HiF4 values (OUT_KIND 0..2), or
    the int8 GEMM operand: codes +-(n << d) and S/4 per (group, row) (OUT_KIND 3).

    Program (c, r) owns GPP groups and loops over rows; code bytes are read 16 at a time.
    """
    CB: tl.constexpr = GPP * 64
    byte_cols = tl.program_id(0) * (GPP * 32) + tl.arange(0, GPP * 32)
    groups = tl.program_id(0) * GPP + tl.arange(0, GPP)
    cols = tl.program_id(0) * CB + tl.arange(0, CB)
    j = tl.arange(0, 16)[None, None, :]  # 4-value block within a group
    for r0 in tl.range(tl.program_id(1) * RB, N, tl.num_programs(1) * RB):
        rows = r0 + tl.arange(0, RB)
        in_r = (rows < N)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        byte = tl.load(codes_ptr + rows64 * row_bytes + byte_cols[None, :], mask=in_r & (byte_cols < G * 32)[None, :],
                       other=0).to(tl.int32)
        code = tl.reshape(tl.join(byte & 15, byte >> 4), (RB, GPP, 16, 4))  # value 2i in the low nibble
        word = tl.load(words_ptr + rows64 * row_words + G * 8 + groups[None, :], mask=in_r & (groups < G)[None, :],
                       other=0)  # (RB, GPP)
        d = (((word[:, :, None] >> (8 + j // 2)) & 1) + ((word[:, :, None] >> (16 + j)) & 1))  # (RB, GPP, 16)
        s_bits = _scale_bits(word & 0xFF)
        if OUT_KIND == 3:
            magnitude = (code & 7) << d[:, :, :, None]
            ints = tl.reshape(tl.where(code >= 8, -magnitude, magnitude), (RB, CB)).to(tl.int8)
            tl.store(out_ptr + rows64 * out_stride + cols[None, :], ints, mask=in_r & (cols < G * 64)[None, :])
            quarter = (s_bits - (2 << 23)).to(tl.float32, bitcast=True)  # S/4 >= 2^-50: exact
            tl.store(sc_ptr + groups[None, :] * sc_stride + rows[:, None], quarter, mask=in_r & (groups < G)[None, :])
        else:
            # S * 2^(d-2) >= 2^-50 is normal, code * step has <= 6 significant bits: exact
            step = (s_bits[:, :, None] + ((d - 2) << 23)).to(tl.float32, bitcast=True)[:, :, :, None]
            q = ((code & 7).to(tl.float32) * step).to(tl.int32, bitcast=True) | ((code >> 3) << 31)
            tl.store(out_ptr + rows64 * out_stride + cols[None, :], _to_out_bits(tl.reshape(q, (RB, CB)), OUT_KIND),
                     mask=in_r & (cols < K)[None, :])


def _check_planar(planar: Tensor, k: int) -> int:
    g = triton.cdiv(k, GROUP_SIZE)
    if planar.dtype != torch.uint8 or planar.ndim != 2 or planar.shape[1] != g * BYTES_PER_GROUP \
            or not planar.is_contiguous():
        raise ValueError(f"planar packed rows must be contiguous uint8 (n, {g * BYTES_PER_GROUP}) for K={k}, "
                         f"got {planar.dtype} {tuple(planar.shape)}")
    return g


def _launch_decode(planar: Tensor, k: int, out_arg: Tensor, scales: Tensor | None, out_kind: int,
                   tile: tuple[int, int, int]) -> None:
    n, g = planar.shape[0], triton.cdiv(k, GROUP_SIZE)
    rb, gpp, warps = tile
    words = planar.view(torch.int32)  # row_bytes = 36 G is a multiple of 4
    with _device_context(planar):
        _decode_kernel[_row_grid(n, triton.cdiv(g, gpp), rb, planar.device)](
            planar, words, out_arg, out_arg if scales is None else scales, n, k, g, planar.stride(0),
            words.stride(0), out_arg.stride(0), 0 if scales is None else scales.stride(0),
            OUT_KIND=out_kind, RB=rb, GPP=gpp, num_warps=warps)


def decode_rows(planar: Tensor, out: Tensor, tile: tuple[int, int, int] | None = None) -> None:
    """Planar packed rows (n, 36 G) -> out (n, K) HiF4 values in out.dtype (fp16 saturating),
    one launch. Bit-identical to torch_kernels.unpack_groups of the same groups."""
    k = out.shape[1]
    _check_planar(planar, k)
    if out.dtype not in _OUT_KINDS or out.ndim != 2 or out.shape[0] != planar.shape[0] or out.stride(1) != 1:
        raise ValueError(f"out must be (n, K) in {list(_OUT_KINDS)} with unit column stride, "
                         f"got {out.dtype} {tuple(out.shape)}")
    if out.device != planar.device:
        raise ValueError(f"out is on {out.device}, the codes on {planar.device}")
    if out.numel():
        _launch_decode(planar, k, out.view(torch.int32 if out.element_size() == 4 else torch.int16), None,
                       _OUT_KINDS[out.dtype], tile or DECODE_TILE)


def decode_groups(data: Tensor, out: Tensor) -> None:
    """(n, 36) packed groups -> out (n, 64): a group's bytes are a planar row with G = 1."""
    if data.dtype != torch.uint8 or data.ndim != 2 or data.shape[1] != BYTES_PER_GROUP:
        raise ValueError(f"data must be uint8 (n, {BYTES_PER_GROUP}), got {data.dtype} {tuple(data.shape)}")
    decode_rows(data.contiguous(), out)


def int8_rows(planar: Tensor, k: int, tile: tuple[int, int, int] | None = None) -> tuple[Tensor, Tensor]:
    """The int8 GEMM's weight operand from planar packed rows (n, 36 G): (codes int8 (n, 64 G),
    quarter scales float32 (G, n)), as `encode_int8_rows` gives for the same HiF4 values."""
    g = _check_planar(planar, k)
    n = planar.shape[0]
    codes = torch.empty(n, g * GROUP_SIZE, dtype=torch.int8, device=planar.device)
    quarter = torch.empty(g, n, dtype=torch.float32, device=planar.device)
    if n:
        _launch_decode(planar, k, codes, quarter, _INT8_CODES, tile or DECODE_TILE)
    return codes, quarter


# --------------------------------------------------------------------------- HiF4 x HiF4 on int8 tensor cores

def _gemm_configs() -> list[triton.Config]:
    """Tiles for the int8 GEMM: 128-wide tiles, software-pipelined loads (no register spills
    on sm_90; 128x256 and 256x128 spill). Each 64-wide K group is one int8 MMA chain and one
    promotion into the float32 accumulator (int32 -> float32, times the group's two scales):
    three CUDA-core instructions per accumulator per group, about five with the loop's
    addressing (SASS for sm_90, 128x64 tile: 321 per 64 accumulators), which on Hopper costs
    more issue slots than the int8 MMA saves: bf16's MMA takes 2/64 of an SM cycle per
    accumulator and group, three promotion instructions alone take 1.5/64. On GPUs whose
    int8 rate is 4x their bf16 rate with float32 accumulation (RTX 30/40/50) the promotion
    hides behind the MMA. Promoting by an integer add into a float's mantissa and two FFMAs
    instead of I2F + FMUL + FFMA measured the same on an H200 (three instructions either way)."""
    if INTERPRETED:  # one small config: the interpreter runs numpy per program
        return [triton.Config({"BM": 32, "BN": 32, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    return [triton.Config({"BM": bm, "BN": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4))]


@triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "G", "HAS_BIAS", "OUT_KIND"], cache_results=True)
@triton.jit
def _int8_gemm_kernel(a_ptr, sa_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, G, a_stride, w_stride, sa_stride,
                      sw_stride, out_stride, M_BUCKET, HAS_BIAS: tl.constexpr, OUT_KIND: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """out[m, n] = sum over groups g, in order, of dot_g(a[m], w[n]) * sa[g, m] * sw[g, n] (+ bias[n]).

    dot_g is an int8 dot of 64 codes in [-28, 28]: |dot_g| <= 64 * 28 * 28 < 2^16, exact in
    int32 and in float32; sa * sw has 6 significant bits and lies in [2^-100, 2^28]: exact;
    their product (<= 22 bits) is exact, so each step acc + dot_g * s rounds once, fused or
    not. Grouped program order keeps a band of A rows in L2 while W tiles stream.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, 64)
    in_m = rm < M
    in_n = rn < N
    a_ptrs = a_ptr + rm.to(tl.int64)[:, None] * a_stride + rk[None, :]
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * w_stride + rk[None, :]
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for g in range(G):
        a = tl.load(a_ptrs, mask=in_m[:, None], other=0)
        w = tl.load(w_ptrs, mask=in_n[:, None], other=0)
        sa = tl.load(sa_ptr + g * sa_stride + rm, mask=in_m, other=0.0)
        sw = tl.load(sw_ptr + g * sw_stride + rn, mask=in_n, other=0.0)
        dot = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        acc += dot.to(tl.float32) * (sa[:, None] * sw[None, :])
        a_ptrs += 64
        w_ptrs += 64
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=in_n, other=0.0).to(tl.float32)[None, :]
    offs = rm.to(tl.int64)[:, None] * out_stride + rn[None, :]
    tl.store(out_ptr + offs, _rounded_out_bits(acc.to(tl.int32, bitcast=True), OUT_KIND), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _rounded_out_bits(bits, OUT_KIND: tl.constexpr):
    """float32 bits of any value -> out-dtype bits, rounded to nearest even (the GEMM's
    output; `_to_out_bits` is for HiF4 values, which bf16 holds exactly): integer
    arithmetic, because the interpreter truncates float casts."""
    if OUT_KIND == 1:
        mag = bits & 0x7FFFFFFF
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        res = tl.where(mag > 0x7F800000, ((bits >> 16) | 0x40), rounded).to(tl.int16)
    else:
        res = _to_out_bits(bits, OUT_KIND)
    return res


def gemm_tuning() -> dict:
    """What the int8 GEMM's autotuner chose at its last tuning: the config, and each
    config's time (ms) where this Triton exposes the timings."""
    best = getattr(_int8_gemm_kernel, "best_config", None)
    timings = getattr(_int8_gemm_kernel, "configs_timings", None) or {}
    return {"config": None if best is None else _config_dict(best),
            "configs_ms": [{**_config_dict(c), "ms": float(ms[0] if isinstance(ms, (list, tuple)) else ms)}
                           for c, ms in timings.items()]}


def _config_dict(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _m_bucket(m: int) -> int:
    """Autotuning key for M: its power of two (token counts vary per call; tiles care about size)."""
    return 1 << max(0, m - 1).bit_length()


def int8_gemm(a: Tensor, a_quarter: Tensor, w: Tensor, w_quarter: Tensor, bias: Tensor | None = None,
              out_dtype: torch.dtype = torch.bfloat16, config: triton.Config | None = None) -> Tensor:
    """(M, N) = A @ W^T of HiF4 operands in int8 form (`encode_int8_rows` / `int8_rows`):
    a (M, 64 G) int8, a_quarter (G, M) float32, w (N, 64 G) int8, w_quarter (G, N) float32,
    plus bias (N,), written in out_dtype (fp16 saturating). Differs from a float32 matmul of
    the same HiF4 values only in the summation order (float32, group after group). `config`
    (one of `_gemm_configs`' kind) bypasses the autotuner: every config gives the same bits."""
    if a.dtype != torch.int8 or w.dtype != torch.int8 or a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[1] \
            or a.shape[1] % GROUP_SIZE or a.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError(f"a and w must be int8 (rows, 64 G) with unit column stride and the same G, got "
                         f"{a.dtype} {tuple(a.shape)} and {w.dtype} {tuple(w.shape)}")
    m, n, g = a.shape[0], w.shape[0], a.shape[1] // GROUP_SIZE
    if tuple(a_quarter.shape) != (g, m) or tuple(w_quarter.shape) != (g, n) or a_quarter.stride(1) != 1 \
            or w_quarter.stride(1) != 1 or a_quarter.dtype != torch.float32 or w_quarter.dtype != torch.float32:
        raise ValueError(f"scales must be float32 ({g}, M) and ({g}, N), got {tuple(a_quarter.shape)} "
                         f"and {tuple(w_quarter.shape)}")
    if out_dtype not in _OUT_KINDS:
        raise ValueError(f"out_dtype must be one of {list(_OUT_KINDS)}, got {out_dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    out_arg = out.view(torch.int32 if out.element_size() == 4 else torch.int16)
    bias_arg = out_arg if bias is None else bias.to(torch.float32).contiguous()

    def grid(meta):
        return (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)

    kernel, fixed = (_int8_gemm_kernel, {}) if config is None else \
        (_int8_gemm_kernel.fn, dict(config.all_kwargs()))
    with _device_context(a):
        kernel[grid](a, a_quarter, w, w_quarter, bias_arg, out_arg, m, n, g, a.stride(0), w.stride(0),
                     a_quarter.stride(0), w_quarter.stride(0), out.stride(0), _m_bucket(m),
                     HAS_BIAS=bias is not None, OUT_KIND=_OUT_KINDS[out_dtype], **fixed)
    return out
