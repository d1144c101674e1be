"""Pure decisions the nodes make: the expert handoff step, prompt lists, state file
names, what to say when no file is picked (which expert of a PTQ state fits a model
is hifloat4.experts, shared with the CLI). No ComfyUI import here, so all of it
is unit-tested on plain CPU torch.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

from hifloat4.experts import EXPERTS, HIGH, LOW, SINGLE  # noqa: F401  (the nodes' expert choices)

# Wan2.2 switches from the high-noise to the low-noise expert when the timestep
# t/1000 (= sigma for ComfyUI's flow sampling) drops below this boundary.
BOUNDARY_SIGMA = {"t2v": 0.875, "i2v": 0.9}

STATE_EXT = ".safetensors"
_COUNTER_DIGITS = 5


# --------------------------------------------------------------------------- handoff

def boundary_sigma(kind: str) -> float:
    """Boundary sigma for a Wan2.2 model kind ("t2v" / "i2v"; detect_variant().kind)."""
    if kind not in BOUNDARY_SIGMA:
        raise ValueError(f"no Wan2.2 expert boundary for a {kind!r} model; "
                         f"two experts exist only for {sorted(BOUNDARY_SIGMA)}")
    return BOUNDARY_SIGMA[kind]


def switch_step_from_sigmas(sigmas: Sequence[float], boundary: float) -> int:
    """Steps run by the high-noise expert: those whose starting sigma is >= boundary
    (Wan2.2: `t >= boundary * 1000` selects the high-noise model). `sigmas` is the
    sampler schedule including its final sigma, so there are len(sigmas) - 1 steps."""
    steps = [float(s) for s in sigmas][:-1]
    n = 0
    while n < len(steps) and steps[n] >= boundary:
        n += 1
    return n


def resolve_switch_step(switch_step: int, sigmas: Sequence[float], boundary: float) -> int:
    """The step at which the low-noise expert takes over. -1 derives it from the
    boundary sigma; either way both experts must run at least one step, because the
    calibration has to observe both."""
    if switch_step < -1:
        raise ValueError(f"switch_step must be -1 (from the boundary sigma) or a step index, got {switch_step}")
    steps = len(sigmas) - 1
    step = switch_step_from_sigmas(sigmas, boundary) if switch_step == -1 else switch_step
    if not 0 < step < steps:
        how = (f"the boundary sigma {boundary} gives step {step}" if switch_step == -1
               else f"switch_step {step} was given")
        raise ValueError(f"with {steps} steps {how}, so one expert would never run and could not be "
                         f"calibrated; use more steps or a switch_step between 1 and {steps - 1}")
    return step


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


def is_state_name(name) -> bool:
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


def rotation_block(in_features: int, block: int) -> int:
    """Largest power of two <= block dividing in_features (512 for every Wan2.2 size;
    smaller for tiny test models)."""
    b = 1
    while b * 2 <= block and in_features % (b * 2) == 0:
        b *= 2
    return b
