"""HiF4ApplyW4A4: a clone of the MODEL running its main Linears as HiF4 W4A4."""
from __future__ import annotations

import logging

from hifloat4 import rotation as hrotation
from hifloat4 import state as hstate
from hifloat4 import wan as hwan

from . import comfy_glue as glue
from . import policy

CATEGORY = "hifloat4"
AS_CALIBRATED = "as calibrated"
STATISTICS = (AS_CALIBRATED, "tail", "max", "none")
ROTATIONS = (AS_CALIBRATED, "off", "hadamard")

log = logging.getLogger("hifloat4")


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
        from .packed import is_packed_model  # imported here: nodes.packed imports this module

        if is_packed_model(model):
            raise ValueError("this MODEL comes from a packed HiF4 checkpoint (Load HiF4 Diffusion Model): it "
                             "already runs W4A4, so there is nothing to apply; connect it to the sampler directly")
        name = self._select_expert(model, ptq_state, expert)
        hstate.validate_against_model(ptq_state, name, hwan.linear_shapes(glue.wan_root(model)))
        state = ptq_state
        if alpha >= 0 or statistic != AS_CALIBRATED:
            state = hstate.remask(ptq_state, alpha=None if alpha < 0 else alpha,
                                  statistic=None if statistic == AS_CALIBRATED else statistic)
        masks = {ln: ls.mask for ln, ls in state.experts[name].layers.items()}
        return (glue.apply_w4a4(model, masks, self._rotation_for(ptq_state.rotation, rotation, rotation_block)),)

    @staticmethod
    def _select_expert(model, state, expert) -> str:
        fp = glue.model_fingerprint(model)
        candidates = {n: ex.fingerprint for n, ex in state.experts.items()}
        matched = hwan.match_fingerprint(fp, candidates) if expert == "auto" else None
        explanation = hwan.explain_match(fp, candidates) if expert == "auto" and matched is None else ""
        if explanation:
            try:
                explanation = f"found {hwan.detect_variant(glue.wan_root(model)).describe()}\n{explanation}"
            except ValueError as e:
                explanation = f"found: {e}\n{explanation}"
        name = policy.expert_for_request(expert, state.expert_names, matched, explanation)
        if expert != "auto" and hwan.match_fingerprint(fp, {name: candidates[name]}) is None:
            log.warning("HiF4: the model's weights differ from the %r expert the state was calibrated on "
                        "(applying as requested)", name)
        return name

    @staticmethod
    def _rotation_for(stored, choice, block):
        """(layer, in_features) -> Rotation or None."""
        if choice == "off" or (choice == AS_CALIBRATED and stored is None):
            return lambda name, k: None
        block, seed = (stored["block"], stored["seed"]) if choice == AS_CALIBRATED else (block, 0)
        return lambda name, k: hrotation.Rotation(block=policy.rotation_block(k, block), seed=seed)
