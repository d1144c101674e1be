"""HiF4ApplyW4A4: a clone of the MODEL running its main Linears as HiF4 W4A4."""
from __future__ import annotations

import logging

from hifloat4 import rotation as hrotation
from hifloat4 import state as hstate
from hifloat4 import wan as hwan

from . import comfy_adapter as adapter
from . import policy

CATEGORY = "hifloat4"
AS_CALIBRATED = "as calibrated"
STATISTICS = (AS_CALIBRATED, "tail", "max", "none")
ROTATIONS = (AS_CALIBRATED, "off", "hadamard")


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
            "optional": {
                "alpha": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Re-derive masks with another alpha (-1: as calibrated)."}),
                "statistic": (list(STATISTICS), {"default": AS_CALIBRATED,
                                                 "tooltip": "Re-derive masks from another statistic; "
                                                            "none = plain HiF4 without smoothing."}),
                "rotation": (list(ROTATIONS), {"default": AS_CALIBRATED,
                                               "tooltip": "Block Hadamard rotation after the mask (beyond "
                                                          "the paper)."}),
                "rotation_block": ("INT", {"default": 512, "min": 1, "max": 8192,
                                           "tooltip": "Hadamard block size when rotation is hadamard (the "
                                                      "largest power of two dividing each layer's inputs, up "
                                                      "to this, is used)."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Runs every main Linear of a Wan2.2 model as HiFloat4 W4A4 (4-bit weights and activations "
                   "with the PTQ state's channel masks). Returns a new MODEL; the input stays unquantized.")

    def apply(self, model, ptq_state, expert, alpha=-1.0, statistic=AS_CALIBRATED, rotation=AS_CALIBRATED,
              rotation_block=512):
        if adapter.is_packed_model(model):
            raise ValueError("this MODEL comes from a packed HiF4 checkpoint (Load HiF4 Diffusion Model): it "
                             "already runs W4A4, so there is nothing to apply; connect it to the sampler directly")
        choice = adapter.select_expert(model, ptq_state, expert)
        name = choice.name
        hstate.validate_against_model(ptq_state, name, hwan.linear_shapes(adapter.wan_root(model)))
        state = ptq_state
        if alpha >= 0 or statistic != AS_CALIBRATED:
            state = hstate.remask(ptq_state, alpha=None if alpha < 0 else alpha,
                                  statistic=None if statistic == AS_CALIBRATED else statistic)
        masks = {ln: ls.mask for ln, ls in state.experts[name].layers.items()}
        out = adapter.apply_w4a4(model, masks, self._rotation_for(ptq_state.rotation, rotation, rotation_block))
        if choice.warning:
            return {"ui": adapter.tell(choice.warning, logging.WARNING), "result": (out,)}
        return (out,)

    @staticmethod
    def _rotation_for(stored, choice, block):
        """(layer, in_features) -> Rotation or None."""
        if choice == "off" or (choice == AS_CALIBRATED and stored is None):
            return lambda name, k: None
        rotation = hrotation.from_meta(stored) if choice == AS_CALIBRATED else hrotation.Rotation(block=hrotation.fit_block(1 << 30, block))
        return lambda name, k: hrotation.for_layer(rotation, k)
