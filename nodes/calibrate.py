"""HiF4CalibrateWan22: sample a few prompts through ComfyUI's own sampler with
observers on every main Linear, turn the statistics into channel masks, save the
PTQ state into calib_states and return it."""
from __future__ import annotations

import contextlib
import os

from hifloat4 import calibrate as hcalibrate
from hifloat4 import rotation as hrotation
from hifloat4 import safefile
from hifloat4 import sampling as hsampling
from hifloat4 import state as hstate
from hifloat4 import wan as hwan

from . import policy
from .comfy import calibration, folders
from .comfy.lora_graph import loras_upstream
from .comfy.patch_record import patch_record
from .comfy.progress import Progress, check_interrupt, tell
from .comfy.w4a4 import require_unquantized
from .comfy.weights import wan_root

CATEGORY = "hifloat4"
# The MODEL input each expert comes in on, where the graph is searched for its LoRAs.
EXPERT_INPUTS = {policy.HIGH: "model_high_noise", policy.LOW: "model_low_noise", policy.SINGLE: "model_high_noise"}


class HiF4CalibrateWan22:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_high_noise": ("MODEL", {"tooltip": "The Wan2.2 high-noise expert (or the only model, "
                                                          "e.g. TI2V-5B)."}),
                "positive": ("CONDITIONING", {"tooltip": "The calibration prompt (I2V: the positive output of "
                                                         "WanImageToVideo)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt, as for generation."}),
                "latent_image": ("LATENT", {"tooltip": "Calibration resolution and length."}),
                # No "control after generate" (the frontend adds a randomizing one to any INT named seed):
                # a new seed would re-calibrate for hours and write a new file on every Queue.
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": False,
                                 "tooltip": "Noise seed of the first prompt; prompt i uses seed + i. Fixed: the "
                                            "calibration re-runs only when an input changes."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000,
                                  "tooltip": "Sampling steps per prompt; use what you generate with."}),
                "cfg": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance scale; use what you generate with."}),
                "sampler_name": (calibration.sampler_names(), {
                    "default": "euler", "tooltip": "Sampler, as in KSampler; use what you generate with."}),
                "scheduler": (calibration.scheduler_names(), {
                    "default": "simple", "tooltip": "Scheduler, as in KSampler; use what you generate with."}),
                "switch_step": ("INT", {"default": -1, "min": -1, "max": 10000,
                                        "tooltip": "Step at which the low-noise expert takes over: set it to the "
                                                   "step where your samplers hand over (end_at_step of the first "
                                                   "KSamplerAdvanced). -1 derives it from Wan2.2's boundary sigma "
                                                   "(0.875 T2V, 0.9 I2V), which can differ by a step (T2V, shift 8, "
                                                   "20 steps: 11)."}),
                "percentile": ("FLOAT", {"default": 99.9, "min": 50.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "Tail statistic of |x| per input channel."}),
                "alpha": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "Migration strength: m = max|W|^alpha / a^(1 - alpha)."}),
                "filename_prefix": ("STRING", {"default": "wan22_hif4",
                                               "tooltip": "Saved as <prefix>_NNNNN.safetensors in calib_states."}),
            },
            "optional": {
                "model_low_noise": ("MODEL", {"tooltip": "The Wan2.2-A14B low-noise expert; leave empty for a "
                                                         "single-model Wan (TI2V-5B)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder for extra_prompts."}),
                "extra_prompts": ("STRING", {"default": "", "multiline": True,
                                             "tooltip": "More calibration prompts, one per line, each sampled "
                                                        "in turn with the same negative."}),
                "rotation": (list(hrotation.SETTINGS), {"default": "off",
                                               "tooltip": "Calibrate for the block Hadamard rotation after the "
                                                          "mask (beyond the paper); the state records it and "
                                                          "Apply uses it as calibrated."}),
                "rotation_block": ("INT", {"default": hrotation.DEFAULT_BLOCK, "min": 1, "max": hrotation.MAX_BLOCK,
                                           "tooltip": "Hadamard block size when rotation is hadamard (the "
                                                      "largest power of two dividing each layer's inputs, up "
                                                      "to this, is used)."}),
            },
            # The queued graph and this node's id in it: the LoRA file names upstream of each
            # expert's MODEL, which the model itself does not carry (recorded in the state).
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("PTQ_STATE",)
    RETURN_NAMES = ("ptq_state",)
    OUTPUT_NODE = True
    FUNCTION = "calibrate"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Calibrates HiFloat4 W4A4 channel masks for Wan2.2 (tail-aware: a high percentile of each "
                   "input channel instead of its maximum) and saves them to calib_states.")

    def calibrate(self, model_high_noise, positive, negative, latent_image, seed, steps, cfg, sampler_name,
                  scheduler, switch_step, percentile, alpha, filename_prefix, model_low_noise=None, clip=None,
                  extra_prompts="", rotation="off", rotation_block=hrotation.DEFAULT_BLOCK, prompt=None,
                  unique_id=None):
        high, low = model_high_noise, model_low_noise
        policy.split_prefix(filename_prefix)  # refuse a bad name before sampling for minutes
        for m in (high, low):
            if m is not None:
                require_unquantized(m, "'Calibrate Wan2.2 HiF4'")
        variant = hwan.detect_variant(wan_root(high))
        if low is not None:
            low_variant = hwan.detect_variant(wan_root(low))
            if hwan.linear_shapes(wan_root(low)) != hwan.linear_shapes(wan_root(high)):
                raise ValueError(f"the two experts differ: high-noise is {variant.describe()}, "
                                 f"low-noise is {low_variant.describe()}")
        config = hcalibrate.CalibConfig(percentile=float(percentile), alpha=float(alpha),
                                        rotation=hrotation.from_setting(rotation, rotation_block))
        texts = policy.split_prompts(extra_prompts)
        if texts and clip is None:
            raise ValueError("extra_prompts needs the clip input to encode them")
        conds = [positive] + [policy.like_main_prompt(calibration.encode_prompt(clip, t), positive) for t in texts]

        settings = {"prompts": len(conds), "steps": steps, "sampler": sampler_name, "scheduler": scheduler,
                    "cfg": cfg, "seed": seed, "latent_shape": list(latent_image["samples"].shape),
                    **policy.video_size(latent_image["samples"].shape)}
        if low is not None:
            boundary = hsampling.boundary_sigma(variant.kind) if switch_step == -1 else None
            sigmas = calibration.schedule_sigmas(high, steps, sampler_name, scheduler)
            switch = hsampling.resolve_switch_step(switch_step, sigmas, boundary)
            settings.update(switch_step=switch, boundary_sigma=boundary)
            experts = {policy.HIGH: high, policy.LOW: low}
        else:
            switch = None
            experts = {policy.SINGLE: high}

        progress = Progress(len(conds) * steps)
        with contextlib.ExitStack() as stack:
            sessions = {name: stack.enter_context(calibration.CalibrationSession(m, config))
                        for name, m in experts.items()}
            for i, cond in enumerate(conds):
                check_interrupt()
                progress.prompt = f"prompt {i + 1} of {len(conds)}"
                self._sample_prompt(sessions, cond, negative, latent_image, policy.prompt_seed(seed, i), steps,
                                    cfg, sampler_name, scheduler, switch, progress)
            observed = {name: s.observation() for name, s in sessions.items()}
            settings["calls"] = {name: s.calls() for name, s in sessions.items()}
            settings["sigma_range"] = {name: s.sigma_range() for name, s in sessions.items()}

        state = hcalibrate.build_state(observed, config, calibration=settings,
                                       patches={name: patch_record(m, loras_upstream(prompt, unique_id,
                                                                                     EXPERT_INPUTS[name]))
                                                for name, m in experts.items()})
        name, subfolder = self._save(state, filename_prefix)
        written = tell(f"saved PTQ state {os.path.join(folders.STATES, subfolder, name)} ({', '.join(experts)}; "
                       f"{len(conds)} prompt(s) x {steps} steps); press R so Load PTQ State lists it")
        return {"ui": {"hifloat4_states": [{"filename": name, "subfolder": subfolder, "type": folders.STATES}],
                       **written},
                "result": (state,)}

    @staticmethod
    def _sample_prompt(sessions, cond, negative, latent, seed, steps, cfg, sampler_name, scheduler, switch,
                       progress):
        common = dict(steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler, positive=cond,
                      negative=negative, on_step=progress.step)
        if switch is None:
            progress.stage(policy.SINGLE, 0, steps, steps)
            calibration.sample_segment(sessions[policy.SINGLE].clone, latent, seed, start_step=None,
                                       last_step=None, add_noise=True, force_full_denoise=True, **common)
            progress.advance(steps)
            return
        # KSamplerAdvanced pair: high noise keeps its leftover noise, low noise finishes
        progress.stage(policy.HIGH, 0, switch, steps)
        mid = calibration.sample_segment(sessions[policy.HIGH].clone, latent, seed, start_step=0,
                                         last_step=switch, add_noise=True, force_full_denoise=False, **common)
        progress.advance(switch)
        progress.stage(policy.LOW, switch, steps, steps)
        calibration.sample_segment(sessions[policy.LOW].clone, mid, seed, start_step=switch, last_step=steps,
                                   add_noise=False, force_full_denoise=True, **common)
        progress.advance(steps - switch)

    @staticmethod
    def _save(state, filename_prefix) -> tuple[str, str]:
        subfolder, base = policy.split_prefix(filename_prefix)
        root = folders.save_dir(folders.STATES)
        folder = safefile.output_folder(root, subfolder, what=folders.STATES, error=hstate.PTQStateError)
        name = policy.state_filename(base, policy.next_counter(os.listdir(folder), base))
        hstate.save_state(hstate.safe_state_path(folder, name), state)
        return name, subfolder
