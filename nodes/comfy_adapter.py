"""The one module that touches ComfyUI internals; the node modules only declare
their inputs and call it. Written against ComfyUI 0.3.64 and current releases
(0.33): where they differ, this module detects the feature, never a version.

What it adapts, and the ComfyUI facts each part relies on:
- folders: `calib_states` (registered here) and `diffusion_models` (packed files);
- model access: the Wan root of a ModelPatcher, its Linear-like ops (nn.Linear
  subclasses in 0.3.64; `MixedPrecisionOps.Linear`, a plain Module holding a
  `QuantizedTensor`, for fp8_scaled files in current releases), real-valued weights
  from any stored form (bf16/fp16/fp32, fp8, 0.3.64's `scale_weight`, comfy_quant),
  and a loud refusal of formats HiF4 cannot start from exactly;
- weights: a weight adapter patch per quantized Linear returning Q(W / m) (cached by
  ComfyUI on load, applied after LoRA patches). It keeps all its state in `weights`
  and takes `(loaded_keys, weights)`, because Dynamic VRAM rebuilds every adapter
  as `type(v)(v.loaded_keys, prefetch_prepared_value(v.weights, ...))`;
- activations: an object patch on `<layer>.forward`, a plain callable that computes
  Q(x * m) and then runs the layer class's own forward. Weights that cannot hold
  HiF4 values (fp8) are quantized in that forward, once per sampling run (cache);
- sampling wrappers (their arguments differ between versions: passed through);
- packed HiF4 layers: custom operations at load, weights cast like core's own ops
  (offloadable casts where this ComfyUI has them, so Dynamic VRAM and async
  offload work);
- calibration, sampling, progress and interruption.
Modules are shared between clones, so nothing here sets attributes on modules.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

import comfy.lora
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy.weight_adapter import WeightAdapterBase

from hifloat4 import calibrate as hcalibrate
from hifloat4 import checkpoint as hckpt
from hifloat4 import export as hexport
from hifloat4 import linear as hlinear
from hifloat4 import packed_linear as hpacked
from hifloat4 import plan as hplan
from hifloat4 import wan as hwan
from hifloat4.packing import PackedHiF4


log = logging.getLogger("hifloat4")

PLUGIN_KEY = "hifloat4"
PACKED_KEY = "hifloat4_packed"
STATES = "calib_states"
MODELS = "diffusion_models"
ROOT = "diffusion_model."
# Storage dtypes that hold every HiF4 value exactly (<= 6 significant bits), so a
# quantized weight can be patched in once; anything else is quantized in the forward.
EXACT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)
# comfy_quant formats whose weights dequantize to the model's real values with one
# per-tensor scale (what the fp8_scaled files hold); None: an unquantized layer.
SERVED_FORMATS = (None, "float8_e4m3fn", "float8_e5m2")
SCALE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".weight_scale_2", ".input_scale",
                  ".comfy_quant", ".pre_quant_scale")
# Feature detection, once: ComfyUI >= 0.4 casts with offloadable=True and expects
# uncast_bias_weight after the last use (async offload, Dynamic VRAM pins).
OFFLOADABLE_CAST = hasattr(comfy.ops, "uncast_bias_weight")

LORA_REFUSED = ("LoRA (or any weight patch) on a packed HiF4 model is not supported: its main Linear weights are "
                "stored as 4.5-bit HiF4 codes, and a LoRA has to be merged into the unquantized weight before "
                "quantization. Merge it at export instead: Load Diffusion Model -> LoraLoaderModelOnly -> "
                "Save HiF4 Model, then load that file (or use the unpacked model with 'Apply HiFloat4 W4A4').")
REQUANT_REFUSED = ("this MODEL is a packed HiF4 model (loaded with 'Load HiF4 Diffusion Model'); it is already "
                   "W4A4-quantized and cannot be calibrated or quantized again. Use the original model for "
                   "'Calibrate Wan2.2 HiF4' / 'Apply HiFloat4 W4A4'.")


# --------------------------------------------------------------------------- folders

def register_calib_states_folder(plugin_dir: str) -> None:
    """models/calib_states first (where the calibrate node saves), then any path a user
    configured (extra_model_paths.yaml), then the plugin's shipped calib_states/."""
    paths = [os.path.join(folder_paths.models_dir, STATES)]
    if STATES in folder_paths.folder_names_and_paths:
        paths += folder_paths.folder_names_and_paths[STATES][0]
    paths.append(os.path.join(plugin_dir, STATES))
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    folder_paths.folder_names_and_paths[STATES] = (unique, {".safetensors"})


def file_names(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def file_path(folder: str, name: str) -> str | None:
    return folder_paths.get_full_path(folder, name) if isinstance(name, str) else None


def folders(folder: str) -> list[str]:
    return folder_paths.get_folder_paths(folder)


def save_dir(folder: str) -> str:
    """Where a node writes into `folder`: the folder named so (ComfyUI lists the
    legacy models/unet before models/diffusion_models), else the first."""
    paths = folders(folder)
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == folder), paths[0])


def sampler_names() -> list[str]:
    return comfy.samplers.KSampler.SAMPLERS


def scheduler_names() -> list[str]:
    return comfy.samplers.KSampler.SCHEDULERS


# --------------------------------------------------------------------------- model access

def wan_root(model) -> nn.Module:
    """The Wan transformer of a ModelPatcher (comfy.ldm.wan.model.WanModel)."""
    return model.get_model_object("diffusion_model")


def weight_key(name: str) -> str:
    return f"{ROOT}{name}.weight"


def forward_key(name: str) -> str:
    return f"{ROOT}{name}.forward"


def _is_quantized_tensor(t: Tensor) -> bool:
    """A tensor subclass that stores other units than it represents (ComfyUI's
    QuantizedTensor): it overrides `dequantize`."""
    return getattr(type(t), "dequantize", Tensor.dequantize) is not Tensor.dequantize


def source_format(module: nn.Module) -> str | None:
    """The comfy_quant format of a layer (None: plain weights or 0.3.64's scaled fp8)."""
    fmt = getattr(module, "quant_format", None)
    if fmt is None and _is_quantized_tensor(module.weight):
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
    if _is_quantized_tensor(weight):
        weight = weight.dequantize()
    weight = weight.to(torch.float32)
    convert = getattr(module, "convert_weight", None)
    return convert(weight, inplace=False) if convert is not None else weight


def _stored_weight(model, name: str, module: nn.Module) -> Tensor:
    """The layer's unpatched stored weight. Clones share the model, so a weight may
    currently hold another clone's patch; ComfyUI keeps the original in the shared
    `backup` (see ModelPatcher.get_key_patches)."""
    backup = model.backup.get(weight_key(name))
    weight = backup.weight if backup is not None else module.weight
    # no detach() for a QuantizedTensor: it cannot re-wrap an inference-mode tensor
    return weight if _is_quantized_tensor(weight) else weight.detach()


def original_weight(model, name: str, module: nn.Module, columns: int | None = None) -> Tensor:
    """The unpatched weight (optionally its first `columns` inputs) dequantized to a
    fresh fp32 tensor on its current device."""
    weight = _stored_weight(model, name, module)
    with torch.no_grad():
        if _is_quantized_tensor(weight):
            weight = dequantize(module, weight)  # slicing a QuantizedTensor would slice its raw units
        elif weight.dtype == torch.float32:
            weight = weight.clone()
        return dequantize(module, weight[:, :columns] if columns is not None else weight)


def effective_weight(model, name: str, module: nn.Module) -> Tensor:
    """The fp32 weight this patcher runs before quantization: original + its own
    weight patches (LoRA etc.), computed like ModelPatcher.patch_weight_to_device."""
    weight = original_weight(model, name, module)
    patches = [p for p in model.patches.get(weight_key(name), []) if not isinstance(p[1], HiF4WeightAdapter)]
    if patches:
        weight = comfy.lora.calculate_weight(patches, weight, weight_key(name))
    return weight


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
    if (w.dtype in EXACT_STORAGE and not _is_quantized_tensor(w) and not hasattr(module, "scale_weight")
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


# --------------------------------------------------------------------------- quantization

class HiF4WeightAdapter(WeightAdapterBase):
    """Weight patch returning Q(rot(W / m)) computed in fp32 from the weight it is
    given (already including the LoRA patches ordered before it).

    All state lives in `weights` = [mask, rotation or None] and the constructor is
    `(loaded_keys, weights)`: Dynamic VRAM rebuilds adapters that way, with the
    tensors of `weights` moved into its own buffers."""
    name = "hifloat4"

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


class _LayerCall:
    """Base of our object patches: a plain callable (not an nn.Module, so ComfyUI and
    torch never see a submodule) that holds its Linear by weakref."""

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


class QuantizedForward(_LayerCall):
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
    return bool(_quantized_forwards(model))


def apply_w4a4(model, layers: Mapping[str, hlinear.LayerQuant]):
    """A clone of `model` whose listed layers run HiF4 W4A4 (mask and rotation per layer;
    hifloat4.plan decides them)."""
    if is_quantized(model):
        raise ValueError("this MODEL already went through 'Apply HiFloat4 W4A4'; apply it once, "
                         "to the unquantized model")
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
        ours = [p for p in plist if isinstance(p[1], HiF4WeightAdapter)]
        if not ours:
            continue
        quantized.add(key)
        rest = [p for p in plist if not isinstance(p[1], HiF4WeightAdapter)]
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


# --------------------------------------------------------------------------- packed models

class PackedWeight:
    """What a packed Linear needs besides its tensors (plain attributes, no tensors)."""

    def __init__(self, shape: tuple[int, int], rotation, storage: torch.dtype | None):
        self.shape = shape
        self.rotation = rotation
        self.storage = storage  # the dtype the fake-quant path would store Q(W/m) in


def make_packed_operations(layers: dict[str, hckpt.PackedLayer]):
    """An ops class (comfy.ops.manual_cast with our Linear) whose Linear layers named in
    `layers` (by their state-dict prefix) load packed; returns (ops, installed names).

    A packed layer keeps the uint8 codes as its `weight` parameter and the mask as its
    `hif4_mask` buffer (the checkpoint's names), so ComfyUI moves, offloads, streams
    (Dynamic VRAM) and sizes them like any weight; the forward gets them through core's
    cast, expands the weight on the input's device, in row chunks, and runs
    hifloat4.linear.w4a4_linear with it, as the Apply node does."""
    installed: set[str] = set()

    class HiF4PackedOps(comfy.ops.manual_cast):
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
                layer = layers.get(prefix[:-1])
                if layer is None:  # as nn.Linear would have allocated, then the regular copy
                    self.weight = nn.Parameter(torch.empty(shape, **f))
                    if self._hif4_has_bias:
                        self.bias = nn.Parameter(torch.empty(self.out_features, **f))
                    return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                         unexpected_keys, error_msgs)
                placeholder = state_dict.get(prefix + "weight")
                if tuple(layer.shape) != shape or placeholder is None or tuple(placeholder.shape) != shape:
                    error_msgs.append(f"{prefix}weight: packed HiF4 layer of shape {tuple(layer.shape)} does not fit "
                                      f"a Linear {shape}")
                    return
                storage = f["dtype"] if f["dtype"] in EXACT_STORAGE else torch.float32 if f["dtype"] is None else None
                self.weight = nn.Parameter(layer.weight.data, requires_grad=False)
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
                installed.add(prefix[:-1])

            def forward(self, x, *args, **kwargs):
                if self.hif4 is None:
                    return super().forward(x, *args, **kwargs)
                if len(self.weight_function) > 0 or getattr(self, "weight_lowvram_function", None) is not None:
                    raise RuntimeError(LORA_REFUSED)
                p = self.hif4
                quant = hlinear.LayerQuant(self.hif4_mask, p.rotation)
                with torch.no_grad():  # inference only: HiF4 rounding has no gradient
                    with cast_weight_bias(self, x.device, self.weight.dtype, x.dtype) as (codes, bias):
                        packed = PackedHiF4(codes.detach(), p.shape, 1, torch.float32)
                        # stored as the Apply node would store Q(W/m), then cast as ComfyUI casts weights
                        weight = hpacked.expand_weight(packed, p.storage or x.dtype, x.device).to(x.dtype)
                        return hlinear.w4a4_linear(x.detach(), weight, bias, quant)

    return HiF4PackedOps, installed


def packed_layer_names(model) -> list[str]:
    """Names (relative to the Wan root) of the packed layers of a MODEL; [] if none."""
    return [n for n, m in wan_root(model).named_modules() if getattr(m, "hif4", None) is not None]


def is_packed_model(model) -> bool:
    return bool(packed_layer_names(model))


def check_packed_model(model) -> None:
    """Raise ValueError if anything would change a packed layer's weight or forward."""
    names = packed_layer_names(model)
    weights = {weight_key(n) for n in names}
    forwards = {f"{ROOT}{n}.": n for n in names}
    patched = sorted(k for k in weights if model.patches.get(k))
    patched += sorted(k for hp in model.hook_patches.values() for k in hp if k in weights)
    patched += sorted(k for k in weights if getattr(model, "weight_wrapper_patches", {}).get(k))
    if patched:
        raise ValueError(f"{LORA_REFUSED}\nPatched packed layers: {', '.join(p[len(ROOT):-7] for p in patched[:3])}"
                         + (f" and {len(patched) - 3} more" if len(patched) > 3 else ""))
    touched = sorted(k for k in model.object_patches if k.rpartition(".")[0] + "." in forwards)
    if touched:
        raise ValueError(f"{REQUANT_REFUSED}\n(object patches on {touched[0][len(ROOT):]}"
                         + (f" and {len(touched) - 1} more)" if len(touched) > 1 else ")"))


def guard_wrapper(executor, model, noise_shape, conds, *args, **kwargs):
    """PREPARE_SAMPLING wrapper of packed models: runs before ComfyUI loads/patches them
    (the arguments after `conds` differ between ComfyUI versions and pass through)."""
    check_packed_model(model)
    return executor(model, noise_shape, conds, *args, **kwargs)


def load_packed_model(path: str):
    """A ComfyUI MODEL from a packed HiF4 checkpoint (validated; bf16 main weights never built)."""
    ckpt = hckpt.load_hif4_checkpoint(path)
    sd = dict(ckpt.tensors)
    for name, layer in ckpt.layers.items():
        sd[hckpt.codes_key(name)] = torch.empty(layer.shape, dtype=ckpt.weight_dtype, device="meta")
    ops, installed = make_packed_operations(ckpt.layers)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
    if model is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of {os.path.basename(path)}")
    missing = [n for n in ckpt.layers if n not in installed]
    if missing:
        raise RuntimeError(f"{len(missing)} packed layers were not loaded (e.g. {missing[0]}): this ComfyUI built "
                           "the Wan model with other layer names")
    provided = set(ckpt.tensors) | {k for n in ckpt.layers for k in (hckpt.codes_key(n), hckpt.mask_key(n))}
    absent = sorted(set(wan_root(model).state_dict()) - provided)
    if absent:  # ComfyUI only logs missing keys; those tensors would hold uninitialized memory
        raise RuntimeError(f"{os.path.basename(path)} lacks {len(absent)} tensors of this Wan model, e.g. {absent[0]}")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, PACKED_KEY, guard_wrapper)
    log.info("HiF4: loaded %s, expert %s: %d packed layers (%.1f MB codes + masks)", os.path.basename(path),
             ckpt.expert, len(ckpt.layers),
             sum(p.weight.nbytes + 4 * p.hif4_mask.numel() for p in ckpt.layers.values()) / 2**20)
    return model


class ComfyModelSource(hexport.ModelSource):
    """hifloat4.export's view of a ComfyUI MODEL: original weights (ComfyUI's shared
    backup when a clone is patched in), each with this patcher's own patches merged
    (LoRA etc.); weights stored in other units (fp8, scaled fp8, comfy_quant) are
    dequantized and carried as float32 (exact), their scale tensors dropped."""

    def __init__(self, model):
        self.model = model
        self.root = wan_root(model)
        self.name = f"ComfyUI MODEL ({type(self.root).__name__})"
        self.modules = dict(self.root.named_modules())
        params = dict(self.root.named_parameters()) | dict(self.root.named_buffers())
        self.params = {k: v for k, v in params.items() if not k.endswith(SCALE_SUFFIXES)}

    def _module(self, key: str):
        return self.modules.get(key.rpartition(".")[0])

    def _converted(self, key: str) -> bool:
        """Stored in units other than its real values."""
        t = self.params[key]
        return _is_quantized_tensor(t) or t.dtype not in EXACT_STORAGE or (
            key.endswith(".weight") and hasattr(self._module(key), "scale_weight"))

    def _original(self, key: str) -> torch.Tensor:
        backup = self.model.backup.get(ROOT + key)
        t = backup.weight if backup is not None else self.params[key]
        return t if _is_quantized_tensor(t) else t.detach()

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def stored_dtype(self, key):
        # fp8 * a float32 scale needs more than bf16's 8 significant bits: keep it exact
        return torch.float32 if self._converted(key) else self.params[key].dtype

    def tensor(self, key):
        t = self._original(key)
        patches = [p for p in self.model.patches.get(ROOT + key, []) if not isinstance(p[1], HiF4WeightAdapter)]
        if not patches and not self._converted(key):
            return t.to("cpu")
        with torch.no_grad():
            m = self._module(key)  # a layer's scale belongs to its weight only (0.3.64 stores its bias in fp8 too)
            w = dequantize(m, t) if key.endswith(".weight") and m is not None else t.to(torch.float32, copy=True)
            if patches:
                w = comfy.lora.calculate_weight(patches, w, ROOT + key)
        return w.to("cpu", self.stored_dtype(key))

    def real_weight(self, layer):
        with torch.no_grad():
            return effective_weight(self.model, layer, self.modules[layer]).to("cpu")

    def weight_dtype(self):
        main = [m for n, m in self.modules.items() if n.startswith("blocks.") and hwan.is_linear(m)]
        dtype = main[0].weight.dtype if main and not _is_quantized_tensor(main[0].weight) else torch.bfloat16
        return dtype if dtype in EXACT_STORAGE else torch.bfloat16


def export_packed(model, config: hplan.W4A4Config, path: str) -> hexport.ExportReport:
    """Write `model` (unquantized, LoRAs merged) as a packed HiF4 checkpoint, with a
    progress bar; Cancel stops it and leaves no file."""
    bar = comfy.utils.ProgressBar(1)
    return hexport.export_expert(ComfyModelSource(model), config, path,
                                 progress=lambda done, total: bar.update_absolute(done, total),
                                 cancel=check_interrupt)


# --------------------------------------------------------------------------- calibration

class _Observer(_LayerCall):
    """`<layer>.forward` during calibration: folds the input into the layer's
    hifloat4.calibrate.LayerObservation (statistics and token sample; one update per
    forward call, cond and uncond batched as the sampler batched them), then runs the
    layer unchanged."""

    def __init__(self, module: nn.Module, session: "CalibrationSession"):
        super().__init__(module)
        self.session = session
        self.observation = None

    def __call__(self, x, *args, **kwargs):
        s = self.session
        if s.active:
            if self.observation is None:
                self.observation = hcalibrate.LayerObservation(x.shape[-1], s.config, device=x.device)
            with torch.no_grad():
                self.observation.update(x)
        return self.run_original(x, *args, **kwargs)


class CalibrationSession:
    """A throwaway clone of one expert with observers on its main layers. Use as a
    context manager: observers are switched off and removed on exit, error or not."""

    def __init__(self, model, config: hcalibrate.CalibConfig):
        self.model = model
        self.config = config
        self.active = True
        self.sigmas: list[Tensor] = []
        self.chunk_counts: dict[int, int] = {}
        self.names = hwan.main_linear_names(wan_root(model))
        modules = linear_modules(model, self.names)
        self.clone = model.clone()
        self.observers = {n: _Observer(modules[n], self) for n in self.names}
        for n, obs in self.observers.items():
            self.clone.add_object_patch(forward_key(n), obs)
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PLUGIN_KEY,
                                        self._diffusion_wrapper)

    def _diffusion_wrapper(self, executor, x, timestep, context, clip_fea, time_dim_concat,
                           transformer_options, *args, **kwargs):
        """Tags each call with its sigma and the number of cond/uncond chunks batched
        into it (ComfyUI splits them when memory is short; reported in the state)."""
        if self.active:
            chunks = len(transformer_options.get("cond_or_uncond") or [0])
            self.chunk_counts[chunks] = self.chunk_counts.get(chunks, 0) + 1
            if "sigmas" in transformer_options:
                self.sigmas.append(transformer_options["sigmas"].detach().reshape(-1)[:1])
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, *args, **kwargs)

    def calls(self) -> dict[str, int]:
        """Model calls, and how many of them batched more than one cond/uncond chunk."""
        return {"forward": sum(self.chunk_counts.values()),
                "batched": sum(n for c, n in self.chunk_counts.items() if c > 1)}

    def sigma_range(self) -> list[float] | None:
        if not self.sigmas:
            return None
        s = torch.cat(self.sigmas).float().cpu()
        return [float(s.min()), float(s.max())]

    def observation(self) -> hcalibrate.ExpertObservation:
        """What hifloat4.calibrate.build_state needs: the observations, the real-valued
        weights (LoRA merged, fp8 dequantized) and the unpatched model's fingerprint."""
        missing = [n for n, o in self.observers.items() if o.observation is None]
        if missing:
            raise RuntimeError(f"calibration saw no input for {len(missing)} layers (e.g. {missing[0]}); "
                               "did this expert run at least one step?")
        modules = linear_modules(self.model, self.names)
        return hcalibrate.ExpertObservation(
            model=wan_root(self.model), layers={n: o.observation for n, o in self.observers.items()},
            weight=lambda name: effective_weight(self.model, name, modules[name]),
            fingerprint=model_fingerprint(self.model))

    def close(self) -> None:
        self.active = False
        modules = [o._module() for o in self.observers.values()]
        if any(m is not None and isinstance(m.__dict__.get("forward"), _Observer) for m in modules):
            # restores every object patch of this clone; each sampling re-applies its own
            self.clone.unpatch_model(device_to=None, unpatch_weights=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


# --------------------------------------------------------------------------- sampling

def schedule_sigmas(model, steps: int, sampler_name: str, scheduler: str) -> list[float]:
    """The sigma schedule KSampler(Advanced) would use for this model."""
    ks = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler_name, scheduler=scheduler)
    return [float(s) for s in ks.sigmas]


def sample_segment(model, latent: dict, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, positive, negative, start_step: int | None, last_step: int | None,
                   add_noise: bool, force_full_denoise: bool, on_step: Callable[[int], None]) -> dict:
    """KSamplerAdvanced's sampling (nodes.common_ksampler) with our own step callback."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    if add_noise:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout,
                            device="cpu")
    samples = comfy.sample.sample(
        model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
        denoise=1.0, disable_noise=not add_noise, start_step=start_step, last_step=last_step,
        force_full_denoise=force_full_denoise, noise_mask=latent.get("noise_mask"),
        callback=lambda step, x0, x, total: on_step(step + 1), disable_pbar=True, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


def encode_prompt(clip, text: str):
    """CLIPTextEncode."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


class Progress:
    """One ProgressBar over the whole calibration; every update also lets the
    server raise on a cancel."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.base = 0

    def step(self, done_in_segment: int) -> None:
        self.bar.update_absolute(self.base + done_in_segment)

    def advance(self, n: int) -> None:
        self.base += n
        self.bar.update_absolute(self.base)


def check_interrupt() -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


# --------------------------------------------------------------------------- messages on the node

def tell(text: str, level: int = logging.INFO) -> dict:
    """Messages a user must see in the browser, not only in the server log. ComfyUI's
    frontend shows a node's "ui" output only for node types it knows, but draws every
    progress-text message under the node that sent it (frontend 1.27 and current).

    Log `text` as one line, show it on the executing node, and return the "ui"
    entry ({"text": [text]}) for the node's return value."""
    log.log(level, "HiF4: %s", text)
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:  # ComfyUI without progress text (or not running): the log line remains
        return {"text": [text]}
    context, server = get_executing_context(), getattr(PromptServer, "instance", None)
    if context is not None and server is not None:
        server.send_progress_text(text, context.node_id, server.client_id)
    return {"text": [text]}
