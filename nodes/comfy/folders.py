"""The model folders the nodes read and write, through ComfyUI's folder_paths:
`calib_states` (PTQ states, registered here) and `diffusion_models` (packed files).
folder_paths lists the legacy models/unet before models/diffusion_models, so a node
writes into the folder that bears the name."""
from __future__ import annotations

import os

import folder_paths

STATES = "calib_states"
MODELS = "diffusion_models"


def register_calib_states_folder(plugin_dir: str) -> None:
    """models/calib_states first (where the calibrate node saves), then any path a user
    configured (extra_model_paths.yaml), then the plugin's shipped calib_states/."""
    paths = [os.path.join(folder_paths.models_dir, STATES)]
    if STATES in folder_paths.folder_names_and_paths:
        paths += folder_paths.folder_names_and_paths[STATES][0]
    paths.append(os.path.join(plugin_dir, STATES))
    unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    folder_paths.folder_names_and_paths[STATES] = (unique, {".safetensors"})


def file_names(folder: str) -> list[str]:
    return folder_paths.get_filename_list(folder)


def file_path(folder: str, name: str) -> str | None:
    return folder_paths.get_full_path(folder, name) if isinstance(name, str) else None


def folders(folder: str) -> list[str]:
    return folder_paths.get_folder_paths(folder)


def save_dir(folder: str) -> str:
    """Where a node writes into `folder`: the folder named so (ComfyUI lists the
    legacy models/unet before models/diffusion_models), else the first."""
    paths = folders(folder)
    return next((p for p in paths if os.path.basename(os.path.normpath(p)) == folder), paths[0])
