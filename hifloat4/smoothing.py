"""Channel masks (SmoothQuant scales, ViDiT-Q naming): y = (x * m) @ (W / m)^T.

m_c = max_o |W[o, c]|^alpha / a_c^(1 - alpha) moves quantization difficulty between
activation channel c and weight column c; Tail-Aware HiFloat4 takes a_c as a high
percentile of |x[:, c]| ("tail") rather than its max, so rare outlier tokens do not
set the scale. The mask is exact algebra (it cancels in the product); only the
quantization error depends on it.

Guards: a channel whose statistic cannot define a scale keeps m_c = 1 (identity):
a_c == 0 or non-finite (never active, or a broken calibration), and a dead weight
column w_c == 0 (or non-finite), where W/m would be 0/0. Guarded channels are not
clamped, so they stay exactly 1 whatever the clamp. Other masks are clamped to
MaskConfig.clamp so that neither x*m nor W/m can overflow or vanish.
Masks are computed in float64 (float32 on MPS) and returned as float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor

from .stats import wide_dtype

Statistic = Literal["tail", "max", "none"]
STATISTICS: tuple[str, ...] = get_args(Statistic)
_ROW_CHUNK_ELEMENTS = 1 << 22  # weight values upcast at a time in weight_absmax


@dataclass(frozen=True)
class MaskConfig:
    """How masks are derived: alpha (migration strength), activation statistic, clamp."""

    alpha: float = 0.5
    statistic: Statistic = "tail"
    clamp: tuple[float, float] = (1e-4, 1e4)

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"MaskConfig.alpha must be a number in [0, 1], got {self.alpha!r}")
        if self.statistic not in STATISTICS:
            raise ValueError(f"MaskConfig.statistic must be one of {STATISTICS}, got {self.statistic!r}")
        try:
            lo, hi = (float(v) for v in self.clamp)
        except (TypeError, ValueError):
            message = f"MaskConfig.clamp must be a pair (lo, hi) of numbers, got {self.clamp!r}"
            raise ValueError(message) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
            raise ValueError(f"MaskConfig.clamp must satisfy 0 < lo < hi (finite), got {self.clamp!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "clamp", (lo, hi))  # lists (e.g. from JSON metadata) become tuples


class SupportsChannelStats(Protocol):
    """What mask derivation needs from calibration: ChannelStats or a loaded state."""

    absmax: Tensor
    tail: Tensor


def weight_absmax(weight: Tensor) -> Tensor:
    """max_o |W[o, c]| of W[out, in] as (in,) fp32, upcasting row chunks only.

    Row chunks keep the fp32 temporary small for big layers and make fp8 weights
    (no abs/amax kernels on some devices) work. NaN propagates (the mask guards it).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    result = torch.zeros(in_features, dtype=torch.float32, device=weight.device)
    step = max(1, _ROW_CHUNK_ELEMENTS // max(in_features, 1))
    for r0 in range(0, out_features, step):
        chunk = weight[r0 : r0 + step].to(torch.float32).abs().amax(dim=0)
        result = torch.maximum(result, chunk)  # NaN-propagating
    return result


def activation_statistic(stats: SupportsChannelStats, config: MaskConfig) -> Tensor | None:
    """The per-channel a_c the config asks for: stats.tail, stats.absmax, or None for "none"."""
    if config.statistic == "tail":
        return stats.tail
    if config.statistic == "max":
        return stats.absmax
    return None


def channel_mask(w_absmax: Tensor, act_stat: Tensor | None, config: MaskConfig = MaskConfig()) -> Tensor:
    """m_c = w_c^alpha / a_c^(1-alpha), guarded and clamped, as (C,) fp32 on w_absmax's device."""
    if w_absmax.dim() != 1:
        raise ValueError(f"w_absmax must be 1-D (in_features,), got shape {tuple(w_absmax.shape)}")
    if config.statistic == "none":
        return torch.ones(w_absmax.shape, dtype=torch.float32, device=w_absmax.device)
    if act_stat is None:
        raise ValueError(f"statistic {config.statistic!r} needs an activation statistic, got None")
    if act_stat.shape != w_absmax.shape:
        raise ValueError(
            f"activation statistic shape {tuple(act_stat.shape)} "
            f"!= weight statistic shape {tuple(w_absmax.shape)}"
        )
    dtype = wide_dtype(w_absmax.device)
    w = w_absmax.to(dtype)
    a = act_stat.to(w_absmax.device, dtype)
    lo, hi = config.clamp
    m = (w.pow(config.alpha) / a.pow(1.0 - config.alpha)).clamp(lo, hi)
    usable = torch.isfinite(w) & (w > 0) & torch.isfinite(a) & (a > 0)
    return torch.where(usable, m, torch.ones_like(m)).to(torch.float32)

