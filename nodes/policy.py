"""Pure decisions only the nodes make: prompt lists, state file names, what to say
when no file is picked. Decisions shared with the CLI and the library live in the
core (which expert: hifloat4.experts; the expert handoff: hifloat4.sampling). No
ComfyUI import here, so all of it is unit-tested on plain CPU torch.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from hifloat4 import linear as hlinear
from hifloat4 import lora as hlora
from hifloat4 import plan as hplan
from hifloat4 import rotation as hrotation
from hifloat4 import state as hstate
from hifloat4.experts import EXPERTS, HIGH, LOW, SINGLE  # noqa: F401  (the nodes' expert choices)

STATE_EXT = ".safetensors"
_COUNTER_DIGITS = 5


# --------------------------------------------------------------------------- quantization choices

AS_CALIBRATED = "as calibrated"  # the combos' word for None in hifloat4.plan.W4A4Config
ALPHA_AS_CALIBRATED = -1.0  # the same for the alpha widget (a FLOAT widget cannot show a word)
STATISTIC_CHOICES = (AS_CALIBRATED, *hstate.REMASK_STATISTICS)
ROTATION_CHOICES = (AS_CALIBRATED, *hplan.ROTATIONS)


def quantization_inputs() -> dict:
    """The optional inputs of Apply HiFloat4 W4A4 and Save HiF4 Model: the same choices
    on both, so a tuned Apply can be saved as exactly the model it ran."""
    return {
        "alpha": ("FLOAT", {"default": ALPHA_AS_CALIBRATED, "min": -1.0, "max": 1.0, "step": 0.01,
                            "tooltip": "Re-derive masks with another alpha (-1: as calibrated)."}),
        "statistic": (list(STATISTIC_CHOICES), {
            "default": AS_CALIBRATED,
            "tooltip": "Re-derive masks from another statistic; none = plain HiF4 without smoothing; adaptive = "
                       "per layer, whichever of p99 / p99.9 / p99.99 / max gave the lowest error at calibration."}),
        "rotation": (list(ROTATION_CHOICES), {"default": AS_CALIBRATED,
                                              "tooltip": "Block Hadamard rotation after the mask (beyond the paper)."}),
        "rotation_block": ("INT", {"default": hrotation.DEFAULT_BLOCK, "min": 1, "max": hrotation.MAX_BLOCK,
                                   "tooltip": "Hadamard block size when rotation is hadamard (the largest power of "
                                              "two dividing each layer's inputs, up to this, is used)."}),
        "keep_high_precision": ("INT", {
            "default": 0, "min": 0, "max": 10000,
            "tooltip": "Leave the N layers that W4A4 hurts most (measured at calibration) unquantized: a little "
                       "speed and memory for quality. The node lists them and what they cost."}),
    }


WEIGHTS_CHOICES = ("auto", "packed", "unpacked")
COMPUTE_CHOICES = hlinear.COMPUTE_CHOICES


def keep_packed(weights: str, device_type: str) -> bool:
    """Whether Apply keeps the quantized weights packed: `auto` does on a GPU (0.56 bytes per
    weight, decoded per call at ~1.02x the bf16-cached time on an H200) and not on a CPU
    (where decoding every weight in every forward costs seconds)."""
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS_CHOICES)}, got {weights!r}")
    return weights == "packed" or (weights == "auto" and device_type == "cuda")


def runtime_inputs() -> dict:
    """Apply's optional inputs that say how the quantized model runs (not what it computes)."""
    return {
        "weights": (list(WEIGHTS_CHOICES), {
            "default": "auto",
            "tooltip": "packed: keep the HiF4 weights as 4.5-bit codes (0.56 bytes per weight instead of the "
                       "source's 1 (fp8) or 2 (bf16); the model is rebuilt packed, the input stays in system RAM). "
                       "unpacked: weights as HiF4 values in the model's dtype (a little faster, no memory saved). "
                       "auto: packed on a GPU, unpacked on a CPU."}),
        "compute": (list(COMPUTE_CHOICES), {
            "default": "auto",
            "tooltip": "How packed layers multiply. simulate: HiF4 values in a bf16 matmul (the reference bits). "
                       "int8: the same HiF4 values on int8 tensor cores (sums in another order; faster only where "
                       "int8 is much faster than bf16, e.g. RTX cards). auto: int8 only where measured faster."}),
        "lora": (list(hlora.LORA_MODES), {
            "default": "bypass",
            "tooltip": "How LoRAs loaded after this node (LoraLoaderModelOnly) act on packed layers. bypass: the "
                       "codes stay as they are and each LoRA adds its exact low-rank term x·Aᵀ·Bᵀ·strength in the "
                       "compute dtype (2·rank·(in+out) FLOPs per token and layer). merge: the LoRA is added to the "
                       "dequantized weight and re-quantized once at load (no extra FLOPs; one more HiF4 rounding, "
                       "small deltas can vanish). Only for packed weights."}),
    }


def w4a4_config(state, expert: str, alpha: float = ALPHA_AS_CALIBRATED, statistic: str = AS_CALIBRATED,
                rotation: str = AS_CALIBRATED, rotation_block: int = hrotation.DEFAULT_BLOCK,
                keep_high_precision: int = 0) -> hplan.W4A4Config:
    """The node inputs of quantization_inputs() as the core's config (the one place
    where "as calibrated" and alpha -1 become None)."""
    return hplan.W4A4Config(
        state, expert=expert, alpha=None if alpha < 0 else float(alpha),
        statistic=None if statistic == AS_CALIBRATED else statistic,
        rotation=None if rotation == AS_CALIBRATED else rotation, rotation_block=int(rotation_block),
        keep_high_precision=int(keep_high_precision))


# --------------------------------------------------------------------------- prompts

def split_prompts(text: str | None) -> list[str]:
    """One prompt per non-empty line (surrounding whitespace dropped)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def like_main_prompt(encoded: list, main: list) -> list:
    """An extra prompt's CONDITIONING with the non-text entries of the main prompt's
    (WanImageToVideo's start image `concat_latent_image`/`concat_mask`, a CLIP vision
    output...), so an I2V model is calibrated on extra prompts *with* its image."""
    extras = {k: v for k, v in main[0][1].items() if k not in encoded[0][1]} if main else {}
    return [[tensor, {**extras, **entries}] for tensor, entries in encoded]


def prompt_seed(seed: int, index: int) -> int:
    """Noise seed of the index-th calibration prompt: distinct noise per prompt,
    reproducible from the node's seed (wraps like ComfyUI's 64-bit seed widget)."""
    return (int(seed) + int(index)) % (1 << 64)


# --------------------------------------------------------------------------- file names

def split_prefix(filename_prefix: str, folder: str = "calib_states") -> tuple[str, str]:
    """(subfolder, base name) of a filename prefix such as "wan22/t2v"; refuses
    absolute paths and '..' so a file can only land inside `folder` (named in the message)."""
    prefix = filename_prefix.strip().replace("\\", "/")
    if not prefix or prefix.endswith("/"):
        raise ValueError(f"filename_prefix {filename_prefix!r} needs a file name part")
    if prefix.startswith("/") or re.match(r"^[A-Za-z]:", prefix) or ".." in prefix.split("/"):
        raise ValueError(f"filename_prefix {filename_prefix!r} must stay inside {folder} "
                         "(no absolute path, no '..')")
    sub, _, base = prefix.rpartition("/")
    return sub, base


def next_counter(existing: Iterable[str], base: str) -> int:
    """1 + the highest NNNNN among files named `<base>_NNNNN.safetensors` (SaveImage
    style counters: gaps are not refilled, other names are ignored)."""
    pattern = re.compile(re.escape(base) + r"_(\d+)" + re.escape(STATE_EXT) + r"$", re.IGNORECASE)
    numbers = [int(m.group(1)) for name in existing if (m := pattern.match(os.path.basename(name)))]
    return max(numbers, default=0) + 1


def state_filename(base: str, counter: int) -> str:
    return f"{base}_{counter:0{_COUNTER_DIGITS}d}{STATE_EXT}"


def is_safetensors_name(name) -> bool:
    """A file name the loader nodes accept (PTQ states and packed checkpoints alike)."""
    return isinstance(name, str) and name.lower().endswith(STATE_EXT)


def unpicked_file(value, available: Sequence[str], what: str, folders: Sequence[str], how_to_make: str) -> str | None:
    """What to do when a file list input has no file picked, else None. The frontend
    sends no value (or null) for an empty list, so the usual message would be a Python
    error; this one says where files are looked for and how to get one."""
    if isinstance(value, str) and value:
        return None
    if not available:
        return f"no {what} in {', '.join(folders)}: {how_to_make}, then press R to refresh the list"
    return f"no {what} picked: choose one of the {len(available)} in the list"


# --------------------------------------------------------------------------- experts

def video_size(latent_shape: Sequence[int]) -> dict[str, int]:
    """Pixel size of a Wan video latent [B, C, T, H, W]: the Wan2.1 VAE (16 channels)
    downsamples 8x, the Wan2.2 VAE (48 channels) 16x; both 4x in time (+1 frame)."""
    if len(latent_shape) != 5:
        return {}
    _, c, t, h, w = (int(s) for s in latent_shape)
    spatial = 16 if c == 48 else 8
    return {"width": w * spatial, "height": h * spatial, "frames": (t - 1) * 4 + 1}

