"""A deliberately simple HiF4 reference, transcribed step by step from docs/hif4_spec.md.

Float64 numpy, one group at a time, exact rational rounding helpers. Slow and
obviously correct; the fast quantizer in hifloat4.format is checked against it.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np

# The reference vectors (docs/hif4_spec.md, "Reference vectors"), vendored so a clone tests alone.
VECTORS = Path(__file__).resolve().parent / "fixtures" / "hif4_reference_vectors.npz"


def vector_cases() -> list[str]:
    """The case names of VECTORS ("NAME" of each NAME/input, NAME/expected pair), sorted."""
    with np.load(VECTORS) as d:
        return sorted({k.rsplit("/", 1)[0] for k in d.files})


def vector(case: str) -> tuple[np.ndarray, np.ndarray]:
    """(input, expected) of one case, float32."""
    with np.load(VECTORS) as d:
        return d[case + "/input"], d[case + "/expected"]


def round_half_even_to_bits(v: float, bits: int) -> float:
    """Round a positive finite float to `bits` fractional significand bits (exact)."""
    if v == 0:
        return 0.0
    e = math.floor(math.log2(v))
    if 2.0**e > v:  # guard log2 rounding
        e -= 1
    if 2.0 ** (e + 1) <= v:
        e += 1
    scaled = Fraction(v) * Fraction(2) ** (bits - e)
    return float(round(scaled) * Fraction(2) ** (e - bits))  # Fraction.round is half-even


def quantize_group(x: np.ndarray) -> np.ndarray:
    """Quantize-dequantize one group of 64 float64 values."""
    assert x.shape == (64,)
    finite = np.isfinite(x)
    a = np.where(finite, np.abs(x), 0.0)
    v16 = a.reshape(16, 4).max(axis=1)
    v8 = v16.reshape(8, 2).max(axis=1)
    vmax = v8.max()
    s = round_half_even_to_bits(float(Fraction(vmax) * Fraction(73, 512)), 7)  # bf16(Vmax * c)
    s = min(max(s, 2.0**-48), 49152.0)
    scale = round_half_even_to_bits(s, 2)
    recip = round_half_even_to_bits(float(1 / Fraction(scale)), 7)
    out = np.empty(64)
    for i in range(64):
        k, j = i // 8, i // 4
        b8 = 1 if Fraction(v8[k]) * Fraction(recip) >= 4 else 0
        b16 = 1 if Fraction(v16[j]) * Fraction(recip) / 2**b8 >= 2 else 0
        d = b8 + b16
        m = math.floor(Fraction(a[i]) * Fraction(recip) * Fraction(2) ** (2 - d) + Fraction(1, 2)) / 4
        if m >= 2:
            m = 1.75
        out[i] = math.copysign(m * 2**d * scale, x[i]) if finite[i] else x[i]
    return out


def quantize_dequantize_reference(x: np.ndarray) -> np.ndarray:
    """Rows quantized independently along the last axis, zero-padded to 64."""
    x = np.asarray(x, dtype=np.float64)
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    pad = (-k) % 64
    padded = np.concatenate([rows, np.zeros((rows.shape[0], pad))], axis=1)
    out = np.stack([np.concatenate([quantize_group(g) for g in row.reshape(-1, 64)]) for row in padded])
    return out[:, :k].reshape(x.shape)
