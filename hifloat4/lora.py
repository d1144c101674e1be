"""LoRA on packed HiF4 layers, the two ways (the math only; nodes/comfy/packed_lora.py
reads ComfyUI's patches and picks the way per layer).

Bypass: y = W4A4(x) + ((x A^T) * s) B^T per LoRA (A = down (r, in), B = up (out, r),
s = strength * alpha / r), in the compute dtype on the layer's unquantized input: the
codes stay as they are, any strength and any number of LoRAs add up exactly as the
low-rank product computes, at 2 r (in + out) FLOPs per token and LoRA.

Merge: the codes stand for the real weight W = m * R^-1(decode(P)) (the inverse of
packed_linear.planar_weight's Q(R(W / m))); W + dW is packed by planar_weight with the
same mask and rotation, exactly as Save HiF4 Model packs a weight. That re-quantizes the
whole layer: HiF4 is not idempotent (its group and sub-group scales are chosen from the
values' maxima, so re-quantizing decoded values picks finer sub-scales for ~6.5% of them),
so a merged layer carries one more rounding than the file's, even for a tiny dW.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .packed_linear import decode_weight
from .rotation import Rotation, unrotate

LORA_MODES = ("bypass", "merge")  # what a user picks on the nodes; "bypass" is the default


@dataclass(frozen=True)
class LowRank:
    """One LoRA on one layer: dW = scale * up @ down."""

    down: Tensor  # (rank, in_features), A
    up: Tensor  # (out_features, rank), B
    scale: float  # strength * alpha / rank


def lowrank_term(x: Tensor, terms: Sequence[LowRank], dtype: torch.dtype | None = None) -> Tensor | None:
    """sum over terms of ((x A^T) * s) B^T in `dtype` (default x.dtype) on x's device;
    None without terms. A and B are cast per call (nothing stays on the device)."""
    if not terms:
        return None
    dtype = x.dtype if dtype is None else dtype
    x = x.to(dtype)
    out = None
    for t in terms:
        h = F.linear(x, t.down.to(x.device, dtype, non_blocking=True)) * t.scale
        y = F.linear(h, t.up.to(x.device, dtype, non_blocking=True))
        out = y if out is None else out.add_(y)
    return out


def check_mode(mode: str) -> str:
    if mode not in LORA_MODES:
        raise ValueError(f"lora must be one of {', '.join(LORA_MODES)}, got {mode!r}")
    return mode


@torch.no_grad()
def dequantize_packed(planar: Tensor, in_features: int, mask: Tensor, rotation: Rotation | None = None) -> Tensor:
    """The real (out, in) float32 weight that planar codes of Q(R(W / m)) stand for:
    m * R^-1(decode(P)), on the codes' device (what a LoRA delta is added to)."""
    v = decode_weight(planar, in_features, torch.float32)
    if rotation is not None:
        v = unrotate(v, rotation)
    return v.mul_(mask.to(v.device, torch.float32))

