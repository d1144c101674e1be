"""W4A4 with real 4.5-bit weights: the weight stays packed HiF4 in memory (36 bytes per 64
values, 28.1% of bf16) and either is decoded inside each forward or feeds the int8 GEMM.

    y = Q(x * m [R]) @ unpack(P)^T + b,   P = pack(W / m [R])

`unpack(pack(v))` is bit-identical to `quantize_dequantize(v)` (hifloat4.packing), and
`planar_weight` transforms W exactly as `linear.prepare_weight` does before quantizing, so
the decoded weight equals the fake-quant weight bit for bit and `PackedHiF4Linear` with
compute="simulate" computes the very same matmul as `linear.HiF4Linear` (through
`linear.w4a4_linear`): outputs are bit-identical. compute="int8" runs the same HiF4 values
through the int8 GEMM (`linear.resolve_compute` decides).

Memory: layers keep planar rows (layout.to_planar, the same 4.5 bits in the order GPU
kernels read); a decoded weight lives only for its layer's matmul. Files keep the group
layout (`pack_weight`, `PackedHiF4Linear.packed`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import backend
from .layout import from_planar, to_planar
from .linear import COMPUTE_CHOICES, MASK_NAME, LayerQuant, w4a4_linear_packed
from .packing import PackedHiF4, pack
from .rotation import Rotation, rotate
from .spec import BYTES_PER_GROUP, GROUP_SIZE

CHUNK_ELEMENTS = 1 << 22  # weight values handled at a time on the composed path (16 MiB in float32)


# --------------------------------------------------------------------------- packing a weight

@torch.no_grad()
def planar_weight(weight: Tensor, mask: Tensor, rotation: Rotation | None = None, *,
                  scale: Tensor | None = None) -> Tensor:
    """Planar packed rows (out, 36 ceil(in/64)) of Q(rot(W * scale / m)), W (out, in) of any
    float dtype (fp8 with its per-tensor `scale`), on W's device.

    The transform is `linear.prepare_weight`'s, step for step (float32, [* scale,] divide,
    rotate). One fused pass where the backend has one (Triton, no rotation); otherwise rows
    are processed in chunks, only a slice upcast at a time. NaN/Inf weights are refused.
    """
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"packing needs a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if tuple(mask.shape) != (in_f,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight has {in_f} input features")
    mask = mask.to(weight.device, torch.float32)
    fused = backend.kernels(weight.device).pack_rows
    if rotation is None and fused is not None:
        planar, flag = fused(weight, mask, True, scale)
        if bool(flag):  # the one host sync: packing is a load/patch step, not a forward
            raise ValueError("the weight holds NaN or Inf, which HiF4 codes cannot represent")
        return planar
    planar = torch.empty(out_f, math.ceil(in_f / GROUP_SIZE) * BYTES_PER_GROUP, dtype=torch.uint8,
                         device=weight.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, in_f))
    for i in range(0, out_f, rows):
        v = weight[i : i + rows].float()
        if scale is not None:
            v = v * scale
        v = v / mask
        if rotation is not None:
            v = rotate(v, rotation)
        planar[i : i + rows] = to_planar(pack(v, dim=-1).data)
    return planar


def pack_weight(weight: Tensor, mask: Tensor, rotation: Rotation | None = None) -> PackedHiF4:
    """PackedHiF4 (file layout) of Q(rot(W / m)) along in-features: `unpack` of it equals
    `prepare_weight(weight, mask, rotation)`. Its `dtype` is float32 (what `unpack` returns)."""
    planar = planar_weight(weight, mask, rotation)
    return PackedHiF4(from_planar(planar), tuple(weight.shape), 1, torch.float32)


@torch.no_grad()
def decode_weight(planar: Tensor, in_features: int, dtype: torch.dtype, device: torch.device | str | None = None
                  ) -> Tensor:
    """The dequantized (out, in) weight of planar packed rows, in `dtype` (fp16 saturating) on
    `device` (default: where the codes are): one decode by the device's backend."""
    device = planar.device if device is None else torch.device(device)
    planar = planar.to(device, non_blocking=True)
    out = torch.empty(planar.shape[0], in_features, dtype=dtype, device=device)
    backend.kernels(device).unpack_rows(planar, out)
    return out


# --------------------------------------------------------------------------- the layer

class PackedHiF4Linear(nn.Module):
    """A W4A4 HiF4 Linear whose weight is stored packed (4.5 bits per value).

    Buffers: `weight` uint8 (out, 36 ceil(in/64)), the planar rows of pack(rot(W / m)) (a
    packed checkpoint's `weight` (out, groups, 36) in another byte order), `hif4_mask` fp32
    (in,), `bias` (out,) or None. The state dict holds the file layout, so a layer's state
    dict is what a packed checkpoint holds (saving and loading convert). `compute` is the
    layer's choice for `linear.resolve_compute` ("auto", "simulate" or "int8").
    """

    def __init__(self, planar: Tensor, in_features: int, mask: Tensor, bias: Tensor | None = None,
                 rotation: Rotation | None = None, compute: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = planar.shape[0], in_features
        if planar.dtype != torch.uint8 or planar.ndim != 2 or \
                planar.shape[1] != math.ceil(in_features / GROUP_SIZE) * BYTES_PER_GROUP:
            raise ValueError(f"planar codes for {in_features} inputs must be uint8 (out, "
                             f"{math.ceil(in_features / GROUP_SIZE) * BYTES_PER_GROUP}), got {planar.dtype} "
                             f"{tuple(planar.shape)}")
        if tuple(mask.shape) != (self.in_features,):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, layer has {self.in_features} inputs")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, layer has {self.out_features} outputs")
        if rotation is not None:
            rotation.check(self.in_features)
        if compute not in COMPUTE_CHOICES:  # refused now, not at the first call
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}, got {compute!r}")
        self.rotation = rotation
        self.compute = compute
        self.register_buffer("weight", planar.contiguous())
        self.register_buffer(MASK_NAME, mask.detach().to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_packed(cls, packed: PackedHiF4, mask: Tensor, bias: Tensor | None = None,
                    rotation: Rotation | None = None, compute: str = "auto") -> PackedHiF4Linear:
        """From codes in the file layout (a checkpoint's (out, groups, 36) `weight`)."""
        if len(packed.shape) != 2 or packed.dim != 1:
            raise ValueError("PackedHiF4Linear needs a 2-D weight packed along its last axis")
        return cls(to_planar(packed.data), packed.shape[1], mask, bias, rotation, compute)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: LayerQuant, compute: str = "auto") -> PackedHiF4Linear:
        planar = planar_weight(linear.weight.detach(), quant.mask, quant.rotation)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(planar, linear.in_features, quant.mask, bias, quant.rotation, compute)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = from_planar(self.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].ndim == 3:  # the file layout
            state_dict[key] = to_planar(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def packed(self) -> PackedHiF4:
        """The codes in the file layout."""
        return PackedHiF4(from_planar(self.weight), (self.out_features, self.in_features), 1, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return w4a4_linear_packed(x, self.weight, self.in_features, self.bias,
                                  LayerQuant(self.hif4_mask, self.rotation), self.compute)

    def extra_repr(self) -> str:
        rot = "none" if self.rotation is None else f"hadamard{self.rotation.block}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed=hif4, rotation={rot}, "
                f"compute={self.compute}")


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer a module keeps (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.device) if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
