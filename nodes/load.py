"""HiF4LoadPTQState: pick a PTQ state file from calib_states."""
from __future__ import annotations

import hashlib

from hifloat4 import state as hstate

from . import comfy_adapter as adapter
from . import policy

CATEGORY = "hifloat4"


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HiF4LoadPTQState:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"state_name": (adapter.file_names(adapter.STATES), {
            "tooltip": "A .safetensors PTQ state in models/calib_states or the plugin's calib_states."})}}

    RETURN_TYPES = ("PTQ_STATE",)
    RETURN_NAMES = ("ptq_state",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads HiFloat4 channel masks (a PTQ state) saved by 'Calibrate Wan2.2 HiF4' or shared by others."

    def load(self, state_name):
        return (hstate.load_state(self._path(state_name)),)

    @staticmethod
    def _path(state_name) -> str:
        path = adapter.file_path(adapter.STATES, state_name) if policy.is_state_name(state_name) else None
        if path is None:
            raise FileNotFoundError(f"PTQ state {state_name!r} not found in calib_states "
                                    f"({', '.join(adapter.folders(adapter.STATES))})")
        return path

    @classmethod
    def IS_CHANGED(cls, state_name):
        """The file's content hash: a re-saved or replaced file reloads."""
        try:
            return _file_sha256(cls._path(state_name))
        except OSError:
            return float("nan")  # never equal: let load() report the problem

    @classmethod
    def VALIDATE_INPUTS(cls, state_name):
        if not policy.is_state_name(state_name):
            return f"PTQ states are .safetensors files, got {state_name!r}"
        try:
            cls._path(state_name)
        except FileNotFoundError as e:
            return str(e)
        return True
