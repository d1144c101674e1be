"""The Linear ops of packed HiF4 models: ComfyUI's custom-operations-at-load pattern
(`model_options={"custom_operations": ops}`, as ComfyUI-GGUF does), one ops class for
every load. Which Linear is packed is decided at load, from what the state dict
holds: a packed layer's `<layer>.weight` entry is a placeholder (a meta tensor of the
logical shape and dtype, for model detection, parameter counting and dtype
selection) carrying the layer's hifloat4.checkpoint.PackedLayer.

A packed layer keeps the uint8 codes (planar rows, hifloat4.layout.to_planar: the
file's bytes in the order GPU kernels read) as its `weight` parameter and the mask as
its `hif4_mask` buffer (the checkpoint's names), so ComfyUI moves, offloads, streams
(Dynamic VRAM) and sizes them like any weight; the forward gets them through core's
cast (weights.cast_weight_bias) and, as the layer's `compute` choice resolves
(hifloat4.linear.resolve_compute), decodes the weight on the input's device for
hifloat4.linear.w4a4_linear (the Apply node's bits), or runs the int8 GEMM on the codes.
ComfyUI hands the state dict's tensor objects to `_load_from_state_dict` unchanged
(0.3.64 and current; Wan's process_unet_state_dict renames nothing).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import comfy.ops

from hifloat4 import checkpoint as hckpt
from hifloat4 import linear as hlinear
from hifloat4 import lora as hlora
from hifloat4 import packed_linear as hpacked
from hifloat4.layout import to_planar

from . import packed_lora
from .weights import EXACT_STORAGE, cast_weight_bias

HOOKS_REFUSED = ("weight hooks and weight wrappers on a packed HiF4 model are not supported: its main Linear weights "
                 "are stored as 4.5-bit HiF4 codes. LoRAs through LoraLoaderModelOnly work (lora: bypass or merge); "
                 "for hooks use the unpacked model with 'Apply HiFloat4 W4A4' (weights: unpacked).")
_PATCH_METHODS = ("convert_weight", "set_weight")  # what ComfyUI's get_key_weight looks up (packed layers only)
_CARRIED = "hif4_packed_layer"  # the placeholder's attribute holding its PackedLayer


def placeholder(layer: hckpt.PackedLayer, dtype: torch.dtype) -> Tensor:
    """The state-dict entry of a packed layer's weight: what ComfyUI reads before
    building the model (shape, dtype), carrying what the Linear loads instead."""
    t = torch.empty(layer.shape, dtype=dtype, device="meta")
    setattr(t, _CARRIED, layer)
    return t


class PackedWeight:
    """What a packed Linear needs besides its tensors (plain attributes, no tensors)."""

    def __init__(self, shape: tuple[int, int], rotation, storage: torch.dtype | None, compute: str = "auto",
                 lora: str = "bypass"):
        self.shape = shape
        self.rotation = rotation
        self.storage = storage  # the dtype the fake-quant path would store Q(W/m) in
        self.compute = compute  # hifloat4.linear.resolve_compute's choice, set by the loader
        self.lora = lora  # how weight patches apply (hifloat4.lora.LORA_MODES), set by the loader
        # the low-rank terms this layer adds in its forward (bypass); None: patches merge.
        # Set by packed_lora.lora_routes each time sampling is prepared.
        self.bypass: list[hlora.LowRank] | None = None


class HiF4PackedOps(comfy.ops.manual_cast):
    """comfy.ops.manual_cast with a Linear that loads packed when its state dict
    entry is a placeholder, and as an ordinary Linear otherwise."""

    class Linear(comfy.ops.manual_cast.Linear):
        hif4: PackedWeight | None = None  # None: an ordinary (high-precision) Linear

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
            # Allocate nothing yet: which Linear is packed is only known at load.
            nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self._hif4_factory = {"device": device, "dtype": dtype}
            self._hif4_has_bias = bool(bias)
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            f = self._hif4_factory
            shape = (self.out_features, self.in_features)
            layer = getattr(state_dict.get(prefix + "weight"), _CARRIED, None)
            if layer is None:  # as nn.Linear would have allocated, then the regular copy
                self.weight = nn.Parameter(torch.empty(shape, **f))
                if self._hif4_has_bias:
                    self.bias = nn.Parameter(torch.empty(self.out_features, **f))
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                     unexpected_keys, error_msgs)
            if tuple(layer.shape) != shape:
                error_msgs.append(f"{prefix}weight: packed HiF4 layer of shape {tuple(layer.shape)} does not fit "
                                  f"a Linear {shape}")
                return
            storage = f["dtype"] if f["dtype"] in EXACT_STORAGE else torch.float32 if f["dtype"] is None else None
            self.weight = nn.Parameter(to_planar(layer.weight.data), requires_grad=False)
            self.register_buffer(hlinear.MASK_NAME, layer.hif4_mask.to(torch.float32))
            self.hif4 = PackedWeight(shape, layer.rotation, storage)
            if self._hif4_has_bias:
                bias = state_dict.get(prefix + "bias")
                if bias is None:  # an error, not a missing key: the bias would silently be dropped
                    error_msgs.append(f"{prefix}bias: missing for packed HiF4 layer {prefix[:-1]}")
                else:
                    self.bias = nn.Parameter(torch.empty(self.out_features, **f))
                    with torch.no_grad():
                        self.bias.copy_(bias)

        def __getattr__(self, name):
            # ComfyUI merges weight patches through a layer's convert_weight/set_weight when it
            # has them (model_patcher.get_key_weight): packed layers have them, others not.
            if name in _PATCH_METHODS and self.__dict__.get("hif4") is not None:
                return getattr(packed_lora, name).__get__(self)
            return super().__getattr__(name)

        def forward(self, x, *args, **kwargs):
            if self.hif4 is None:
                return super().forward(x, *args, **kwargs)
            p = self.hif4
            quant = hlinear.LayerQuant(self.hif4_mask.to(x.device), p.rotation)
            with torch.no_grad():  # inference only: HiF4 rounding has no gradient
                with packed_lora.held_weight_functions(self) as (patches, key):
                    with cast_weight_bias(self, x.device, self.weight.dtype, x.dtype) as (codes, bias):
                        codes = codes.detach()
                        if patches and p.bypass is None:  # lowvram / Dynamic VRAM: merged per call
                            codes = packed_lora.merged_codes(self, codes, patches, key)
                        y = self._w4a4(x.detach(), codes, bias, quant)
                low_rank = hlora.lowrank_term(x.detach(), p.bypass or ())
                return y if low_rank is None else y.add_(low_rank)

        def _w4a4(self, x, codes, bias, quant):
            p = self.hif4
            if hlinear.resolve_compute(p.compute, x.device, p.rotation) == "int8":
                return hlinear.w4a4_linear_packed(x, codes, p.shape[1], bias, quant, "int8")
            # stored as the Apply node would store Q(W/m), then cast as ComfyUI casts weights
            weight = hpacked.decode_weight(codes, p.shape[1], p.storage or x.dtype, x.device)
            return hlinear.w4a4_linear(x, weight.to(x.dtype), bias, quant)
