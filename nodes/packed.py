"""Packed HiF4 models in ComfyUI: 'Save HiF4 Model' writes a shareable checkpoint with
4.5-bit main weights (hifloat4.export), 'Load HiF4 Diffusion Model' runs it without
ever holding the bf16 main weights.

Loading follows ComfyUI's custom-operations-at-load pattern (as ComfyUI-GGUF does):
nodes.comfy.packed_ops is the ops class, nodes.comfy.packed_loader the loader. The
state dict handed to ComfyUI carries, for each packed layer, a meta-device
placeholder of the logical weight shape and dtype, so model detection, parameter
counting and dtype selection see what they would see for the unpacked file; the
packed layers keep the uint8 codes as their weight and compute exactly the Apply
node's bits.

LoRAs after the loader (LoraLoaderModelOnly) act on packed layers as its `lora` input
says, bypassed as exact low-rank terms or merged into the codes (nodes.comfy.packed_lora);
a PREPARE_SAMPLING wrapper refuses weight hooks, weight wrappers and object patches on
packed layers. Patches on the other (high-precision) layers work as usual.
"""
from __future__ import annotations

import logging
import os

from hifloat4 import checkpoint as hckpt
from hifloat4 import safefile

from . import policy
from .comfy import folders
from .comfy.export import export_packed
from .comfy.packed_loader import load_packed_model
from .comfy.progress import tell
from .comfy.w4a4 import require_unquantized
from .comfy.weights import plan_for
from .file_picker import FilePicker

CATEGORY = "hifloat4"
FOLDER = folders.MODELS


def packed_model_names() -> list[str]:
    """diffusion_models files carrying the HiF4 marker (headers only, cached; bad files skipped and logged once)."""
    return hckpt.hif4_checkpoint_names((n, folders.file_path(FOLDER, n)) for n in folders.file_names(FOLDER))


class HiF4LoadDiffusionModel(FilePicker):
    FOLDER = folders.MODELS
    INPUT = "unet_name"
    WHAT, ONE = "packed HiF4 checkpoints", "packed HiF4 checkpoint"
    HOW_TO_MAKE = "write one with Save HiF4 Model or 'python -m hifloat4 export'"
    TOOLTIP = ("A packed HiF4 checkpoint in models/diffusion_models (made by 'Save HiF4 Model' or "
               "'python -m hifloat4 export'); other files are not listed.")

    @classmethod
    def choices(cls) -> list[str]:
        return packed_model_names()

    @classmethod
    def INPUT_TYPES(cls):
        runtime = policy.runtime_inputs()
        return super().INPUT_TYPES() | {"optional": {"compute": runtime["compute"], "lora": runtime["lora"]}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a Wan2.2 expert saved with packed 4.5-bit HiF4 weights. It runs W4A4 with the embedded "
                   "masks, like 'Apply HiFloat4 W4A4' on the original model, in about 30% of the weight memory. "
                   "LoRAs after it (LoraLoaderModelOnly) are bypassed (exact low-rank terms) or merged, as "
                   "'lora' says.")

    def load(self, unet_name=None, compute="auto", lora="bypass"):
        return (load_packed_model(self.picked_path(unet_name), compute, lora),)

    @classmethod
    def file_problem(cls, name: str, path: str) -> str | None:
        if not hckpt.has_hif4_marker(path):
            return (f"{name} is not a packed HiF4 checkpoint (no {hckpt.METADATA_KEY!r} marker); load it with "
                    "'Load Diffusion Model', or export it with 'Save HiF4 Model'")
        return None


class HiF4SaveModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The unquantized Wan2.2 expert (LoRAs loaded on it are merged "
                                               "before quantization)."}),
                "ptq_state": ("PTQ_STATE", {"tooltip": "Channel masks from Load PTQ State or Calibrate Wan2.2 "
                                                       "HiF4, made for this model."}),
                "expert": (list(policy.EXPERTS), {
                    "default": "auto",
                    "tooltip": "Which expert's masks to use; auto identifies the model by its weights. Another "
                               "model type (T2V / I2V / TI2V) is refused even when an expert is named."}),
                "filename_prefix": ("STRING", {
                    "default": "hif4/wan2.2_expert",
                    "tooltip": "Saved as models/diffusion_models/<prefix>_NNNNN.safetensors."}),
            },
            "optional": policy.quantization_inputs(),
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Writes the model as a packed HiF4 checkpoint: main Linear weights as 4.5-bit HiF4 codes with "
                   "the PTQ state's masks embedded (28% of their bf16 size), everything else unchanged. Load it with "
                   "'Load HiF4 Diffusion Model'.")

    def save(self, model, ptq_state, expert, filename_prefix, **choices):
        require_unquantized(model, "'Save HiF4 Model'")
        config = policy.w4a4_config(ptq_state, expert, **choices)
        name = plan_for(model, config).expert  # refuse a wrong model before creating any folder
        subfolder, base = policy.split_prefix(filename_prefix, FOLDER)
        folder = safefile.output_folder(folders.save_dir(FOLDER), subfolder, what=FOLDER,
                                        error=hckpt.HiF4CheckpointError)
        filename = policy.state_filename(base, policy.next_counter(os.listdir(folder), base))
        path = safefile.safe_output_path(folder, filename, what="model file", suffix=hckpt.SUFFIX,
                                         error=hckpt.HiF4CheckpointError)
        report = export_packed(model, config, path)
        texts = [tell(w, logging.WARNING)["text"][0] for w in report.warnings]
        texts += tell(f"saved packed HiF4 model {os.path.join(FOLDER, subfolder, filename)} ({name} expert); "
                      "load it with Load HiF4 Diffusion Model (press R)")["text"]
        return {"ui": {"hifloat4_models": [{"filename": filename, "subfolder": subfolder, "type": FOLDER}],
                       "text": texts + [report.summary()]}}
