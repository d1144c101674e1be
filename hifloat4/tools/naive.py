"""The straightforward torch transcription of docs/hif4_spec.md: the benchmark's baseline.

Whole-tensor float32 ops, one line per spec step, as one would first write it
(exact for bf16/fp16 inputs, which is what `bench` feeds it). `bench` reports the
fast quantizer against it; nothing else uses it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _round_bits(v: Tensor, bits: int) -> Tensor:
    e = torch.floor(torch.log2(v.clamp_min(2.0**-126)))
    return torch.round(v * torch.exp2(bits - e)) * torch.exp2(e - bits)


def naive_quantize_dequantize(x: Tensor) -> Tensor:
    """HiF4 fake quantization along the last axis (K a multiple of 64)."""
    xf = x.float().reshape(-1, 64)
    finite = torch.isfinite(xf)
    a = torch.where(finite, xf.abs(), 0.0)
    v16 = a.view(-1, 16, 4).amax(-1)
    v8 = v16.view(-1, 8, 2).amax(-1)
    vmax = v8.amax(-1, keepdim=True)
    s = _round_bits(vmax.double() * 0.142578125, 7).clamp(2.0**-48, 49152.0)
    scale = _round_bits(s, 2)
    recip = _round_bits(1.0 / scale, 7).float()
    scale = scale.float()
    b8 = (v8 * recip >= 4).float()
    b8_16 = b8.repeat_interleave(2, dim=1)
    b16 = (v16 * recip * torch.exp2(-b8_16) >= 2).float()
    d = (b8_16 + b16).repeat_interleave(4, dim=1)
    m = torch.floor(a * recip * torch.exp2(2 - d) + 0.5) / 4
    m = torch.where(m >= 2, 1.75, m)
    q = torch.sign(xf) * m * torch.exp2(d) * scale
    q = torch.where(finite, q, xf)
    return q.reshape(x.shape).to(x.dtype)
