"""The loader nodes' shared file picker (nodes/file_picker.py) in this process: one
change rule (the resolved path with the file's mtime and size) for both lists."""
import importlib
import os

import pytest

pytestmark = pytest.mark.comfyui


@pytest.fixture(params=[("load", "HiF4LoadPTQState", "calib_states"),
                        ("packed", "HiF4LoadDiffusionModel", "diffusion_models")], ids=["state", "packed"])
def picker(request, comfy, tmp_path, monkeypatch):
    """(node class, a file in its folder): only names are resolved, so any bytes do."""
    module, cls, folder = request.param
    monkeypatch.setitem(comfy["folder_paths"].folder_names_and_paths, folder, ([str(tmp_path)], {".safetensors"}))
    node = getattr(importlib.import_module(f"comfyui_hifloat4.nodes.{module}"), cls)
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"0123")
    return node, path


def changed(node, name):
    return node.IS_CHANGED(**{node.INPUT: name})


def test_an_unchanged_file_keeps_its_change_token(picker):
    node, path = picker
    assert changed(node, path.name) == changed(node, path.name)


def test_a_rewritten_file_gets_a_new_change_token(picker):
    node, path = picker
    before = changed(node, path.name)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, written again later
    assert changed(node, path.name) != before


def test_a_missing_or_unpicked_file_never_matches_a_cached_run(picker):
    node, _ = picker
    for name in ("gone.safetensors", None):
        token = changed(node, name)
        assert token != token  # NaN: ComfyUI runs the node, and load() reports the problem
