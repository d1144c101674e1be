"""The W4A4 linear layer: y = Q(x*m [R]) @ Q(W/m [R])^T + b, Q = HiF4 along in-features.

`prepare_weight` and `prepare_activation` are the whole numerical contract, and
`w4a4_linear` is the one quantized forward: HiF4Linear, packed_linear's
PackedHiF4Linear and the ComfyUI paths (nodes.comfy_adapter) all call it, each only
deciding where its HiF4-valued weight comes from, so plain PyTorch and ComfyUI compute
the same bits. Smoothing and rotation are computed in float32 and the HiF4 values
handed back in the compute dtype; the matmul runs in it (HiF4 values are exact in
bf16, and fp16 saturates at 65504). On CUDA, without a rotation, each `prepare_*` is
one fused Triton pass (backend.py), with the same bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backend
from .format import quantize_dequantize, unit_stride_rows
from .rotation import Rotation, rotate
from .spec import saturate_

CHUNK_ELEMENTS = 1 << 22  # activation values upcast to float32 at a time (16 MiB)
MASK_NAME = "hif4_mask"  # the mask's name in every quantized layer and in packed files


@dataclass(frozen=True)
class LayerQuant:
    """How one Linear is quantized: its channel mask and the optional rotation."""

    mask: Tensor  # (in_features,) float32, > 0
    rotation: Rotation | None = None


def _smooth_quantize_rows(rows: Tensor, mask: Tensor, rotation: Rotation | None, divide: bool,
                          scale: Tensor | None, out: Tensor) -> None:
    """out = Q(rot(float32(rows) [* scale] [/ or *] m)), written in out.dtype (fp16 saturating).

    Every caller goes through here: one definition of the transform, on every backend.
    Without a rotation Triton fuses it into one pass over `rows`; otherwise the rows
    are upcast a chunk at a time so only a slice is ever in float32.
    """
    fused = backend.kernels(rows.device).quantize_rows
    if rotation is None and fused is not None:
        fused(unit_stride_rows(rows), mask, divide, scale, out)
        return
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        v = rows[i : i + step].float()
        if scale is not None:
            v = v * scale
        v = v / mask if divide else v * mask
        if rotation is not None:
            v = rotate(v, rotation)
        out[i : i + step] = saturate_(quantize_dequantize(v, dim=-1), out.dtype)


def prepare_weight(weight: Tensor, mask: Tensor, rotation: Rotation | None = None, *,
                   scale: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Q(rot(W * scale / m)) in `dtype` (exact in bf16/fp32; fp16 saturates).

    `scale` is an fp8 checkpoint's per-tensor `scale_weight` (a 1-element tensor on
    the weight's device): the fp8 weight is dequantized inside the same pass.
    """
    mask = mask.to(weight.device, torch.float32)
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    _smooth_quantize_rows(weight, mask, rotation, True, scale, out)
    return out


def prepare_activation(x: Tensor, mask: Tensor, rotation: Rotation | None = None,
                       dtype: torch.dtype | None = None) -> Tensor:
    """Q(rot(x * m)) in `dtype` (default x.dtype; fp16 saturating)."""
    mask = mask.to(x.device, torch.float32)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape, dtype=x.dtype if dtype is None else dtype, device=x.device)
    _smooth_quantize_rows(flat, mask, rotation, False, None, out)
    return out.view(x.shape)


def w4a4_linear(x: Tensor, weight_q: Tensor, bias: Tensor | None, quant: LayerQuant,
                compute_dtype: torch.dtype | None = None) -> Tensor:
    """The quantized forward given the HiF4-valued weight Q(rot(W / m)) (any float dtype),
    computed in `compute_dtype` (default x.dtype), which is also the output's dtype.

    HiF4 values are exact in bf16 and fp32, so only the matmul's own accumulation
    differs from float32 math; a float32 matmul would cost ~15x on a GPU's tensor cores.
    """
    dtype = x.dtype if compute_dtype is None else compute_dtype
    xq = prepare_activation(x, quant.mask, quant.rotation, dtype)
    b = None if bias is None else bias.to(dtype)
    return F.linear(xq, _weight_in(weight_q, dtype), b)


def _weight_in(weight_q: Tensor, dtype: torch.dtype) -> Tensor:
    """A prepared (HiF4-valued) weight in the compute dtype: exact in bf16/fp32, fp16
    saturating. A copy when the dtype changes: the caller's weight is never clamped."""
    if weight_q.dtype == dtype:
        return weight_q
    return saturate_(weight_q.to(torch.float32, copy=True), dtype).to(dtype)


class HiF4Linear(nn.Module):
    """Drop-in replacement for an nn.Linear running W4A4 HiF4.

    The quantized weight is computed once and cached in bf16 (`weight_q`), which holds
    every HiF4 value exactly (at most 3 significant bits, within bf16's range); the
    mask is `hif4_mask`, as in packed layers.
    """

    def __init__(self, linear: nn.Linear, quant: LayerQuant) -> None:
        super().__init__()
        if quant.mask.shape != (linear.in_features,):
            raise ValueError(f"mask has shape {tuple(quant.mask.shape)}, layer has {linear.in_features} inputs")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rotation = quant.rotation
        self.register_buffer("weight_q", prepare_weight(linear.weight.detach(), quant.mask, quant.rotation,
                                                        dtype=torch.bfloat16))
        self.register_buffer(MASK_NAME, quant.mask.detach().to(torch.float32))  # moves with the model
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    @property
    def quant(self) -> LayerQuant:
        return LayerQuant(self.hif4_mask, self.rotation)

    def forward(self, x: Tensor) -> Tensor:
        return w4a4_linear(x, self.weight_q, self.bias, self.quant)

    def extra_repr(self) -> str:
        rot = "none" if self.rotation is None else f"hadamard{self.rotation.block}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rotation={rot}"

