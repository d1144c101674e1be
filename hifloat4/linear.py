"""The W4A4 linear layer: y = Q(x*m [R]) @ Q(W/m [R])^T + b, Q = HiF4 along in-features.

The two `prepare_*` functions are the whole numerical contract; the ComfyUI
nodes call them too, so plain PyTorch and ComfyUI compute the same bits.
Everything is computed in float32 and handed back in the caller's dtype.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .format import quantize_dequantize
from .rotation import Rotation, rotate

CHUNK_ELEMENTS = 1 << 22  # activation values upcast to float32 at a time (16 MiB)


@dataclass(frozen=True)
class LayerQuant:
    """How one Linear is quantized: its channel mask and the optional rotation."""

    mask: Tensor  # (in_features,) float32, > 0
    rotation: Rotation | None = None


def _saturating_cast(q: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 HiF4 values -> dtype; fp16 saturates (HiF4 reaches 344064, fp16 65504)."""
    if dtype == torch.float16:
        limit = torch.finfo(dtype).max
        q = q.clamp_(-limit, limit)
    return q.to(dtype)


def _smooth_and_quantize(v: Tensor, mask: Tensor, rotation: Rotation | None, divide: bool) -> Tensor:
    v = v.float()
    v = v / mask if divide else v * mask
    if rotation is not None:
        v = rotate(v, rotation)
    return quantize_dequantize(v, dim=-1)


def prepare_weight(weight: Tensor, mask: Tensor, rotation: Rotation | None = None) -> Tensor:
    """Q(rot(W / m)) in float32, rows chunked so only a slice is upcast at a time."""
    mask = mask.to(weight.device, torch.float32)
    out = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], rows):
        out[i : i + rows] = _smooth_and_quantize(weight[i : i + rows], mask, rotation, divide=True)
    return out


def prepare_activation(x: Tensor, mask: Tensor, rotation: Rotation | None = None) -> Tensor:
    """Q(rot(x * m)) in x.dtype, computed in float32 a token chunk at a time."""
    mask = mask.to(x.device, torch.float32)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(flat)
    rows = max(1, CHUNK_ELEMENTS // max(1, flat.shape[1]))
    for i in range(0, flat.shape[0], rows):
        q = _smooth_and_quantize(flat[i : i + rows], mask, rotation, divide=False)
        out[i : i + rows] = _saturating_cast(q, x.dtype)
    return out.view(x.shape)


def w4a4_linear(x: Tensor, weight_q: Tensor, bias: Tensor | None, quant: LayerQuant) -> Tensor:
    """The quantized forward given an already prepared weight; float32 math, x.dtype out."""
    xq = prepare_activation(x, quant.mask, quant.rotation).float()
    b = None if bias is None else bias.float()
    return F.linear(xq, weight_q.float(), b).to(x.dtype)


class HiF4Linear(nn.Module):
    """Drop-in replacement for an nn.Linear running W4A4 HiF4.

    The quantized weight is computed once and cached in bf16, which holds every
    HiF4 value exactly (at most 3 significant bits, within bf16's range).
    """

    def __init__(self, linear: nn.Linear, quant: LayerQuant) -> None:
        super().__init__()
        if quant.mask.shape != (linear.in_features,):
            raise ValueError(f"mask has shape {tuple(quant.mask.shape)}, layer has {linear.in_features} inputs")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant = quant
        self.register_buffer("weight_q", prepare_weight(linear.weight.detach(), quant.mask, quant.rotation).bfloat16())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return w4a4_linear(x, self.weight_q, self.bias, self.quant)

    def extra_repr(self) -> str:
        rot = "none" if self.quant.rotation is None else f"hadamard{self.quant.rotation.block}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rotation={rot}"


def quantize_(model: nn.Module, layers: dict[str, LayerQuant],
              build: Callable[[nn.Linear, LayerQuant], nn.Module] = HiF4Linear) -> nn.Module:
    """Replace the named nn.Linear submodules of `model` by `build(linear, quant)`, in
    place: HiF4Linear (fake-quant weights) by default, or
    `hifloat4.packed_linear.PackedHiF4Linear.from_linear` (packed weights, same outputs).

    Every name must exist and be an nn.Linear; nothing is changed otherwise.
    """
    modules = dict(model.named_modules())
    problems = [n for n in layers if not isinstance(modules.get(n), nn.Linear)]
    if problems:
        raise ValueError(f"not nn.Linear layers of this model: {problems[:5]}{' ...' if len(problems) > 5 else ''}")
    for name, quant in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build(modules[name], quant))
    return model
