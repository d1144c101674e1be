"""The ComfyUI nodes. Their modules import ComfyUI, so they are only imported
when ComfyUI is running; nodes.policy (pure logic) imports anywhere."""
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if "folder_paths" in sys.modules:  # inside ComfyUI
    from .apply import HiF4ApplyW4A4
    from .calibrate import HiF4CalibrateWan22
    from .compare import HiF4CompareVideos
    from .load import HiF4LoadPTQState
    from .packed import HiF4LoadDiffusionModel, HiF4SaveModel

    NODE_CLASS_MAPPINGS = {
        "HiF4CalibrateWan22": HiF4CalibrateWan22,
        "HiF4LoadPTQState": HiF4LoadPTQState,
        "HiF4ApplyW4A4": HiF4ApplyW4A4,
        "HiF4CompareVideos": HiF4CompareVideos,
        "HiF4SaveModel": HiF4SaveModel,
        "HiF4LoadDiffusionModel": HiF4LoadDiffusionModel,
    }
    NODE_DISPLAY_NAME_MAPPINGS = {
        "HiF4CalibrateWan22": "Calibrate Wan2.2 HiF4",
        "HiF4LoadPTQState": "Load PTQ State",
        "HiF4ApplyW4A4": "Apply HiFloat4 W4A4",
        "HiF4CompareVideos": "Compare Videos (HiF4)",
        "HiF4SaveModel": "Save HiF4 Model",
        "HiF4LoadDiffusionModel": "Load HiF4 Diffusion Model",
    }
