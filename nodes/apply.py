"""HiF4ApplyW4A4: a clone of the MODEL running its main Linears as HiF4 W4A4."""
from __future__ import annotations

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
                "model": ("MODEL",),
                "ptq_state": ("PTQ_STATE",),
                "expert": (list(policy.EXPERTS), {
                    "default": "auto",
                    "tooltip": "Which expert's masks to use; auto identifies the model by its weights and "
                               "refuses a model the state was not calibrated on."}),
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
                "rotation_block": ("INT", {"default": 512, "min": 1, "max": 8192}),
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
        name = adapter.select_expert(model, ptq_state, expert)
        hstate.validate_against_model(ptq_state, name, hwan.linear_shapes(adapter.wan_root(model)))
        state = ptq_state
        if alpha >= 0 or statistic != AS_CALIBRATED:
            state = hstate.remask(ptq_state, alpha=None if alpha < 0 else alpha,
                                  statistic=None if statistic == AS_CALIBRATED else statistic)
        masks = {ln: ls.mask for ln, ls in state.experts[name].layers.items()}
        return (adapter.apply_w4a4(model, masks, self._rotation_for(ptq_state.rotation, rotation, rotation_block)),)

    @staticmethod
    def _rotation_for(stored, choice, block):
        """(layer, in_features) -> Rotation or None."""
        if choice == "off" or (choice == AS_CALIBRATED and stored is None):
            return lambda name, k: None
        block, seed = (stored["block"], stored["seed"]) if choice == AS_CALIBRATED else (block, 0)
        return lambda name, k: hrotation.Rotation(block=policy.rotation_block(k, block), seed=seed)
