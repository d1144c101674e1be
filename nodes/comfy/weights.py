"""Model access: the Wan root of a ModelPatcher, its Linear ops and their weights as
real values, whatever form ComfyUI stores them in; the weight a patcher runs (its
LoRA and other weight patches merged); the plan for a MODEL.

ComfyUI facts relied on:
- Linear-like ops are nn.Linear subclasses in 0.3.64; for fp8_scaled files current
  releases use `MixedPrecisionOps.Linear`, a plain Module holding a `QuantizedTensor`
  (a tensor subclass overriding `dequantize`) and recording `quant_format`;
- stored forms: bf16/fp16/fp32, fp8, 0.3.64's `scale_weight` (undone by the layer's
  `convert_weight`), comfy_quant; formats HiF4 cannot start from exactly are refused,
  and so are ComfyUI-GGUF's quantized weights (its GGMLTensor: a plain tensor subclass
  holding the raw GGUF blocks as uint8, its `shape` the logical one, its type in
  `tensor_type`), which would otherwise read as garbage floats;
- clones share the model: a weight may hold another clone's patch, the original is in
  the shared `ModelPatcher.backup`; weight patches merge with comfy.lora.calculate_weight;
- casts: `comfy.ops.cast_bias_weight` (offloadable since 0.4, then released with
  `uncast_bias_weight` for async offload and Dynamic VRAM pins);
- object patches on `<layer>.forward` replace a layer's forward while a clone is loaded.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

import comfy.lora
import comfy.ops

from hifloat4 import plan as hplan
from hifloat4 import wan as hwan

ROOT = "diffusion_model."
PLUGIN_KEY = "hifloat4"  # the key our wrappers are registered under
HIF4_PATCH = "hifloat4"  # WeightAdapterBase.name of our weight patch (w4a4.HiF4WeightAdapter)
# Storage dtypes that hold every HiF4 value exactly (<= 6 significant bits), so a
# quantized weight can be patched in once; anything else is quantized in the forward.
EXACT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)
# comfy_quant formats whose weights dequantize to the model's real values with one
# per-tensor scale (what the fp8_scaled files hold); None: an unquantized layer.
SERVED_FORMATS = (None, "float8_e4m3fn", "float8_e5m2")
# Feature detection, once: ComfyUI >= 0.4 casts with offloadable=True and expects
# uncast_bias_weight after the last use (async offload, Dynamic VRAM pins).
OFFLOADABLE_CAST = hasattr(comfy.ops, "uncast_bias_weight")


def wan_root(model) -> nn.Module:
    """The Wan transformer of a ModelPatcher (comfy.ldm.wan.model.WanModel)."""
    return model.get_model_object("diffusion_model")


def weight_key(name: str) -> str:
    return f"{ROOT}{name}.weight"


def forward_key(name: str) -> str:
    return f"{ROOT}{name}.forward"


def is_quantized_tensor(t: Tensor) -> bool:
    """A tensor subclass that stores other units than it represents (ComfyUI's
    QuantizedTensor): it overrides `dequantize`."""
    return getattr(type(t), "dequantize", Tensor.dequantize) is not Tensor.dequantize


def gguf_type(weight: Tensor) -> str | None:
    """The GGUF quantization type (e.g. "Q4_K") of a ComfyUI-GGUF weight; None for other
    weights and for GGUF's F16/F32 tensors, which hold plain floats."""
    kind = getattr(weight, "tensor_type", None)
    if kind is None or weight.is_floating_point():
        return None
    return str(getattr(kind, "name", kind))


def source_format(module: nn.Module) -> str | None:
    """The comfy_quant format of a layer ("gguf_<type>" for ComfyUI-GGUF's quantized
    weights; None: plain weights or 0.3.64's scaled fp8)."""
    gguf = gguf_type(module.weight)
    if gguf is not None:
        return f"gguf_{gguf.lower()}"
    fmt = getattr(module, "quant_format", None)
    if fmt is None and is_quantized_tensor(module.weight):
        fmt = str(getattr(module.weight, "_layout_cls", None) or getattr(module, "layout_type", "quantized"))
        fmt = "float8_e4m3fn" if "FP8" in fmt and "MX" not in fmt else fmt
    return fmt


def _refuse_unserved_formats(found: Mapping[str, nn.Module]) -> None:
    formats: dict[str, list[str]] = {}
    for n, m in found.items():
        fmt = source_format(m)
        if fmt not in SERVED_FORMATS:
            formats.setdefault(fmt, []).append(n)
    if not formats:
        return
    fmt, names = next(iter(formats.items()))
    if fmt.startswith("gguf_"):
        raise ValueError(gguf_refusal(names[0], fmt[5:].upper()))
    if fmt.startswith("int8") and hasattr(comfy.ops, "linear_input_act"):
        why = ("Wan's ffn runs INT8 layers through comfy.ops.linear_input_act, ComfyUI's own INT8 kernel, which "
               "bypasses the layer's forward, so the ffn.2 activations could never be quantized or calibrated")
    else:
        why = ("its weights are already rounded to another low-precision format, so HiF4 would quantize a "
               "quantized weight instead of the model's real weights")
    raise ValueError(f"HiF4 cannot use this model: {len(names)} main layers (e.g. {names[0]}) are stored in "
                     f"ComfyUI's {fmt!r} quantized format ({why}). Load a bf16/fp16 or fp8_scaled copy of the "
                     f"model instead." + (f" Other formats found: {', '.join(map(str, list(formats)[1:]))}."
                                          if len(formats) > 1 else ""))


def gguf_refusal(layer: str, kind: str) -> str:
    """Why a GGUF model cannot be a HiF4 source, and where the file it came from is."""
    return (f"HiF4 cannot start from a GGUF model: its layers (e.g. {layer}) are stored as GGUF {kind}, weights that "
            "are already quantized. Quantizing them again to HiF4 would round rounded weights a second time, "
            "compounding both errors, and HiF4's channel masks are calibrated on the statistics of the unquantized "
            "weights. Load the original bf16/fp16 or fp8_scaled file with the core 'Load Diffusion Model' node "
            "instead: the Wan2.2 files are in Comfy-Org/Wan_2.2_ComfyUI_Repackaged on Hugging Face "
            "(split_files/diffusion_models/, e.g. wan2.2_t2v_high_noise_14B_fp16.safetensors or "
            "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors). A packed HiF4 file of it ('Save HiF4 Model') is "
            "about as small as a Q4 GGUF.")


def linear_modules(model, names) -> dict[str, nn.Module]:
    """The named Linear ops of a MODEL; refuses other layer classes and quantized
    formats HiF4 cannot start from."""
    modules = dict(wan_root(model).named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no layer {missing[0]} ({len(missing)} missing)")
    found = {n: modules[n] for n in names}
    odd = [f"{n} ({type(m).__name__})" for n, m in found.items()
           if not (hwan.is_linear(m) and isinstance(m, comfy.ops.CastWeightBiasOp))]
    if odd:
        raise TypeError("HiF4 needs ComfyUI's own Linear ops; unsupported layer class for "
                        f"{odd[0]} ({len(odd)} such layers). Load the model with the core "
                        "'Load Diffusion Model' node.")
    _refuse_unserved_formats(found)
    return found


def dequantize(module: nn.Module, weight: Tensor) -> Tensor:
    """Real-valued fp32 weight from stored units: a QuantizedTensor's `dequantize()`
    (comfy_quant), then the layer's own `convert_weight` (0.3.64 scaled fp8:
    * scale_weight; a no-op for plain tensors in current ComfyUI)."""
    if is_quantized_tensor(weight):
        weight = weight.dequantize()
    weight = weight.to(torch.float32)
    convert = getattr(module, "convert_weight", None)
    return convert(weight, inplace=False) if convert is not None else weight


def stored_tensor(model, key: str, current: Tensor) -> Tensor:
    """The unpatched stored tensor of a patcher key (`current`: the one the model holds
    now). Clones share the model, so it may currently hold another clone's patch;
    ComfyUI keeps the original in the shared `backup` (see ModelPatcher.get_key_patches)."""
    backup = model.backup.get(key)
    t = backup.weight if backup is not None else current
    # no detach() for a QuantizedTensor: it cannot re-wrap an inference-mode tensor
    return t if is_quantized_tensor(t) else t.detach()


def original_weight(model, name: str, module: nn.Module, columns: int | None = None) -> Tensor:
    """The unpatched weight (optionally its first `columns` inputs) dequantized to a
    fresh fp32 tensor on its current device."""
    weight = stored_tensor(model, weight_key(name), module.weight)
    gguf = gguf_type(weight)
    if gguf is not None:  # raw GGUF blocks: no real values to read
        raise ValueError(gguf_refusal(name, gguf))
    with torch.no_grad():
        if is_quantized_tensor(weight):
            weight = dequantize(module, weight)  # slicing a QuantizedTensor would slice its raw units
        elif weight.dtype == torch.float32:
            weight = weight.clone()
        return dequantize(module, weight[:, :columns] if columns is not None else weight)


def is_hif4_patch(patch) -> bool:
    """A ModelPatcher.patches entry (strength, adapter, ...) holding our weight patch."""
    return getattr(patch[1], "name", None) == HIF4_PATCH


def other_patches(model, key: str) -> list:
    """This patcher's weight patches of `key` other than our HiF4 patch (LoRA etc.)."""
    return [p for p in model.patches.get(key, []) if not is_hif4_patch(p)]


def with_other_patches(model, key: str, weight: Tensor) -> Tensor:
    """`weight` (fp32, real values) with other_patches merged, as
    ModelPatcher.patch_weight_to_device computes them; `weight` itself if none."""
    patches = other_patches(model, key)
    return comfy.lora.calculate_weight(patches, weight, key) if patches else weight


def effective_weight(model, name: str, module: nn.Module) -> Tensor:
    """The fp32 weight this patcher runs before quantization: original + its own
    weight patches (LoRA etc.)."""
    return with_other_patches(model, weight_key(name), original_weight(model, name, module))


def model_fingerprint(model) -> dict:
    """hifloat4.wan.fingerprint of the original (unpatched, dequantized) weights."""
    root = wan_root(model)
    modules = dict(root.named_modules())
    return hwan.fingerprint(root, get_weight=lambda n: original_weight(model, n, modules[n], hwan.PROBE_VALUES)
                            if n in modules else None)


def plan_for(model, config: hplan.W4A4Config) -> hplan.Plan:
    """hifloat4.plan.make_plan on this MODEL's real-valued weights: the expert (another
    model type is refused even for a named expert; other weights of the same type warn),
    the W4A4 layers and the layers kept in high precision."""
    return hplan.make_plan(config, model_fingerprint(model))


def weight_mode(module: nn.Module) -> str:
    """"patch": the quantized weight is stored once through a weight patch (exact);
    "forward": the storage cannot hold HiF4 values (fp8, scaled fp8, comfy_quant), so
    the forward quantizes the dequantized weight (cached for a sampling run)."""
    w = module.weight
    if (w.dtype in EXACT_STORAGE and not is_quantized_tensor(w) and not hasattr(module, "scale_weight")
            and source_format(module) is None):
        return "patch"
    return "forward"


@contextlib.contextmanager
def cast_weight_bias(module: nn.Module, device, dtype, bias_dtype) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(weight, bias) of a ComfyUI op on `device` as its own forward gets them:
    offloading, Dynamic VRAM streaming and lowvram weight functions (LoRA) applied.
    Current ComfyUI wants offloadable casts released after use."""
    if OFFLOADABLE_CAST:
        weight, bias, stream = comfy.ops.cast_bias_weight(module, None, dtype=dtype, device=device,
                                                          bias_dtype=bias_dtype, offloadable=True)
        try:
            yield weight, bias
        finally:
            comfy.ops.uncast_bias_weight(module, weight, bias, stream)
    else:
        yield comfy.ops.cast_bias_weight(module, None, dtype=dtype, device=device, bias_dtype=bias_dtype)


class LayerCall:
    """Base of our object patches on `<layer>.forward`: a plain callable (not an
    nn.Module, so ComfyUI and torch never see a submodule) that holds its Linear by
    weakref and runs the layer class's own forward."""

    def __init__(self, module: nn.Module):
        self._module = weakref.ref(module)

    def module(self) -> nn.Module:
        m = self._module()
        if m is None:
            raise RuntimeError("the layer this HiF4 patch belongs to no longer exists")
        return m

    def run_original(self, x, *args, **kwargs):
        m = self.module()
        return type(m).forward(m, x, *args, **kwargs)
