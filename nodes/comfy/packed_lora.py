"""LoRA on packed HiF4 layers in ComfyUI: each packed layer takes its weight patches
(LoraLoaderModelOnly's, keyed `diffusion_model.<layer>.weight` since the codes are the
layer's `weight`) one of two ways, as the layer's `lora` choice says (hifloat4.lora has
the math):

- merge: core's own route for quantized weights. The layer's `convert_weight` turns the
  codes (cast to a float dtype by ComfyUI) into the real weight, core adds the patches
  (comfy.lora.calculate_weight, any adapter type), and `set_weight` packs the result with
  the layer's mask and rotation. A full load patches once and ComfyUI restores the codes
  from its backup on unpatch. Where ComfyUI leaves the patch to the forward (lowvram's
  LowVramPatch in `weight_function`, Dynamic VRAM's `weight_lowvram_function`), the
  forward merges per call (packed_ops), because core would apply it to the codes.
- bypass (default): the PREPARE_SAMPLING guard (packed_loader) reads each layer's patches
  before ComfyUI loads the model; plain LoRAs become the layer's low-rank terms, added in
  the forward, and their key is held out of `ModelPatcher.patches` while ComfyUI loads,
  so nothing merges them into the codes and no dense delta is ever built. A layer with
  any other patch (LoHa, LoKr, full diff, DoRA, an offset or a strength_model) merges
  all of its patches instead; one log line names those layers.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

import comfy.lora
import comfy.weight_adapter

from hifloat4 import lora as hlora
from hifloat4.packed_linear import planar_weight

log = logging.getLogger("hifloat4")

WEIGHT_FUNCTIONS_REFUSED = ("a weight function other than ComfyUI's LoRA patch ({kind}) is set on a packed HiF4 "
                            "layer: packed layers hold 4.5-bit HiF4 codes that such functions cannot change. Use "
                            "the unpacked model with 'Apply HiFloat4 W4A4' (weights: unpacked).")


def lowrank_terms(patches) -> list[hlora.LowRank] | None:
    """The low-rank terms of a layer's ModelPatcher.patches entries, or None when any entry
    is not a plain LoRA (those are merged)."""
    terms = []
    for strength, adapter, strength_model, offset, function in (p[:5] for p in patches):
        if not isinstance(adapter, comfy.weight_adapter.LoRAAdapter) or strength_model != 1.0 \
                or offset is not None or function is not None:
            return None
        up, down, alpha, mid, dora_scale, reshape = adapter.weights[:6]
        if mid is not None or dora_scale is not None or reshape is not None or up.ndim != 2 or down.ndim != 2:
            return None
        scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        terms.append(hlora.LowRank(down, up, scale))
    return terms


@contextlib.contextmanager
def lora_routes(model, layers: Mapping[str, nn.Module]) -> Iterator[None]:
    """While ComfyUI prepares sampling: give every packed layer (weight key -> module) its
    bypass terms, or None where its patches merge, and hold the bypassed keys out of
    model.patches so that ComfyUI's load does not merge them."""
    held, merged = {}, []
    for key, m in layers.items():
        patches = model.patches.get(key) or []
        terms = lowrank_terms(patches) if m.hif4.lora == "bypass" else None
        m.hif4.bypass = terms
        if terms is None and m.hif4.lora == "bypass":
            merged.append(key)
        elif terms is not None and key in model.patches:
            held[key] = model.patches.pop(key)
    if merged:
        log.info("HiF4: %d packed layers have patches other than plain LoRAs (e.g. %s); they are merged into the "
                 "codes (dequantize, patch, re-quantize) instead of bypassed", len(merged), merged[0])
    try:
        yield
    finally:
        model.patches.update(held)


def convert_weight(module: nn.Module, weight: Tensor, inplace: bool = False, **kwargs) -> Tensor:
    """The real float32 weight of a packed layer's codes (ComfyUI hands them over cast to a
    float dtype, which holds every byte value exactly)."""
    p = module.hif4
    codes = weight if weight.dtype == torch.uint8 else weight.round().to(torch.uint8)
    return hlora.dequantize_packed(codes, p.shape[1], module.hif4_mask.to(weight.device), p.rotation)


def pack(module: nn.Module, weight: Tensor) -> Tensor:
    """Planar codes of a real weight with the layer's mask and rotation (Save HiF4 Model's packing)."""
    return planar_weight(weight, module.hif4_mask.to(weight.device), module.hif4.rotation)


def set_weight(module: nn.Module, weight: Tensor, inplace_update: bool = False, seed=None,
               return_weight: bool = False, **kwargs):
    """Pack a patched real weight with the layer's mask and rotation (Save HiF4 Model's
    packing) and store the codes, or return them. A bypassed layer keeps its codes: its
    patches are added in the forward."""
    codes = module.weight.to(weight.device) if module.hif4.bypass is not None else pack(module, weight)
    if return_weight:
        return codes
    if inplace_update:
        module.weight.data.copy_(codes)
    else:
        module.weight = nn.Parameter(codes, requires_grad=False)
    return None


def is_patch(f) -> bool:
    """ComfyUI's LowVramPatch (0.3.64 and current: `key` and `patches` attributes)."""
    return hasattr(f, "key") and isinstance(getattr(f, "patches", None), dict)


@contextlib.contextmanager
def held_weight_functions(module: nn.Module) -> Iterator[tuple[list, str | None]]:
    """(patches, key) ComfyUI left to a packed layer's forward (lowvram, Dynamic VRAM),
    held off the layer while its codes are cast (core would apply them to the codes);
    other weight functions are refused."""
    fns = module.weight_function  # restored as the same list object
    low = getattr(module, "weight_lowvram_function", None)
    odd = [f for f in fns if not is_patch(f)]
    if odd:
        raise RuntimeError(WEIGHT_FUNCTIONS_REFUSED.format(kind=type(odd[0]).__name__))
    held = fns + ([low] if low is not None else [])
    module.weight_function = []
    if low is not None:
        module.weight_lowvram_function = None
    try:
        yield [p for f in held for p in f.patches[f.key]], (held[0].key if held else None)
    finally:
        module.weight_function = fns
        if low is not None:
            module.weight_lowvram_function = low


def merged_codes(module: nn.Module, codes: Tensor, patches: list, key: str) -> Tensor:
    """Codes with `patches` merged (dequantize, comfy.lora.calculate_weight, pack): the
    forward's merge, where ComfyUI did not patch the layer at load."""
    return pack(module, comfy.lora.calculate_weight(patches, convert_weight(module, codes), key))
