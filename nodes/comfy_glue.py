"""The one module that touches ComfyUI internals (facts: notes/COMFY_FACTS.md).

Everything here adapts ComfyUI objects to the plain-torch core:
- weights: a weight adapter patch per quantized Linear returning Q(W / m), so ComfyUI
  caches it on full load, recomputes it in lowvram, and applies it after LoRA patches;
- activations: an object patch on `<layer>.forward`, a plain callable that computes
  Q(x * m) and then runs the layer class's own forward;
- calibration: a throwaway clone whose object patches feed per-channel statistics;
- sampling: ComfyUI's own sampler, mirrored from nodes.common_ksampler.
Modules are shared between clones, so nothing here sets attributes on modules.
"""
from __future__ import annotations

import logging
import os
import uuid
import weakref
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

import comfy.lora
import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
from comfy.weight_adapter import WeightAdapterBase

from hifloat4 import linear as hlinear
from hifloat4 import stats as hstats
from hifloat4 import wan as hwan

log = logging.getLogger("hifloat4")

PLUGIN_KEY = "hifloat4"
FOLDER = "calib_states"
ROOT = "diffusion_model."
# Storage dtypes that hold every HiF4 value exactly (<= 6 significant bits), so a
# quantized weight can be patched in once; anything else is quantized per forward.
EXACT_STORAGE = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- folders

def register_calib_states_folder(plugin_dir: str) -> None:
    """models/calib_states first (where the calibrate node saves), then any path a user
    configured (extra_model_paths.yaml), then the plugin's shipped calib_states/."""
    paths = [os.path.join(folder_paths.models_dir, FOLDER)]
    if FOLDER in folder_paths.folder_names_and_paths:
        paths += folder_paths.folder_names_and_paths[FOLDER][0]
    paths.append(os.path.join(plugin_dir, FOLDER))
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    folder_paths.folder_names_and_paths[FOLDER] = (unique, {".safetensors"})


def state_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def state_path(name: str) -> str | None:
    return folder_paths.get_full_path(FOLDER, name)


def state_folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER)


def save_dir() -> str:
    return state_folders()[0]


# --------------------------------------------------------------------------- model access

def wan_root(model) -> nn.Module:
    """The Wan transformer of a ModelPatcher (comfy.ldm.wan.model.WanModel)."""
    return model.get_model_object("diffusion_model")


def weight_key(name: str) -> str:
    return f"{ROOT}{name}.weight"


def forward_key(name: str) -> str:
    return f"{ROOT}{name}.forward"


def linear_modules(model, names) -> dict[str, nn.Module]:
    modules = dict(wan_root(model).named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the model has no layer {missing[0]} ({len(missing)} missing)")
    found = {n: modules[n] for n in names}
    odd = [f"{n} ({type(m).__name__})" for n, m in found.items()
           if not (isinstance(m, nn.Linear) and isinstance(m, comfy.ops.CastWeightBiasOp))]
    if odd:
        raise TypeError("HiF4 needs ComfyUI's own Linear ops; unsupported layer class for "
                        f"{odd[0]} ({len(odd)} such layers). Load the model with the core "
                        "'Load Diffusion Model' node.")
    return found


def _dequantize(module: nn.Module, weight: Tensor) -> Tensor:
    """Real-valued fp32 weight from stored units: ComfyUI's own `convert_weight`
    (fp8 scaled: * scale_weight) or a tensor subclass' `dequantize()`."""
    if getattr(type(weight), "dequantize", Tensor.dequantize) is not Tensor.dequantize:
        weight = weight.dequantize()  # a quantized tensor subclass (newer ComfyUI)
    weight = weight.to(torch.float32)
    convert = getattr(module, "convert_weight", None)
    return convert(weight, inplace=False) if convert is not None else weight


def original_weight(model, name: str, module: nn.Module, columns: int | None = None) -> Tensor:
    """The layer's unpatched weight (optionally only its first `columns` inputs),
    dequantized to a fresh fp32 tensor on its current device. Clones share the model,
    so a weight may currently hold another clone's patch; ComfyUI keeps the original
    in the shared `backup` (see ModelPatcher.get_key_patches)."""
    backup = model.backup.get(weight_key(name))
    weight = (backup.weight if backup is not None else module.weight).detach()
    if columns is not None:
        weight = weight[:, :columns]
    return _dequantize(module, weight.clone() if weight.dtype == torch.float32 else weight)


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


def weight_mode(module: nn.Module) -> str:
    """"patch": the quantized weight is stored once through a weight patch (exact);
    "forward": storage cannot hold HiF4 values exactly (fp8, scaled fp8), so the
    weight is dequantized and quantized inside each forward."""
    if module.weight.dtype in EXACT_STORAGE and not hasattr(module, "set_weight"):
        return "patch"
    return "forward"


# --------------------------------------------------------------------------- quantization

class HiF4WeightAdapter(WeightAdapterBase):
    """Weight patch returning Q(rot(W / m)) computed in fp32 from the weight it is
    given (already including the LoRA patches ordered before it)."""
    name = "hifloat4"

    def __init__(self, mask: Tensor, rotation=None):
        self.mask = mask.detach().to("cpu", torch.float32)
        self.rotation = rotation
        self.loaded_keys = set()
        self.weights = []

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if offset is not None:
            raise ValueError(f"{key}: a HiF4 weight patch cannot apply to a slice of the weight")
        with torch.no_grad():  # ComfyUI's parameters may require grad; quantization has none
            q = hlinear.prepare_weight(weight.detach().to(torch.float32), self.mask.to(weight.device),
                                       self.rotation)
        if weight.dtype == torch.float16:  # HiF4 reaches 344064; fp16 stops at 65504
            q.clamp_(-torch.finfo(torch.float16).max, torch.finfo(torch.float16).max)
        return q.to(weight.dtype)


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
    """`<layer>.forward` of a quantized Linear: y = Q(x m) Q(W / m)^T + b."""

    def __init__(self, module: nn.Module, mask: Tensor, rotation, mode: str):
        super().__init__(module)
        self.mask = mask.detach().to("cpu", torch.float32)
        self.rotation = rotation
        self.mode = mode
        self._on_device: dict[torch.device, Tensor] = {}

    def mask_on(self, device) -> Tensor:
        m = self._on_device.get(device)
        if m is None:
            m = self._on_device[device] = self.mask.to(device)
        return m

    def __call__(self, x, *args, **kwargs):
        mask = self.mask_on(x.device)
        with torch.no_grad():  # inference only: HiF4 rounding has no gradient
            xq = hlinear.prepare_activation(x.detach(), mask, self.rotation)
        if self.mode == "patch":  # weight already Q(W / m) through the weight patch
            return self.run_original(xq, *args, **kwargs)
        m = self.module()
        if callable(getattr(type(m), "cast_bias_weight", None)):  # layers that dequantize themselves (GGUF)
            weight, bias = m.cast_bias_weight(xq, dtype=torch.float32, bias_dtype=xq.dtype)
        else:  # ComfyUI ops: cast/offload, lowvram LoRA patches, stored units
            weight, bias = comfy.ops.cast_bias_weight(m, xq, dtype=torch.float32, bias_dtype=xq.dtype)
        with torch.no_grad():
            wq = hlinear.prepare_weight(_dequantize(m, weight.detach()), mask, self.rotation).to(xq.dtype)
        return torch.nn.functional.linear(xq, wq, bias)


def is_quantized(model) -> bool:
    return any(isinstance(p, QuantizedForward) for p in model.object_patches.values())


def apply_w4a4(model, masks: Mapping[str, Tensor], rotation_for: Callable[[str, int], object]):
    """A clone of `model` whose listed layers run HiF4 W4A4 with the given masks.
    rotation_for(layer name, in_features) -> hifloat4 Rotation or None."""
    if is_quantized(model):
        raise ValueError("this MODEL already went through 'Apply HiFloat4 W4A4'; apply it once, "
                         "to the unquantized model")
    modules = linear_modules(model, list(masks))
    clone = model.clone()
    weight_patches = {}
    modes = {"patch": 0, "forward": 0}
    for name, mask in masks.items():
        m = modules[name]
        if mask.shape != (m.in_features,):
            raise ValueError(f"{name}: mask has shape {tuple(mask.shape)}, the layer has {m.in_features} inputs")
        rot = rotation_for(name, m.in_features)
        mode = weight_mode(m)
        modes[mode] += 1
        if mode == "patch":
            weight_patches[weight_key(name)] = HiF4WeightAdapter(mask, rot)
        clone.add_object_patch(forward_key(name), QuantizedForward(m, mask, rot, mode))
    accepted = set(clone.add_patches(weight_patches))
    if accepted != set(weight_patches):
        raise RuntimeError(f"ComfyUI refused weight patches for {sorted(set(weight_patches) - accepted)[:3]}")
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, PLUGIN_KEY,
                               quantize_last_wrapper)
    log.info("HiF4 W4A4 on %d layers (%d weight-patched, %d quantized per forward)",
             len(masks), modes["patch"], modes["forward"])
    return clone


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


# --------------------------------------------------------------------------- calibration

class _Observer(_LayerCall):
    """`<layer>.forward` during calibration: folds the input into per-channel
    statistics (one update per forward call, cond and uncond batched as the sampler
    batched them), then runs the layer unchanged."""

    def __init__(self, module: nn.Module, session: "CalibrationSession"):
        super().__init__(module)
        self.session = session
        self.stats = None

    def __call__(self, x, *args, **kwargs):
        s = self.session
        if s.active:
            if self.stats is None:
                self.stats = hstats.ChannelStats(x.shape[-1], percentile=s.percentile, device=x.device)
            with torch.no_grad():
                self.stats.update(x.detach())
        return self.run_original(x, *args, **kwargs)


class CalibrationSession:
    """A throwaway clone of one expert with observers on its main layers. Use as a
    context manager: observers are switched off and removed on exit, error or not."""

    def __init__(self, model, percentile: float):
        self.percentile = float(percentile)
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
                           transformer_options, **kwargs):
        """Tags each call with its sigma and the number of cond/uncond chunks batched
        into it (ComfyUI splits them when memory is short; reported in the state)."""
        if self.active:
            chunks = len(transformer_options.get("cond_or_uncond") or [0])
            self.chunk_counts[chunks] = self.chunk_counts.get(chunks, 0) + 1
            if "sigmas" in transformer_options:
                self.sigmas.append(transformer_options["sigmas"].detach().reshape(-1)[:1])
        return executor(x, timestep, context, clip_fea, time_dim_concat, transformer_options, **kwargs)

    def calls(self) -> dict[str, int]:
        """Model calls, and how many of them batched more than one cond/uncond chunk."""
        return {"forward": sum(self.chunk_counts.values()),
                "batched": sum(n for c, n in self.chunk_counts.items() if c > 1)}

    def sigma_range(self) -> list[float] | None:
        if not self.sigmas:
            return None
        s = torch.cat(self.sigmas).float().cpu()
        return [float(s.min()), float(s.max())]

    def statistics(self) -> dict[str, object]:
        missing = [n for n, o in self.observers.items() if o.stats is None]
        if missing:
            raise RuntimeError(f"calibration saw no input for {len(missing)} layers (e.g. {missing[0]}); "
                               "did this expert run at least one step?")
        return {n: o.stats for n, o in self.observers.items()}

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
