"""W4A4 with real 4.5-bit weights: the weight stays packed HiF4 in memory (36 bytes
per 64 values, 28.1% of bf16) and is expanded inside each forward.

    y = Q(x * m [R]) @ unpack(P)^T + b,   P = pack(W / m [R])

`unpack(pack(v))` is bit-identical to `quantize_dequantize(v)` (hifloat4.packing),
and `pack_weight` transforms W exactly as `linear.prepare_weight` does before
quantizing, so the expanded weight equals the fake-quant weight bit for bit and
`PackedHiF4Linear` computes the very same matmul (in the activation's dtype) as
`linear.HiF4Linear` (through `linear.w4a4_linear`): outputs are bit-identical.

Memory: the expansion writes one layer's weight (row chunks at a time, on the
compute device) into a buffer that lives only for that layer's matmul; the packed
codes, the (in_features,) fp32 mask and the bias are all that stay resident.

`expand_weight` decodes with `hifloat4.packing.unpack_groups_into`: the backend's
decoder (C++ on CPU, the fused Triton decoder on CUDA, torch tables elsewhere),
all with the bits of `hifloat4.unpack`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .linear import MASK_NAME, LayerQuant, w4a4_linear
from .packing import PackedHiF4, pack, unpack_groups_into, unpack_rows
from .rotation import Rotation, rotate
from .spec import BYTES_PER_GROUP, GROUP_SIZE

CHUNK_ELEMENTS = 1 << 22  # weight values handled at a time (16 MiB in float32)


# --------------------------------------------------------------------------- packing a weight

@torch.no_grad()
def pack_weight(weight: Tensor, mask: Tensor, rotation: Rotation | None = None) -> PackedHiF4:
    """PackedHiF4 of Q(rot(W / m)) along in-features, W (out, in) of any float dtype.

    The transform is `linear.prepare_weight`'s, step for step (float32, divide,
    rotate), so `unpack` of the result equals `prepare_weight(weight, mask, rotation)`.
    Rows are processed in chunks: only a slice is upcast at a time. `dtype` of the
    result is float32 (what `unpack` returns unless asked otherwise).
    """
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"pack_weight needs a 2-D float weight, got {weight.dtype} {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if tuple(mask.shape) != (in_f,):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, the weight has {in_f} input features")
    mask = mask.to(weight.device, torch.float32)
    data = torch.empty(out_f, math.ceil(in_f / GROUP_SIZE), BYTES_PER_GROUP, dtype=torch.uint8,
                       device=weight.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, in_f))
    for i in range(0, out_f, rows):
        v = weight[i : i + rows].float() / mask
        if rotation is not None:
            v = rotate(v, rotation)
        data[i : i + rows] = pack(v, dim=-1).data
    return PackedHiF4(data, (out_f, in_f), 1, torch.float32)


# --------------------------------------------------------------------------- expansion

@torch.no_grad()
def expand_weight(packed: PackedHiF4, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """The dequantized (out, in) weight of a PackedHiF4 packed along dim=-1, in `dtype`
    (default: packed.dtype) on `device` (default: where the codes are).

    Equal to `hifloat4.unpack(packed).to(dtype)` when packed.dtype is float32, and to
    `unpack` itself for the same dtype; built row chunk by row chunk on the device.
    """
    if len(packed.shape) != 2 or packed.dim != 1:
        raise ValueError("expand_weight needs a 2-D weight packed along its last axis")
    dtype = packed.dtype if dtype is None else dtype
    device = packed.data.device if device is None else torch.device(device)
    out_f, in_f = packed.shape
    data = packed.data.to(device, non_blocking=True)
    out = torch.empty(out_f, in_f, dtype=dtype, device=device)
    rows = max(1, chunk_elements // max(1, in_f))
    aligned = in_f % GROUP_SIZE == 0
    for i in range(0, out_f, rows):
        if aligned:  # decode straight into the output rows
            unpack_groups_into(data[i : i + rows].reshape(-1, BYTES_PER_GROUP), out[i : i + rows].view(-1, GROUP_SIZE))
        else:  # a padded last group: decode, then drop the padding
            part = PackedHiF4(data[i : i + rows], (min(rows, out_f - i), in_f), 1, dtype)
            out[i : i + rows] = unpack_rows(part, 0, part.shape[0])
    return out


# --------------------------------------------------------------------------- the layer

class PackedHiF4Linear(nn.Module):
    """A W4A4 HiF4 Linear whose weight is stored packed (4.5 bits per value).

    Buffers, named as in a packed checkpoint (hifloat4.checkpoint): `weight` uint8
    (out, ceil(in/64), 36) = pack(rot(W / m)), `hif4_mask` fp32 (in,), `bias` (out,)
    or None; the logical shape is (out_features, in_features). The forward expands the
    weight in the activation's dtype and runs `linear.w4a4_linear`, like `linear.HiF4Linear`.
    """

    def __init__(self, packed: PackedHiF4, mask: Tensor, bias: Tensor | None = None,
                 rotation: Rotation | None = None) -> None:
        super().__init__()
        if len(packed.shape) != 2 or packed.dim != 1:
            raise ValueError("PackedHiF4Linear needs a 2-D weight packed along its last axis")
        self.out_features, self.in_features = packed.shape
        if tuple(mask.shape) != (self.in_features,):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, layer has {self.in_features} inputs")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, layer has {self.out_features} outputs")
        if rotation is not None:
            rotation.check(self.in_features)
        self.rotation = rotation
        self.register_buffer("weight", packed.data)
        self.register_buffer(MASK_NAME, mask.detach().to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: LayerQuant) -> PackedHiF4Linear:
        packed = pack_weight(linear.weight.detach(), quant.mask, quant.rotation)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, quant.mask, bias, quant.rotation)

    @property
    def packed(self) -> PackedHiF4:
        return PackedHiF4(self.weight, (self.out_features, self.in_features), 1, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        weight = expand_weight(self.packed, x.dtype, x.device)  # decoded straight into the matmul dtype
        return w4a4_linear(x, weight, self.bias, LayerQuant(self.hif4_mask, self.rotation))

    def extra_repr(self) -> str:
        rot = "none" if self.rotation is None else f"hadamard{self.rotation.block}"
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=hif4, rotation={rot}"


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
