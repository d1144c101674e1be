"""The Apply node's HiF4 W4A4 on an unpacked MODEL: a clone whose quantized Linears
compute Q(x m) Q(W / m)^T + b, with the bits of hifloat4.linear.

ComfyUI facts relied on:
- a weight adapter patch (WeightAdapterBase) is cached by ComfyUI on load and applied
  after the LoRA patches before it; Dynamic VRAM rebuilds every adapter as
  `type(v)(v.loaded_keys, prefetch_prepared_value(v.weights, ...))`, so ours keeps all
  its state in `weights` and takes `(loaded_keys, weights)`;
- an object patch on `<layer>.forward` (a plain callable, weights.LayerCall) quantizes
  the activation and runs the layer class's own forward; weights that cannot hold
  HiF4 values (fp8) are quantized there instead, once per sampling run (cache);
- PREPARE_SAMPLING and OUTER_SAMPLE wrappers (their arguments differ between versions
  and pass through) order our patch after any added later and release the caches.
"""
from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Mapping

import torch
from torch import Tensor, nn

import comfy.patcher_extension
from comfy.weight_adapter import WeightAdapterBase

from hifloat4 import linear as hlinear

from .packed_loader import is_packed_model
from .weights import (HIF4_PATCH, PLUGIN_KEY, ROOT, LayerCall, cast_weight_bias, dequantize, forward_key,
                      is_hif4_patch, linear_modules, weight_key, weight_mode)

log = logging.getLogger("hifloat4")


class HiF4WeightAdapter(WeightAdapterBase):
    """Weight patch returning Q(rot(W / m)) computed in fp32 from the weight it is
    given (already including the LoRA patches ordered before it).

    All state lives in `weights` = [mask, rotation or None] and the constructor is
    `(loaded_keys, weights)`: Dynamic VRAM rebuilds adapters that way, with the
    tensors of `weights` moved into its own buffers."""
    name = HIF4_PATCH

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = set(loaded_keys)
        self.weights = list(weights)

    @classmethod
    def for_layer(cls, mask: Tensor, rotation=None) -> "HiF4WeightAdapter":
        return cls(set(), [mask.detach().to("cpu", torch.float32), rotation])

    @property
    def mask(self) -> Tensor:
        return self.weights[0]

    @property
    def rotation(self):
        return self.weights[1]

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if offset is not None:
            raise ValueError(f"{key}: a HiF4 weight patch cannot apply to a slice of the weight")
        with torch.no_grad():  # ComfyUI's parameters may require grad; quantization has none
            return hlinear.prepare_weight(weight.detach(), self.mask.to(weight.device), self.rotation,
                                          dtype=weight.dtype)


class QuantizedForward(LayerCall):
    """`<layer>.forward` of a quantized Linear: y = Q(x m) Q(W / m)^T + b.

    "forward" mode (fp8 storage): Q(W/m) is computed from the dequantized weight on
    the first call of a sampling run and kept in bf16 (exact for HiF4 values) on the
    compute device until the run ends, when the layer's weight already lives there
    and no lowvram weight function (LoRA) is attached. Offloaded or streamed layers
    (lowvram, Dynamic VRAM) are quantized at every call: their weight arrives anew
    each time, and a resident copy would take the memory ComfyUI freed."""

    def __init__(self, module: nn.Module, mask: Tensor, rotation, mode: str):
        super().__init__(module)
        self.mask = mask.detach().to("cpu", torch.float32)
        self.rotation = rotation
        self.mode = mode
        self._on_device: dict[torch.device, Tensor] = {}
        self._cache: tuple | None = None  # (stored weight ref, device, Q(W/m) bf16)

    def mask_on(self, device) -> Tensor:
        m = self._on_device.get(device)
        if m is None:
            m = self._on_device[device] = self.mask.to(device)
        return m

    def release(self) -> None:
        self._cache = None

    def _cacheable(self, m: nn.Module, device) -> bool:
        return (len(m.weight_function) == 0 and getattr(m, "weight_lowvram_function", None) is None
                and m.weight.device == device and not hasattr(m, "_v"))

    def _weight(self, m: nn.Module, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """(Q(W / m) in bf16, bias in x.dtype) on x's device, through core's cast."""
        cacheable = self._cacheable(m, x.device)
        hit = self._cache
        if cacheable and hit is not None and hit[0]() is m.weight and hit[1] == x.device:
            bias = None if m.bias is None else m.bias.detach().to(x.device, x.dtype)
            for fn in m.bias_function if bias is not None else ():
                bias = fn(bias)
            return hit[2], bias
        with cast_weight_bias(m, x.device, torch.float32, x.dtype) as (weight, bias), torch.no_grad():
            wq = hlinear.prepare_weight(dequantize(m, weight), mask, self.rotation, dtype=torch.bfloat16)  # exact
        if cacheable:
            self._cache = (weakref.ref(m.weight), x.device, wq)
        return wq, bias

    def __call__(self, x, *args, **kwargs):
        mask = self.mask_on(x.device)
        with torch.no_grad():  # inference only: HiF4 rounding has no gradient
            if self.mode == "patch":  # weight already Q(W / m) through the weight patch
                xq = hlinear.prepare_activation(x.detach(), mask, self.rotation)
            else:
                wq, bias = self._weight(self.module(), x, mask)
                return hlinear.w4a4_linear(x.detach(), wq, bias, hlinear.LayerQuant(mask, self.rotation))
        return self.run_original(xq, *args, **kwargs)


def _quantized_forwards(model) -> list[QuantizedForward]:
    return [p for p in model.object_patches.values() if isinstance(p, QuantizedForward)]


def is_quantized(model) -> bool:
    """Whether this MODEL went through 'Apply HiFloat4 W4A4'."""
    return bool(_quantized_forwards(model))


def require_unquantized(model, for_what: str) -> None:
    """Refuse a MODEL that already runs HiF4 W4A4 (Apply's output or a packed
    checkpoint): `for_what` (a node, quoted) needs the model those were made from."""
    if is_packed_model(model):
        raise ValueError(f"{for_what} needs an unquantized MODEL, but this one is already a packed HiF4 model (from "
                         "a packed HiF4 checkpoint, 'Load HiF4 Diffusion Model'), which runs W4A4 as it is: connect "
                         f"it to the sampler directly, and give {for_what} the original model ('Load Diffusion "
                         "Model').")
    if is_quantized(model):
        raise ValueError(f"{for_what} needs an unquantized MODEL, but this one already went through 'Apply "
                         "HiFloat4 W4A4': connect the model from before 'Apply HiFloat4 W4A4'.")


def apply_w4a4(model, layers: Mapping[str, hlinear.LayerQuant]):
    """A clone of `model` whose listed layers run HiF4 W4A4 (mask and rotation per layer;
    hifloat4.plan decides them)."""
    require_unquantized(model, "'Apply HiFloat4 W4A4'")
    modules = linear_modules(model, list(layers))
    clone = model.clone()
    weight_patches = {}
    modes = {"patch": 0, "forward": 0}
    forwards = []
    for name, quant in layers.items():
        m, mask, rot = modules[name], quant.mask, quant.rotation
        if mask.shape != (m.in_features,):
            raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, the layer has {m.in_features} inputs")
        mode = weight_mode(m)
        modes[mode] += 1
        if mode == "patch":
            weight_patches[weight_key(name)] = HiF4WeightAdapter.for_layer(mask, rot)
        forwards.append(QuantizedForward(m, mask, rot, mode))
        clone.add_object_patch(forward_key(name), forwards[-1])
    accepted = set(clone.add_patches(weight_patches))
    if accepted != set(weight_patches):
        raise RuntimeError(f"ComfyUI refused weight patches for {sorted(set(weight_patches) - accepted)[:3]}")
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, PLUGIN_KEY,
                               quantize_last_wrapper)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, PLUGIN_KEY,
                               _ReleaseCaches([f for f in forwards if f.mode == "forward"]))
    log.info("HiF4 W4A4 on %d layers (%d weight-patched, %d quantized in the forward)",
             len(layers), modes["patch"], modes["forward"])
    return clone


class _ReleaseCaches:
    """OUTER_SAMPLE wrapper: the quantized fp8 weights live for one sampling run."""

    def __init__(self, forwards: list[QuantizedForward]):
        self.forwards = forwards

    def __call__(self, executor, *args, **kwargs):
        try:
            return executor(*args, **kwargs)
        finally:
            for f in self.forwards:
                f.release()


def order_quantization_last(model) -> bool:
    """Move our weight patch behind every other patch of its key (a LoRA added after
    the Apply node must be merged before quantizing). Returns whether anything moved;
    refuses weight hooks (they are applied on top of the already patched weight)."""
    quantized = set()
    moved = False
    for key, plist in model.patches.items():
        ours = [p for p in plist if is_hif4_patch(p)]
        if not ours:
            continue
        quantized.add(key)
        rest = [p for p in plist if not is_hif4_patch(p)]
        if plist != rest + ours:
            model.patches[key] = rest + ours
            moved = True
    quantized |= {weight_key(k[len(ROOT):-len(".forward")]) for k, p in model.object_patches.items()
                  if isinstance(p, QuantizedForward)}
    for hook_patches in model.hook_patches.values():
        clash = sorted(quantized & set(hook_patches))
        if clash:
            raise ValueError(f"a hook LoRA (conditioning/hook nodes) patches HiF4-quantized layers "
                             f"(e.g. {clash[0]}); hooks are applied after quantization. Load the LoRA "
                             "with 'LoraLoaderModelOnly' instead.")
    if moved:
        model.patches_uuid = uuid.uuid4()  # weights patched in the old order must be redone
    return moved


def quantize_last_wrapper(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper: runs before ComfyUI loads (and patches) the model.
    Everything after `conds` (model_options; force_full_load/force_offload since
    ComfyUI 0.6) is passed through untouched."""
    if order_quantization_last(model):
        log.info("HiF4: moved LoRA/weight patches added after 'Apply HiFloat4 W4A4' before the quantization")
    return executor(model, noise_shape, conds, *args, **kwargs)
