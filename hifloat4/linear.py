"""The W4A4 linear layer: y = Q(x*m [R]) @ Q(W/m [R])^T + b, Q = HiF4 along in-features.

`prepare_weight` and `prepare_activation` are the whole numerical contract, and
`w4a4_linear` is the one quantized forward: HiF4Linear, packed_linear's
PackedHiF4Linear and the ComfyUI paths (nodes/) all call it, each only deciding where
its HiF4-valued weight comes from, so plain PyTorch and ComfyUI compute the same bits.
`w4a4_linear_packed` runs it from packed codes, or (compute="int8") runs the same
values through the int8 GEMM; `resolve_compute` is the one rule choosing between them. Smoothing and rotation are computed in float32 and the HiF4 values
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
COMPUTE_CHOICES = ("auto", "simulate", "int8")
# Where the int8 GEMM measured faster than the bf16 matmul of the simulated path, by CUDA
# compute capability (python -m hifloat4 gpucheck: int8_gemm.speedup, docs/gpucheck_*.json).
# On Hopper (9, 0) the per-group promotion into float32 costs more issue slots than the int8
# MMA saves; GPUs whose int8 rate is 4x their float32-accumulating bf16 rate (RTX 30/40/50:
# (8, 6), (8, 9), (12, 0)) should gain, but no such card has been measured: there `auto`
# stays on "simulate" and compute="int8" opts in.
INT8_MEASURED_FASTER: dict[tuple[int, int], bool] = {(9, 0): False}


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


def resolve_compute(choice: str, device: torch.device, rotation: Rotation | None = None) -> str:
    """How a W4A4 matmul runs on `device`: "simulate" (HiF4 values, a matmul in the compute
    dtype: the reference bits) or "int8" (the int8 GEMM: the same values, float32 sums in
    another order). The one place that decides; "auto" picks int8 only where it measured
    faster (INT8_MEASURED_FASTER) and the layer has no rotation (the int8 encoder fuses the
    mask, not the rotation)."""
    if choice not in COMPUTE_CHOICES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}, got {choice!r}")
    if choice == "simulate":
        return "simulate"
    kernels = backend.kernels(device)
    if choice == "int8":
        if kernels.int8 is None:
            raise backend.BackendError(f"compute='int8' needs the Triton kernels (a CUDA GPU); {device} runs the "
                                       f"{kernels.name} backend. Use compute='simulate' or 'auto'.")
        if rotation is not None:
            raise ValueError("compute='int8' does not run rotated layers (the encoder fuses the channel mask, not the "
                             "Hadamard rotation); use compute='simulate' or 'auto' with rotation")
        return "int8"
    faster = device.type == "cuda" and INT8_MEASURED_FASTER.get(torch.cuda.get_device_capability(device), False)
    return "int8" if kernels.int8 is not None and rotation is None and faster else "simulate"


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


def w4a4_linear_packed(x: Tensor, planar: Tensor, in_features: int, bias: Tensor | None, quant: LayerQuant,
                       compute: str = "auto", compute_dtype: torch.dtype | None = None) -> Tensor:
    """The quantized forward given planar packed codes of Q(rot(W / m)) (layout.to_planar),
    on x's device, computed as `resolve_compute(compute, ...)` says: decoded into the compute
    dtype for `w4a4_linear`, or the int8 GEMM on the codes (no dequantized weight exists)."""
    dtype = x.dtype if compute_dtype is None else compute_dtype
    kernels = backend.kernels(x.device)
    if resolve_compute(compute, x.device, quant.rotation) == "simulate":
        weight = torch.empty(planar.shape[0], in_features, dtype=dtype, device=x.device)
        kernels.unpack_rows(planar, weight)
        return w4a4_linear(x, weight, bias, quant, dtype)
    a, a_quarter = kernels.int8.encode_rows(unit_stride_rows(x), quant.mask.to(x.device, torch.float32))
    w, w_quarter = kernels.int8.weight_rows(planar, in_features)
    y = kernels.int8.gemm(a, a_quarter, w, w_quarter, bias, dtype)
    return y.view(*x.shape[:-1], planar.shape[0])


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

