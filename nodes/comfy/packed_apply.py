"""'Apply HiFloat4 W4A4' keeping weights packed: the MODEL it returns is a packed HiF4
model built in memory from the input, so the sampler loads 4.5-bit codes (0.56 bytes
per main-layer weight) instead of the source's bf16 or fp8 weights, and its main layers
run from the codes (decoded per call, or the int8 GEMM).

How: hifloat4.export.pack_in_memory packs the input's real weights (the source format
dequantized, LoRAs loaded before Apply merged) exactly as 'Save HiF4 Model' would write
them, on the GPU when there is one, and packed_loader builds the MODEL from them as
'Load HiF4 Diffusion Model' does; then what the input clone carries besides its weights
moves over: model options (ModelSamplingSD3's model_sampling is an object patch),
wrappers, callbacks, attachments, injections, weight patches of the layers left in high
precision. The input MODEL is unchanged and keeps its weights where ComfyUI keeps them
(system RAM, until ComfyUI unloads it). What cannot move over is refused with a message:
patches or hooks that would change a packed layer after its quantization.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils

from hifloat4 import export as hexport
from hifloat4 import plan as hplan

from .export import ComfyModelSource
from .packed_loader import model_from_checkpoint
from .progress import check_interrupt
from .weights import ROOT, weight_key

log = logging.getLogger("hifloat4")

# Patcher attributes that hold what a clone carries besides its weights (ModelPatcher.clone
# copies each; present in 0.3.64 and current ComfyUI, feature-detected all the same).
_CARRIED = ("model_options", "wrappers", "callbacks", "attachments", "additional_models", "injections",
            "hook_mode", "forced_hooks")
OBJECT_PATCHES_REFUSED = ("'Apply HiFloat4 W4A4' with packed weights rebuilds the model's layers, and another node "
                          "has patched layers of this MODEL ({keys}); set weights to 'unpacked', or move that node "
                          "after Apply.")


def compute_device() -> torch.device:
    """The device ComfyUI samples on."""
    return comfy.model_management.get_torch_device()


def _carry_over(source, packed, packed_keys: set[str]) -> None:
    """Move what the input clone carries besides its weights onto the packed MODEL."""
    clone = source.clone()  # this ComfyUI's own copies of every attribute
    foreign = sorted(k for k in clone.object_patches if k.startswith(ROOT))
    hooked = sorted(k for hp in clone.hook_patches.values() for k in hp if k in packed_keys)
    wrapped = sorted(k for k in getattr(clone, "weight_wrapper_patches", {}) if k in packed_keys)
    if foreign or hooked or wrapped:
        raise ValueError(OBJECT_PATCHES_REFUSED.format(keys=", ".join((foreign + hooked + wrapped)[:3])))
    guard = {k: dict(v) for k, v in packed.wrappers.items()}
    for attr in _CARRIED:
        if hasattr(clone, attr):
            setattr(packed, attr, getattr(clone, attr))
    for kind, keyed in guard.items():  # the packed model's own guard stays
        for key, fns in keyed.items():
            have = packed.wrappers.setdefault(kind, {}).setdefault(key, [])
            have.extend(f for f in list(fns) if f not in have)
    for key, obj in clone.object_patches.items():
        packed.add_object_patch(key, obj)
    packed.patches.update((k, v) for k, v in clone.patches.items() if k not in packed_keys)  # packed: merged already
    packed.hook_patches = clone.hook_patches  # the clone's own copy


def apply_packed(model, config: hplan.W4A4Config, compute: str, lora: str = "bypass"):
    """A packed HiF4 MODEL of `model` (unquantized, LoRAs merged) as `config` plans it;
    LoRAs loaded after it act on its packed layers as `lora` says."""
    bar = comfy.utils.ProgressBar(1)
    device = compute_device()
    ckpt = hexport.pack_in_memory(ComfyModelSource(model), config, device if device.type == "cuda" else None,
                                  progress=lambda done, total: bar.update_absolute(done, total),
                                  cancel=check_interrupt)
    packed = model_from_checkpoint(ckpt, compute, lora)
    _carry_over(model, packed, {weight_key(n) for n in ckpt.layers})
    log.info("HiF4 W4A4 on %d layers, weights packed (%.2f GB of codes), compute %s", len(ckpt.layers),
             sum(p.weight.nbytes for p in ckpt.layers.values()) / 1e9, compute)
    return packed
