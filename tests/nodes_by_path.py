"""nodes/ modules that run without ComfyUI, loaded by path for their tests: the name
`nodes` belongs to ComfyUI's own module when ComfyUI is importable."""
from __future__ import annotations

import importlib.util
import pathlib
from types import ModuleType

NODES = pathlib.Path(__file__).resolve().parents[1] / "nodes"


def load_node_module(name: str) -> ModuleType:
    """nodes/<name>.py as a module of its own (named hifloat4_nodes_<name>, "/" as "_");
    `name` may be a path below nodes/ (e.g. "comfy/lora_graph") for a module without ComfyUI imports."""
    spec = importlib.util.spec_from_file_location(f"hifloat4_nodes_{name.replace('/', '_')}", NODES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
