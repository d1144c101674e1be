"""The HiF4 format's constants and its scale arithmetic (docs/hif4_spec.md): the leaf every
other module imports, so there is one definition of the group, the E6M2 scale and the
fp16 saturation rule.

A 64-value group shares an E6M2 scale S and two levels of 1-bit exponent offsets (one per
8 values, one per 4); each value keeps a sign and 3 magnitude bits: 36 bytes per group.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

GROUP_SIZE = 64
BYTES_PER_GROUP = 36  # 32 bytes of codes, the scale byte, the level-1 byte, 2 level-2 bytes
SCALE_MIN = 2.0**-48  # smallest E6M2 scale: 2^-48 x 1.00
SCALE_MAX = 49152.0  # largest E6M2 scale: 2^15 x 1.50 (1.75 x 2^15 is NaN)
BF16_ONE_SEVENTH = 0.142578125  # bf16(1/7), the spec's c


def _round_significand(v: Tensor, bits: int) -> Tensor:
    """Round positive float64 values to `bits` fractional significand bits, half-even."""
    _, exp = torch.frexp(v)  # v = f * 2^exp, f in [0.5, 1)
    step = torch.ldexp(torch.ones_like(v), exp - 1 - bits)
    return torch.round(v / step) * step  # division by a power of two is exact


def group_scales(vmax: Tensor) -> tuple[Tensor, Tensor]:
    """E6M2 scale S and its bf16 reciprocal R (both float32) from group maxima.

    `vmax` is the float32 per-group max |x|. This is the spec, step by step, in float64
    where every step is exact (rounding to bf16 / E6M2 is done explicitly, never by a
    dtype cast: torch casts float64 -> bf16 through float32, a double rounding). The
    kernels use the equivalent `scale_table`, built from this function.
    """
    s = _round_significand(vmax.double() * BF16_ONE_SEVENTH, 7)  # bf16 rounding
    s = s.clamp_(SCALE_MIN, SCALE_MAX)
    scale = _round_significand(s, 2)  # E6M2 mantissa rounding
    recip = _round_significand(1.0 / scale, 7)  # 1/S to 53 bits, then bf16: no tie is possible
    return scale.float(), recip.float()


@functools.lru_cache(maxsize=None)
def scale_table(device: torch.device = torch.device("cpu")) -> tuple[Tensor, Tensor, Tensor]:
    """(thresholds, scales, reciprocals): S(vmax) is a non-decreasing step function.

    There are only 255 E6M2 scales, so S(vmax) = scales[i] for the last i with
    thresholds[i] <= vmax. Each threshold is the smallest float32 reaching that scale,
    found by bisection over float32 bit patterns with `group_scales`.
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


def saturate_(q: Tensor, dtype: torch.dtype) -> Tensor:
    """Clamp HiF4 values `q` in place to what `dtype` holds, so the cast saturates.

    HiF4 reaches 7 * 49152 = 344064; float16 stops at 65504 (bf16 and float32 hold every
    HiF4 value exactly). NaN and Inf inputs stay what they are (the spec's policy), so
    only finite values are clamped. The one place that decides fp16 saturation.
    """
    limit = torch.finfo(dtype).max
    if limit < SCALE_MAX * 7:
        torch.where(torch.isinf(q), q, q.clamp(-limit, limit), out=q)
    return q
