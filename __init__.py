"""comfyui-hifloat4: ComfyUI entry point.

Inside ComfyUI this registers the nodes and the calib_states model folder.
Imported anywhere else (pytest collecting the repo, tools) it does nothing, so the
core stays usable as plain `import hifloat4`.
"""
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if "folder_paths" in sys.modules:  # loaded by ComfyUI
    _HERE = os.path.dirname(os.path.abspath(__file__))
    if _HERE not in sys.path:  # the nodes import the core as the top-level package `hifloat4`
        sys.path.append(_HERE)
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811
    from .nodes.comfy.folders import register_calib_states_folder

    register_calib_states_folder(_HERE)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
