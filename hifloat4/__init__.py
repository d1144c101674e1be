"""HiFloat4 (HiF4) W4A4 post-training quantization for Wan2.2 video transformers.

Plain PyTorch; never imports ComfyUI. The stable entry points:
  quantize_dequantize(x, dim=-1)       HiF4 fake quantization, bit-exact with the spec
  pack(x, dim=-1) / unpack(packed)     real 4.5-bit storage, bit-exact round trip
  quantize_(model, layers)             swap named nn.Linear layers for W4A4 HiF4Linear
"""
from .format import GROUP_SIZE, quantize_dequantize
from .linear import HiF4Linear, LayerQuant, prepare_activation, prepare_weight, quantize_
from .packing import PackedHiF4, pack, unpack, unpack_rows

__version__ = "0.1.0"

__all__ = [
    "GROUP_SIZE",
    "HiF4Linear",
    "LayerQuant",
    "PackedHiF4",
    "__version__",
    "pack",
    "prepare_activation",
    "prepare_weight",
    "quantize_",
    "quantize_dequantize",
    "unpack",
    "unpack_rows",
]
