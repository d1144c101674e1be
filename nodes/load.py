"""HiF4LoadPTQState: pick a PTQ state file from calib_states."""
from __future__ import annotations

import logging

from hifloat4 import safefile
from hifloat4 import state as hstate

from . import comfy_adapter as adapter
from . import policy

CATEGORY = "hifloat4"


def _unpicked(state_name) -> str | None:
    return policy.unpicked_file(state_name, adapter.file_names(adapter.STATES), "PTQ states", adapter.folders(adapter.STATES),
                                "run Calibrate Wan2.2 HiF4 (or copy a shared state there)")


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

    def load(self, state_name=None):
        problem = _unpicked(state_name)
        if problem:
            raise FileNotFoundError(problem)
        state = hstate.load_state(self._path(state_name))
        missing = hstate.missing_features(state)
        if missing:  # an older file still works; say what it cannot do
            return {"ui": adapter.tell(f"{state_name} is a version {hstate.format_version(state)} PTQ state without "
                                       f"{' or '.join(missing)}; recalibrate with this version to get them",
                                       logging.WARNING),
                    "result": (state,)}
        return (state,)

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
            return safefile.file_sha256(cls._path(state_name), hstate.PTQStateError)
        except (OSError, ValueError):
            return float("nan")  # never equal: let load() report the problem

    @classmethod
    def VALIDATE_INPUTS(cls, input_types, state_name=None):
        # An empty list reaches us with no state_name at all (the frontend omits it), and ComfyUI
        # reports a custom message only per argument it passed: input_types is always passed.
        problem = _unpicked(state_name)
        if problem:
            return problem
        if not policy.is_state_name(state_name):
            return f"PTQ states are .safetensors files, got {state_name!r}"
        try:
            cls._path(state_name)
        except FileNotFoundError as e:
            return str(e)
        return True
