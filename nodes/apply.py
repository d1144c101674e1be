"""HiF4ApplyW4A4: a clone of the MODEL running its main Linears as HiF4 W4A4."""
from __future__ import annotations

import logging

from . import policy
from .comfy.packed_apply import apply_packed, compute_device
from .comfy.patch_record import mismatch_warning
from .comfy.progress import tell
from .comfy.w4a4 import apply_w4a4, require_unquantized
from .comfy.weights import plan_for

CATEGORY = "hifloat4"


class HiF4ApplyW4A4:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The unquantized Wan2.2 model (after ModelSamplingSD3 and LoRAs); "
                                               "it is not changed, a quantized clone is returned."}),
                "ptq_state": ("PTQ_STATE", {"tooltip": "Channel masks from Load PTQ State or Calibrate Wan2.2 HiF4."}),
                "expert": (list(policy.EXPERTS), {
                    "default": "auto",
                    "tooltip": "Which expert's masks to use. auto identifies the model by its weights and refuses "
                               "a model the state was not made for. Naming an expert uses its masks on other "
                               "weights of the same model type (e.g. an fp8 copy) with a warning; another model "
                               "type (T2V / I2V / TI2V) is always refused."}),
            },
            "optional": policy.quantization_inputs() | policy.runtime_inputs(),
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs every main Linear of a Wan2.2 model as HiFloat4 W4A4 (4-bit weights and activations "
                   "with the PTQ state's channel masks). Returns a new MODEL; the input stays unquantized. On a GPU "
                   "the weights stay packed (4.5 bits).")

    def apply(self, model, ptq_state, expert, weights="auto", compute="auto", lora="bypass", **choices):
        require_unquantized(model, "'Apply HiFloat4 W4A4'")  # before reading its weights
        config = policy.w4a4_config(ptq_state, expert, **choices)
        plan = plan_for(model, config)
        if policy.keep_packed(weights, compute_device().type):
            out = apply_packed(model, config, compute, lora)
        elif compute == "int8":
            raise ValueError("compute 'int8' multiplies packed HiF4 codes: set weights to 'packed' (or 'auto' on a GPU)")
        else:
            out = apply_w4a4(model, plan.layers)
        warnings = [w for w in (plan.warning, mismatch_warning(model, config.state, plan.expert)) if w]
        texts = [tell(w, logging.WARNING)["text"][0] for w in warnings]
        if plan.kept or config.statistic == "adaptive":
            texts += tell(plan.describe())["text"]
        return {"ui": {"text": texts}, "result": (out,)} if texts else (out,)
