"""A numpy emulation of the GPU formulation of the Triton quantizer (`_group_scale_bits` and
`_decide_rz` in hifloat4/triton_kernels.py), operation for operation.

Triton's interpreter has no round-toward-zero operations, so the compiled GPU branch cannot
run on a CPU; this emulation proves its arithmetic instead. Each `*_rz` op is computed
exactly in float64 (with an exact error term where float64 itself would round), then
rounded toward zero to float32, flushing subnormal inputs and results to zero as the
`.ftz` instructions libdevice emits do (FMUL.FTZ.RZ, FFMA.FTZ.RZ, FADD.FTZ.RZ).
"""
from __future__ import annotations

import numpy as np

_TINY = np.float32(2.0**-126)


def _ftz(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return np.where(np.abs(x) < _TINY, np.copysign(np.float32(0), x), x).astype(np.float32)


def _toward_zero(s: np.ndarray, e: np.ndarray) -> np.ndarray:
    """float32 of the exact value s + e (float64 s, |e| <= ulp(s)/2), rounded toward zero."""
    f = s.astype(np.float32)  # nearest; inf past the range
    past = (f.astype(np.float64) - s) - e  # f - exact: its sign is exact (rounding keeps signs)
    away = np.where(s >= 0, past > 0, past < 0)
    f = np.where(away, np.nextafter(f, np.float32(0)), f)
    return _ftz(f)


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def mul_rz(a, b) -> np.ndarray:
    p = _ftz(a).astype(np.float64) * _ftz(b).astype(np.float64)  # exact: 24 + 24 bits
    return _toward_zero(p, np.zeros_like(p))


def fma_rz(a, b, c) -> np.ndarray:
    p = _ftz(a).astype(np.float64) * _ftz(b).astype(np.float64)  # exact
    s, e = _two_sum(p, np.broadcast_to(_ftz(c).astype(np.float64), p.shape))
    return _toward_zero(s, e)


def add_rz(a, b) -> np.ndarray:
    return fma_rz(a, np.float32(1), b)


def group_scale_bits(vmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_group_scale_bits`: (index, S bits, R bits) from int32 bits of group maxima."""
    e, m = vmax >> 23, vmax & 0x7FFFFF
    idx = 4 * e - 327 + sum((m >= t).astype(np.int64) for t in (0x19DCEF, 0x36CB66, 0x51F8FD, 0x7D5EB0))
    idx = np.clip(idx, 0, 254)
    f = idx & 3
    r_bits = ((175 - (idx >> 2) - (f > 0)) << 23) | (((0x122B4D00 >> (8 * f)) & 0x7F) << 16)
    s_bits = (((idx >> 2) + 79) << 23) | ((idx & 3) << 21)
    return idx, s_bits, r_bits


def _f32(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, dtype=np.int64).astype(np.uint32).view(np.float32)


def quantize_groups(v: np.ndarray) -> np.ndarray:
    """float32 groups (n, 64) -> HiF4 values (n, 64), float32, the way the GPU kernel decides."""
    vb = np.ascontiguousarray(v, dtype=np.float32).view(np.int32).astype(np.int64)
    mag = vb & 0x7FFFFFFF
    nonfinite = mag >= 0x7F800000
    a = np.where(nonfinite, 0, mag).reshape(-1, 8, 2, 4)
    m16 = a.max(axis=3)
    m8 = m16.max(axis=2)
    _, s_bits, r_bits = group_scale_bits(m8.max(axis=1))
    rf = _f32(r_bits)
    b8 = (mul_rz(_f32(m8), rf[:, None]) >= 4.0).astype(np.int64)
    limit = np.where(b8 != 0, 4.0, 2.0)[:, :, None]
    b16 = (mul_rz(_f32(m16), rf[:, None, None]) >= limit).astype(np.int64)
    d = b8[:, :, None] + b16
    mult = _f32(r_bits[:, None, None] + ((2 - d) << 23))
    t = np.minimum(fma_rz(_f32(a), mult[..., None], np.float32(0.5)), np.float32(7.0))
    nf = add_rz(t, np.float32(2.0**23)) - np.float32(2.0**23)
    step = _f32(s_bits[:, None, None] + ((d - 2) << 23))
    q = (nf * step[..., None]).astype(np.float32).reshape(-1, 64)
    q_bits = q.view(np.int32).astype(np.int64) | (vb & -0x80000000)
    return _f32(np.where(nonfinite, vb, q_bits))
