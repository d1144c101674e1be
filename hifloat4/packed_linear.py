"""W4A4 with real 4.5-bit weights: the weight stays packed HiF4 in memory (36 bytes
per 64 values, 28.1% of bf16) and is expanded inside each forward.

    y = Q(x * m [R]) @ unpack(P)^T + b,   P = pack(W / m [R])

`unpack(pack(v))` is bit-identical to `quantize_dequantize(v)` (hifloat4.packing),
and `pack_weight` transforms W exactly as `linear.prepare_weight` does before
quantizing, so the expanded weight equals the fake-quant weight bit for bit and
`PackedHiF4Linear` computes the very same float32 matmul as `linear.HiF4Linear`
(through `linear.w4a4_linear`): outputs are bit-identical.

Memory: the expansion writes one layer's weight (row chunks at a time, on the
compute device) into a buffer that lives only for that layer's matmul; the packed
codes, the (in_features,) fp32 mask and the bias are all that stay resident.

`expand_weight` uses the C++ CPU kernel on CPU and, elsewhere (CUDA), a
vectorized table decoder with few large launches (the generic torch decoder in
packing.py works in 128 Ki-value chunks of ~20 ops: slow on a GPU). Both give
the bits of `hifloat4.unpack`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from . import cpu_kernels
from .format import GROUP_SIZE
from .linear import LayerQuant, w4a4_linear
from .packing import BYTES_PER_GROUP, PackedHiF4, pack, unpack_groups_torch, unpack_rows
from .rotation import Rotation, rotate

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

@functools.lru_cache(maxsize=16)
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(quarter_scale[256], signed_code[16], bit_weights[8]) on `device`.

    quarter_scale[b] = S / 4 for the E6M2 scale byte b (exact in float32: S/4 is in
    [2^-50, 1.75 * 2^13]); signed_code[c] = +-(c & 7) with the sign bit c >> 3
    (code 8 is -0.0, as hifloat4.unpack writes it).
    """
    b = torch.arange(256, dtype=torch.int64)
    quarter = torch.ldexp(1.0 + (b & 3).double() * 0.25, (b >> 2) - 48 - 2).float()
    c = torch.arange(16)
    signed = torch.where(c >= 8, -(c & 7).double(), (c & 7).double()).float()
    signed[8] = -0.0
    bits = 1 << torch.arange(8, dtype=torch.int32)
    return quarter.to(device), signed.to(device), bits.to(device)


def _decode_groups_vectorized(data: Tensor, out: Tensor) -> None:
    """(n, 36) uint8 -> out (n, 64) in out.dtype, bit-identical to hifloat4.unpack.

    Per value: sign/code from its nibble, times S/4 * 2^(b8 + b16) of its 4-value
    block. Every product is exact in float32; the one rounding is the store to
    out.dtype (fp16 saturates at its max first, as packing.decode_groups does).
    """
    quarter, signed, bits = _tables(data.device)
    n = data.shape[0]
    nib = torch.stack((data[:, :32] & 15, data[:, :32] >> 4), dim=-1).view(n, 64).long()
    b8 = (data[:, 33:34].int() & bits) != 0  # (n, 8): level-1 bit per 8 values
    b16 = (data[:, 34:36].int().unsqueeze(-1) & bits).ne(0).view(n, 16)  # (n, 16): per 4 values
    level = b8.repeat_interleave(2, dim=1).int() + b16.int()  # 0, 1 or 2
    step = quarter[data[:, 32].long()].unsqueeze(1) * torch.ldexp(torch.ones_like(level, dtype=torch.float32), level)
    q = signed[nib].view(n, 16, 4).mul_(step.unsqueeze(-1)).view(n, 64)
    limit = torch.finfo(out.dtype).max
    if limit < 7 * 49152.0:
        q.clamp_(-limit, limit)
    out.copy_(q)


def _decode_into(data: Tensor, out: Tensor) -> None:
    """(n, 36) packed groups -> out (n, 64), choosing the fastest exact decoder."""
    if data.device.type == "cpu":
        kernels = cpu_kernels.load()
        if kernels is not None:
            kernels.unpack_groups(data.contiguous(), out)
            return
        unpack_groups_torch(data, out)
        return
    _decode_groups_vectorized(data, out)


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
            _decode_into(data[i : i + rows].reshape(-1, BYTES_PER_GROUP), out[i : i + rows].view(-1, GROUP_SIZE))
        else:  # a padded last group: decode, then drop the padding
            part = PackedHiF4(data[i : i + rows], (min(rows, out_f - i), in_f), 1, dtype)
            out[i : i + rows] = unpack_rows(part, 0, part.shape[0])
    return out


# --------------------------------------------------------------------------- the layer

class PackedHiF4Linear(nn.Module):
    """A W4A4 HiF4 Linear whose weight is stored packed (4.5 bits per value).

    Buffers: `weight_hif4` uint8 (out, ceil(in/64), 36) = pack(rot(W / m)),
    `mask` fp32 (in,), `bias` (out,) or None. The forward expands the weight to
    float32 and runs `linear.w4a4_linear`, exactly like `linear.HiF4Linear`.
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
        self.register_buffer("weight_hif4", packed.data)
        self.register_buffer("mask", mask.detach().to(torch.float32))
        self.register_buffer("bias", None if bias is None else bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant: LayerQuant) -> PackedHiF4Linear:
        packed = pack_weight(linear.weight.detach(), quant.mask, quant.rotation)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, quant.mask, bias, quant.rotation)

    @property
    def packed(self) -> PackedHiF4:
        return PackedHiF4(self.weight_hif4, (self.out_features, self.in_features), 1, torch.float32)

    def expanded_weight(self, device: torch.device | None = None) -> Tensor:
        """The float32 weight Q(rot(W / m)) this layer multiplies with."""
        return expand_weight(self.packed, torch.float32, device)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.expanded_weight(x.device)
        return w4a4_linear(x, weight, self.bias, LayerQuant(self.mask, self.rotation))

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
