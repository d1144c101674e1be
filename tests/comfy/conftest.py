"""Real-ComfyUI tests (marker `comfyui`): skipped, with the reason shown, unless
COMFYUI_DIR and the tiny harness models are available (README.md, "Tests")."""
import importlib
import importlib.util
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    reason = harness.missing_requirements()
    for item in items:
        if HERE in pathlib.Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"real ComfyUI unavailable: {reason}"))


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Models dir (tiny models linked, own calib_states/loras) and the plugin link."""
    root = tmp_path_factory.mktemp("comfy_ws")
    models = harness.make_models_dir(root)
    return {"root": root, "models": models, "plugin": harness.plugin_link(root)}


@pytest.fixture(scope="session")
def server(workspace):
    srv = harness.ComfyServer(workspace["models"], [workspace["plugin"]], log_path=workspace["root"] / "comfy.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def comfy():
    """ComfyUI imported in-process (CPU), and the plugin imported the way ComfyUI does."""
    pytest.importorskip("aiohttp", reason="this interpreter lacks ComfyUI's dependencies (use the ComfyUI venv)")
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    try:
        from comfy.cli_args import args
    except ModuleNotFoundError:
        shadow = getattr(sys.modules.get("comfy"), "__file__", None)
        pytest.fail(f"'import comfy' finds {shadow}, not ComfyUI's package: run the tests from a checkout "
                    "whose folder is not named 'comfy' (pytest puts the folder above a package root on sys.path)")
    args.cpu = True
    mods = {name: importlib.import_module(name) for name in
            ("folder_paths", "comfy.sd", "comfy.model_management", "comfy.model_patcher", "comfy.lora",
             "comfy.ops", "comfy.patcher_extension")}
    spec = importlib.util.spec_from_file_location("comfyui_hifloat4", harness.REPO / "__init__.py",
                                                  submodule_search_locations=[str(harness.REPO)])
    plugin = sys.modules.get("comfyui_hifloat4") or importlib.util.module_from_spec(spec)
    if "comfyui_hifloat4" not in sys.modules:
        sys.modules["comfyui_hifloat4"] = plugin
        spec.loader.exec_module(plugin)
    for name in ("folders", "weights", "w4a4", "packed_ops", "packed_loader", "export", "calibration", "progress",
                 "patch_record"):
        mods[name] = importlib.import_module(f"comfyui_hifloat4.nodes.comfy.{name}")
    mods["linear"] = importlib.import_module("hifloat4.linear")
    yield mods
    mods["comfy.model_management"].unload_all_models()


@pytest.fixture
def calib_dir(comfy, tmp_path, monkeypatch):
    """calib_states is this test's tmp_path."""
    monkeypatch.setitem(comfy["folder_paths"].folder_names_and_paths, "calib_states",
                        ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.fixture
def load_unet(comfy):
    """Load a tiny harness model like UNETLoader does; everything is unloaded after the test."""
    def load(name):
        path = pathlib.Path(os.environ["COMFY_HARNESS_MODELS"]) / "diffusion_models" / name
        return comfy["comfy.sd"].load_diffusion_model(str(path))
    yield load
    comfy["comfy.model_management"].unload_all_models()
