"""HiFloat4 (HiF4) W4A4 post-training quantization for Wan2.2 video transformers.

Plain PyTorch; never imports ComfyUI. The stable entry points:
  quantize_dequantize(x, dim=-1)       HiF4 fake quantization, bit-exact with the spec
  pack(x, dim=-1) / unpack(packed)     real 4.5-bit storage, bit-exact round trip
  quantize_(model, config)             W4A4 HiF4 in place; config: W4A4Config(load_state(path), ...)
                                       (the nodes' plan) or LayersConfig({layer: LayerQuant})
"""
from .format import quantize_dequantize
from .linear import HiF4Linear, LayerQuant, prepare_activation, prepare_weight
from .packing import PackedHiF4, pack, unpack, unpack_rows
from .plan import W4A4Config
from .quantize import LayersConfig, quantize_
from .spec import GROUP_SIZE
from .state import load_state
from .version import __version__

__all__ = [
    "GROUP_SIZE",
    "HiF4Linear",
    "LayerQuant",
    "LayersConfig",
    "PackedHiF4",
    "W4A4Config",
    "__version__",
    "load_state",
    "pack",
    "prepare_activation",
    "prepare_weight",
    "quantize_",
    "quantize_dequantize",
    "unpack",
    "unpack_rows",
]
