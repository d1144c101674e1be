"""A ComfyUI MODEL from a packed HiF4 checkpoint, and the guard that keeps anything
from changing its packed layers.

The checkpoint is validated by hifloat4.checkpoint; ComfyUI's
`comfy.sd.load_diffusion_model_state_dict` builds the model with packed_ops (bf16
main weights never exist) and only logs missing keys, so every tensor of the built
model is checked to come from the file. LoRA policy: a PREPARE_SAMPLING wrapper
(arguments after `conds` differ between versions and pass through) refuses weight
patches, weight hooks, weight wrappers and object patches on packed layers; patches
on the other (high-precision) layers work as usual.
"""
from __future__ import annotations

import logging
import os

import comfy.patcher_extension
import comfy.sd

from hifloat4 import checkpoint as hckpt

from hifloat4 import lora as hlora

from .packed_lora import lora_routes
from .packed_ops import HOOKS_REFUSED, HiF4PackedOps, placeholder
from .weights import ROOT, wan_root, weight_key

log = logging.getLogger("hifloat4")

PACKED_KEY = "hifloat4_packed"
REQUANT_REFUSED = ("this MODEL is a packed HiF4 model (loaded with 'Load HiF4 Diffusion Model'); it is already "
                   "W4A4-quantized and cannot be calibrated or quantized again. Use the original model for "
                   "'Calibrate Wan2.2 HiF4' / 'Apply HiFloat4 W4A4'.")


def packed_modules(model) -> dict:
    """Name (relative to the Wan root) -> module of every packed layer of a MODEL."""
    return {n: m for n, m in wan_root(model).named_modules() if getattr(m, "hif4", None) is not None}


def packed_layer_names(model) -> list[str]:
    """Names of the packed layers of a MODEL; [] if none."""
    return list(packed_modules(model))


def is_packed_model(model) -> bool:
    return bool(packed_layer_names(model))


def check_packed_model(model) -> None:
    """Raise ValueError if anything but weight patches (LoRAs) would change a packed
    layer's weight or forward."""
    names = packed_layer_names(model)
    weights = {weight_key(n) for n in names}
    forwards = {f"{ROOT}{n}.": n for n in names}
    patched = sorted(k for hp in model.hook_patches.values() for k in hp if k in weights)
    patched += sorted(k for k in weights if getattr(model, "weight_wrapper_patches", {}).get(k))
    if patched:
        raise ValueError(f"{HOOKS_REFUSED}\nPatched packed layers: {', '.join(p[len(ROOT):-7] for p in patched[:3])}"
                         + (f" and {len(patched) - 3} more" if len(patched) > 3 else ""))
    touched = sorted(k for k in model.object_patches if k.rpartition(".")[0] + "." in forwards)
    if touched:
        raise ValueError(f"{REQUANT_REFUSED}\n(object patches on {touched[0][len(ROOT):]}"
                         + (f" and {len(touched) - 1} more)" if len(touched) > 1 else ")"))


def guard_wrapper(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper of packed models: runs before ComfyUI loads/patches them
    (the arguments after `conds` differ between ComfyUI versions and pass through)."""
    check_packed_model(model)
    with lora_routes(model, {weight_key(n): m for n, m in packed_modules(model).items()}):
        return executor(model, noise_shape, conds, *args, **kwargs)


def load_packed_model(path: str, compute: str = "auto", lora: str = "bypass"):
    """A ComfyUI MODEL from a packed HiF4 checkpoint (validated; bf16 main weights never built)."""
    return model_from_checkpoint(hckpt.load_hif4_checkpoint(path), compute, lora)


def model_from_checkpoint(ckpt: hckpt.HiF4Checkpoint, compute: str = "auto", lora: str = "bypass"):
    """A ComfyUI MODEL from a HiF4Checkpoint (a file's, or one packed in memory by the Apply
    node), its packed layers multiplying as `compute` says (hifloat4.linear.resolve_compute)
    and taking LoRAs as `lora` says (hifloat4.lora.LORA_MODES)."""
    hlora.check_mode(lora)
    name = os.path.basename(ckpt.path)
    sd = dict(ckpt.tensors)
    for layer_name, layer in ckpt.layers.items():
        sd[hckpt.codes_key(layer_name)] = placeholder(layer, ckpt.weight_dtype)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": HiF4PackedOps})
    if model is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of {name}")
    installed = set(packed_layer_names(model))
    missing = [n for n in ckpt.layers if n not in installed]
    if missing:
        raise RuntimeError(f"{len(missing)} packed layers were not loaded (e.g. {missing[0]}): this ComfyUI built "
                           "the Wan model with other layer names")
    provided = set(ckpt.tensors) | {k for n in ckpt.layers for k in (hckpt.codes_key(n), hckpt.mask_key(n))}
    absent = sorted(set(wan_root(model).state_dict()) - provided)
    if absent:  # ComfyUI only logs missing keys; those tensors would hold uninitialized memory
        raise RuntimeError(f"{name} lacks {len(absent)} tensors of this Wan model, e.g. {absent[0]}")
    for m in wan_root(model).modules():  # this MODEL's own modules, not yet shared with any clone
        if getattr(m, "hif4", None) is not None:
            m.hif4.compute = compute
            m.hif4.lora = lora
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, PACKED_KEY, guard_wrapper)
    log.info("HiF4: loaded %s, expert %s: %d packed layers (%.1f MB codes + masks), compute %s, lora %s", name,
             ckpt.expert, len(ckpt.layers),
             sum(p.weight.nbytes + 4 * p.hif4_mask.numel() for p in ckpt.layers.values()) / 2**20, compute, lora)
    return model
