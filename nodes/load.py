"""HiF4LoadPTQState: pick a PTQ state file from calib_states."""
from __future__ import annotations

import logging

from hifloat4 import state as hstate

from .comfy import folders
from .comfy.progress import tell
from .file_picker import FilePicker

CATEGORY = "hifloat4"


class HiF4LoadPTQState(FilePicker):
    FOLDER = folders.STATES
    INPUT = "state_name"
    WHAT, ONE = "PTQ states", "PTQ state"
    HOW_TO_MAKE = "run Calibrate Wan2.2 HiF4 (or copy a shared state there)"
    TOOLTIP = "A .safetensors PTQ state in models/calib_states or the plugin's calib_states."

    RETURN_TYPES = ("PTQ_STATE",)
    RETURN_NAMES = ("ptq_state",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads HiFloat4 channel masks (a PTQ state) saved by 'Calibrate Wan2.2 HiF4' or shared by others."

    def load(self, state_name=None):
        state = hstate.load_state(self.picked_path(state_name))
        missing = hstate.missing_features(state)
        if missing:  # an older file still works; say what it cannot do
            return {"ui": tell(f"{state_name} is a version {hstate.format_version(state)} PTQ state without "
                               f"{' or '.join(missing)}; recalibrate with this version to get them",
                               logging.WARNING),
                    "result": (state,)}
        return (state,)
