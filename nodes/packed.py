"""Packed HiF4 models in ComfyUI: 'Save HiF4 Model' writes a shareable checkpoint with
4.5-bit main weights (hifloat4.export), 'Load HiF4 Diffusion Model' runs it without
ever holding the bf16 main weights.

Loading follows ComfyUI's custom-operations-at-load pattern (as ComfyUI-GGUF does):
`comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})`.
The state dict handed to ComfyUI carries, for each packed layer, a meta-device
placeholder of the logical weight shape and dtype under "<layer>.weight", so model
detection, parameter counting and dtype selection see exactly what they would see
for the unpacked file; the ops' Linear picks the packed codes of its layer (by its
state-dict prefix) in `_load_from_state_dict`. A packed layer keeps the uint8 codes
as its `weight` parameter (ComfyUI moves, offloads and sizes them like any weight),
its fp32 mask as a buffer and its bias; the forward computes Q(x m) exactly as the
Apply node's forward and expands the weight on the input's device, in row chunks,
for that one matmul (hifloat4.packed_linear.expand_weight), so outputs equal the
fake-quant path's bit for bit.

LoRA policy: refused on packed layers (the unquantized weight a LoRA must be merged
into is gone). A PREPARE_SAMPLING wrapper rejects weight patches, weight hooks and
object patches on packed layers with a message saying how to merge the LoRA at
export instead (LoraLoaderModelOnly -> Save HiF4 Model); the forward also refuses
lowvram weight functions. Patches on the other (high-precision) layers work as usual.
"""
from __future__ import annotations

import logging
import os

import comfy.lora
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import folder_paths
import torch
from torch import nn

from hifloat4 import export as hexport
from hifloat4 import linear as hlinear
from hifloat4 import packed_linear as hpacked
from hifloat4 import state as hstate
from hifloat4.packing import PackedHiF4

from . import comfy_glue as glue
from . import policy
from .apply import HiF4ApplyW4A4

log = logging.getLogger("hifloat4")

CATEGORY = "hifloat4"
FOLDER = "diffusion_models"
WRAPPER_KEY = "hifloat4_packed"
ROOT = glue.ROOT
EXACT = (torch.float32, torch.bfloat16, torch.float16)
LORA_REFUSED = ("LoRA (or any weight patch) on a packed HiF4 model is not supported: its main Linear weights are "
                "stored as 4.5-bit HiF4 codes, and a LoRA has to be merged into the unquantized weight before "
                "quantization. Merge it at export instead: Load Diffusion Model -> LoraLoaderModelOnly -> "
                "Save HiF4 Model, then load that file (or use the unpacked model with 'Apply HiFloat4 W4A4').")
REQUANT_REFUSED = ("this MODEL is a packed HiF4 model (loaded with 'Load HiF4 Diffusion Model'); it is already "
                   "W4A4-quantized and cannot be calibrated or quantized again. Use the original model for "
                   "'Calibrate Wan2.2 HiF4' / 'Apply HiFloat4 W4A4'.")


# --------------------------------------------------------------------------- the ops

class PackedWeight:
    """What a packed Linear needs besides its tensors (plain attributes, no tensors)."""

    def __init__(self, shape: tuple[int, int], rotation, storage: torch.dtype):
        self.shape = shape
        self.rotation = rotation
        self.storage = storage  # the dtype the fake-quant path would store Q(W/m) in


def make_operations(layers: dict[str, hexport.PackedLayer]):
    """An ops class (comfy.ops.manual_cast with our Linear) whose Linear layers named in
    `layers` (by their state-dict prefix) load packed; returns (ops, installed names)."""
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
                storage = f["dtype"] if f["dtype"] in EXACT else torch.float32 if f["dtype"] is None else None
                self.weight = nn.Parameter(layer.packed.data, requires_grad=False)
                self.register_buffer(hexport.MASK_SUFFIX[1:], layer.mask.to(torch.float32))
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
                if len(self.weight_function) > 0:
                    raise RuntimeError(LORA_REFUSED)
                p = self.hif4
                with torch.no_grad():  # inference only: HiF4 rounding has no gradient
                    xq = hlinear.prepare_activation(x.detach(), self.hif4_mask.to(x.device), p.rotation)
                    packed = PackedHiF4(self.weight.detach(), p.shape, 1, torch.float32)
                    weight = hpacked.expand_weight(packed, p.storage or xq.dtype, xq.device).to(xq.dtype)
                    bias = None
                    if self.bias is not None:
                        bias = self.bias.detach().to(xq.device)
                        for fn in self.bias_function:
                            bias = fn(bias)
                        bias = bias.to(xq.dtype)
                return torch.nn.functional.linear(xq, weight, bias)

    return HiF4PackedOps, installed


# --------------------------------------------------------------------------- guard

def packed_layer_names(model) -> list[str]:
    """Names (relative to the Wan root) of the packed layers of a MODEL; [] if none."""
    return [n for n, m in glue.wan_root(model).named_modules() if getattr(m, "hif4", None) is not None]


def is_packed_model(model) -> bool:
    return bool(packed_layer_names(model))


def check_packed_model(model) -> None:
    """Raise ValueError if anything would change a packed layer's weight or forward."""
    names = packed_layer_names(model)
    weights = {f"{ROOT}{n}.weight" for n in names}
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


# --------------------------------------------------------------------------- loading

def load_packed_model(path: str):
    """A ComfyUI MODEL from a packed HiF4 checkpoint (validated; bf16 main weights never built)."""
    ckpt = hexport.load_hif4_checkpoint(path)
    sd = dict(ckpt.tensors)
    for name, layer in ckpt.layers.items():
        sd[name + ".weight"] = torch.empty(layer.shape, dtype=ckpt.weight_dtype, device="meta")
    ops, installed = make_operations(ckpt.layers)
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
    if model is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of {os.path.basename(path)}")
    missing = [n for n in ckpt.layers if n not in installed]
    if missing:
        raise RuntimeError(f"{len(missing)} packed layers were not loaded (e.g. {missing[0]}): this ComfyUI built "
                           "the Wan model with other layer names")
    provided = set(ckpt.tensors) | {n + s for n in ckpt.layers for s in (".weight", hexport.MASK_SUFFIX)}
    absent = sorted(set(glue.wan_root(model).state_dict()) - provided)
    if absent:  # ComfyUI only logs missing keys; those tensors would hold uninitialized memory
        raise RuntimeError(f"{os.path.basename(path)} lacks {len(absent)} tensors of this Wan model, e.g. {absent[0]}")
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, WRAPPER_KEY, guard_wrapper)
    log.info("HiF4: loaded %s, expert %s: %d packed layers (%.1f MB codes + masks)", os.path.basename(path),
             ckpt.expert, len(ckpt.layers),
             sum(p.packed.nbytes + 4 * p.mask.numel() for p in ckpt.layers.values()) / 2**20)
    return model


_MARKER_CACHE: dict[str, tuple[tuple[int, int], bool]] = {}


def _has_marker(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (st.st_mtime_ns, st.st_size)
    hit = _MARKER_CACHE.get(path)
    if hit is None or hit[0] != key:
        hit = _MARKER_CACHE[path] = (key, hexport.is_hif4_checkpoint(path))
    return hit[1]


def packed_model_names() -> list[str]:
    """diffusion_models files carrying the HiF4 marker (headers only, cached by mtime/size)."""
    names = []
    for name in folder_paths.get_filename_list(FOLDER):
        path = folder_paths.get_full_path(FOLDER, name)
        if name.lower().endswith(hexport.SUFFIX) and path and _has_marker(path):
            names.append(name)
    return names


class HiF4LoadDiffusionModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (packed_model_names(), {
            "tooltip": "A packed HiF4 checkpoint in models/diffusion_models (made by 'Save HiF4 Model' or "
                       "'python -m hifloat4 export'); other files are not listed."})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Wan2.2 expert saved with packed 4.5-bit HiF4 weights. It runs W4A4 with the embedded "
                   "masks, like 'Apply HiFloat4 W4A4' on the original model, in about 30% of the weight memory. "
                   "LoRAs cannot be applied to it: merge them before saving.")

    def load(self, unet_name):
        return (load_packed_model(self._path(unet_name)),)

    @staticmethod
    def _path(unet_name) -> str:
        path = folder_paths.get_full_path(FOLDER, unet_name) if isinstance(unet_name, str) else None
        if path is None:
            raise FileNotFoundError(f"{unet_name!r} not found in diffusion_models "
                                    f"({', '.join(folder_paths.get_folder_paths(FOLDER))})")
        return path

    @classmethod
    def IS_CHANGED(cls, unet_name):
        try:
            st = os.stat(cls._path(unet_name))
            return f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            return float("nan")

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name):
        if not isinstance(unet_name, str) or not unet_name.lower().endswith(hexport.SUFFIX):
            return f"packed HiF4 checkpoints are .safetensors files, got {unet_name!r}"
        try:
            path = cls._path(unet_name)
        except FileNotFoundError as e:
            return str(e)
        if not _has_marker(path):
            return (f"{unet_name} is not a packed HiF4 checkpoint (no {hexport.METADATA_KEY!r} marker); load it with "
                    "'Load Diffusion Model', or export it with 'Save HiF4 Model'")
        return True


# --------------------------------------------------------------------------- saving

class ComfyModelSource(hexport.ModelSource):
    """hifloat4.export's view of a ComfyUI MODEL: original weights (ComfyUI's shared
    backup when a clone is patched in), each with this patcher's own patches merged
    (LoRA etc.), fp8 "scaled" weights dequantized."""

    def __init__(self, model):
        self.model = model
        self.root = glue.wan_root(model)
        self.name = f"ComfyUI MODEL ({type(self.root).__name__})"
        self.modules = dict(self.root.named_modules())
        params = self.root.state_dict(keep_vars=True)
        self.params = {k: v for k, v in params.items() if not k.endswith((".scale_weight", ".scale_input"))}

    def _module(self, key: str):
        return self.modules.get(key.rpartition(".")[0])

    def _scaled(self, key: str) -> bool:
        m = self._module(key)
        return key.endswith(".weight") and m is not None and hasattr(m, "scale_weight")

    def _original(self, key: str) -> torch.Tensor:
        backup = self.model.backup.get(ROOT + key)
        return (backup.weight if backup is not None else self.params[key]).detach()

    def shapes(self):
        return {k: tuple(v.shape) for k, v in self.params.items()}

    def stored_dtype(self, key):
        return torch.bfloat16 if self._scaled(key) else self.params[key].dtype

    def tensor(self, key):
        t = self._original(key)
        patches = [p for p in self.model.patches.get(ROOT + key, []) if not isinstance(p[1], glue.HiF4WeightAdapter)]
        if not patches and not self._scaled(key):
            return t.to("cpu")
        with torch.no_grad():
            w = glue._dequantize(self._module(key), t) if self._scaled(key) else t.to(torch.float32, copy=True)
            if patches:
                w = comfy.lora.calculate_weight(patches, w, ROOT + key)
        return w.to("cpu", self.stored_dtype(key))

    def real_weight(self, layer):
        with torch.no_grad():
            return glue.effective_weight(self.model, layer, self.modules[layer]).to("cpu")

    def weight_dtype(self):
        main = [m for n, m in self.modules.items() if n.startswith("blocks.") and isinstance(m, nn.Linear)]
        dtype = main[0].weight.dtype if main else torch.bfloat16
        return dtype if dtype in EXACT else torch.bfloat16


def save_root() -> str:
    """models/diffusion_models (ComfyUI lists the legacy models/unet first; both are listed)."""
    paths = folder_paths.get_folder_paths(FOLDER)
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == FOLDER), paths[0])


class HiF4SaveModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The unquantized Wan2.2 expert (LoRAs loaded on it are merged "
                                               "before quantization)."}),
                "ptq_state": ("PTQ_STATE",),
                "expert": (list(policy.EXPERTS), {
                    "default": "auto",
                    "tooltip": "Which expert's masks to use; auto identifies the model by its weights."}),
                "filename_prefix": ("STRING", {
                    "default": "hif4/wan2.2_expert",
                    "tooltip": "Saved as models/diffusion_models/<prefix>_NNNNN.safetensors."}),
            },
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the model as a packed HiF4 checkpoint: main Linear weights as 4.5-bit HiF4 codes with "
                   "the PTQ state's masks embedded (28% of their bf16 size), everything else unchanged. Load it with "
                   "'Load HiF4 Diffusion Model'.")

    def save(self, model, ptq_state, expert, filename_prefix):
        if is_packed_model(model):
            raise ValueError("this MODEL is already a packed HiF4 model; it is saved as it was loaded")
        if glue.is_quantized(model):
            raise ValueError("connect the model from before 'Apply HiFloat4 W4A4': 'Save HiF4 Model' quantizes it "
                             "itself with the PTQ state")
        name = HiF4ApplyW4A4._select_expert(model, ptq_state, expert)
        subfolder, base = policy.split_prefix(filename_prefix)
        folder = os.path.join(save_root(), subfolder)
        os.makedirs(folder, exist_ok=True)
        filename = policy.state_filename(base, policy.next_counter(os.listdir(folder), base))
        path = hstate.safe_state_path(folder, filename)
        report = hexport.export_expert(ComfyModelSource(model), ptq_state, name, path)
        for w in report.warnings:
            log.warning("HiF4: %s", w)
        return {"ui": {"hifloat4_models": [{"filename": filename, "subfolder": subfolder, "type": FOLDER}],
                       "text": [report.summary()]}}
