"""Drive the real ComfyUI server of ../shared/comfy_harness from pytest.

The repo is checked out with shared/ beside it (<repo>/../shared). Locations come
from COMFYUI_DIR (required), COMFY_HARNESS_MODELS (tiny models, default: made by
make_tiny_models.py) and COMFY_PYTHON / COMFY_VENV (the ComfyUI venv's python).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import time
import types
import uuid

REPO = pathlib.Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
# COMFY_HARNESS_DIR: the comfy_harness elsewhere (e.g. from a git worktree, whose parent has no shared/)
HARNESS = pathlib.Path(os.environ.get("COMFY_HARNESS_DIR") or SHARED / "comfy_harness")
PLUGIN_NAME = "comfyui-hifloat4"
PROMPTS = pathlib.Path(__file__).resolve().parent / "prompts"
TINY_MODELS = ("tiny_wan2.2_t2v_high_noise.safetensors", "tiny_wan2.2_t2v_low_noise.safetensors",
               "tiny_wan2.2_i2v_high_noise.safetensors", "tiny_wan2.2_i2v_low_noise.safetensors",
               "tiny_wan2.2_ti2v_5b.safetensors")


def missing_requirements() -> str | None:
    """Why the real-ComfyUI tests cannot run here, or None."""
    comfy = os.environ.get("COMFYUI_DIR")
    if not comfy:
        return "COMFYUI_DIR is not set (a ComfyUI checkout; see ../shared/comfy_harness/README.md)"
    if not (pathlib.Path(comfy) / "main.py").is_file():
        return f"COMFYUI_DIR={comfy} has no main.py"
    if not (HARNESS / "run_prompt.py").is_file():
        return f"comfy harness not found at {HARNESS}"
    models = os.environ.get("COMFY_HARNESS_MODELS")
    if not models or not all((pathlib.Path(models) / "diffusion_models" / m).is_file() for m in TINY_MODELS):
        return ("COMFY_HARNESS_MODELS does not hold the tiny Wan2.2 models "
                "(run ../shared/comfy_harness/make_tiny_models.py)")
    if not comfy_python():
        return "no python for ComfyUI: set COMFY_PYTHON or COMFY_VENV"
    return None


def comfy_python() -> str | None:
    if os.environ.get("COMFY_PYTHON"):
        return os.environ["COMFY_PYTHON"]
    venv = os.environ.get("COMFY_VENV")
    if venv and (pathlib.Path(venv) / "bin" / "python").is_file():
        return str(pathlib.Path(venv) / "bin" / "python")
    try:
        import aiohttp  # noqa: F401  (this interpreter can run ComfyUI itself)
        return sys.executable
    except ImportError:
        return None


def run_prompt_module():
    spec = importlib.util.spec_from_file_location("comfy_harness_run_prompt", HARNESS / "run_prompt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def harness_prompt(name: str) -> dict:
    """A prompt of the harness (without its _comment keys)."""
    with open(HARNESS / "prompts" / name) as f:
        prompt = json.load(f)
    return {k: v for k, v in prompt.items() if not k.startswith("_")}


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def make_models_dir(root: pathlib.Path) -> pathlib.Path:
    """A models dir linking the tiny models, with its own empty calib_states and loras."""
    src = pathlib.Path(os.environ["COMFY_HARNESS_MODELS"])
    models = root / "models"
    (models / "diffusion_models").mkdir(parents=True)
    for f in (src / "diffusion_models").iterdir():
        (models / "diffusion_models" / f.name).symlink_to(f)
    (models / "vae").symlink_to(src / "vae")
    (models / "loras").mkdir()
    (models / "calib_states").mkdir()
    return models


def plugin_link(root: pathlib.Path) -> pathlib.Path:
    """ComfyUI names a custom node package after its directory: link the repo under
    the plugin's name (the checkout directory may be called anything)."""
    link = root / "plugins" / PLUGIN_NAME
    link.parent.mkdir(parents=True)
    link.symlink_to(REPO)
    return link


class ComfyServer:
    """One real ComfyUI server (started by us, stopped by PID) for several prompts."""

    def __init__(self, models_dir: pathlib.Path, plugins=(), extra_args=(), log_path=None):
        self.rp = run_prompt_module()
        os.environ.setdefault("COMFY_PYTHON", comfy_python())
        args = types.SimpleNamespace(url=None, models_dir=str(models_dir), plugins=[str(p) for p in plugins],
                                     port=0, output_dir=None, plain=False, comfy_args=list(extra_args),
                                     server_log=str(log_path) if log_path else None)
        self.server = self.rp.Server(args)
        self.url = self.server.url
        if not self.server.wait_ready(180):
            self.stop()
            raise RuntimeError("ComfyUI did not start:\n" + self.log_tail())
        fails = self.server.import_failures()
        if fails:
            self.stop()
            raise RuntimeError("plugin import failed: " + "; ".join(fails) + "\n" + self.log_tail())

    def log_tail(self, n=80) -> str:
        return self.rp.tail(self.server.log_path, n) if self.server.log_path else ""

    def http(self, path, data=None, timeout=60):
        return self.rp.http(self.url + path, data, timeout=timeout)

    def object_info(self) -> dict:
        return self.http("/object_info")[1]

    def queue(self, prompt: dict) -> tuple[int, object]:
        return self.http("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout=600) -> dict:
        t0 = time.time()
        while time.time() - t0 < timeout:
            st, hist = self.http(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            time.sleep(0.2)
        self.http("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout=600) -> "Result":
        st, resp = self.queue(prompt)
        if st != 200:
            return Result(status="invalid", entry={"response": resp})
        entry = self.wait(resp["prompt_id"], timeout)
        return Result(status=entry["status"].get("status_str"), entry=entry)

    def is_running(self) -> bool:
        st, q = self.http("/queue")
        return bool(q.get("queue_running"))

    def stop(self):
        self.server.stop()


class Result:
    def __init__(self, status: str, entry: dict):
        self.status = status
        self.entry = entry

    @property
    def outputs(self) -> dict:
        return self.entry.get("outputs", {})

    def digest(self, label: str) -> dict:
        found = [d for o in self.outputs.values() for d in o.get("harness_digest", []) if d["label"] == label]
        assert found, f"no digest {label!r} in {self.describe()}"
        return found[0]

    def saved_states(self) -> list[dict]:
        return [s for o in self.outputs.values() for s in o.get("hifloat4_states", [])]

    def error(self) -> dict:
        for ev, data in self.entry.get("status", {}).get("messages", []):
            if ev in ("execution_error", "execution_interrupted"):
                return {"event": ev, **data}
        return {"event": None, "response": self.entry.get("response")}

    def describe(self) -> str:
        return json.dumps({"status": self.status, "error": self.error(), "outputs": self.outputs})[:4000]


def with_nodes(prompt: dict, **nodes) -> dict:
    """A copy of prompt with nodes added/replaced (ids as keyword names, e.g. n20=...)."""
    out = copy.deepcopy(prompt)
    for key, value in nodes.items():
        out[key.lstrip("n")] = value
    return out


def cleanup(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- generated model files

def write_lora(path: pathlib.Path, layers, rank=4, seed=0, scale=0.05, dim=256, ffn=512) -> None:
    """A LoRA for the tiny Wan models in ComfyUI's generic key format."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {"self_attn.q": (dim, dim), "cross_attn.k": (dim, dim), "ffn.0": (ffn, dim), "ffn.2": (dim, ffn)}
    tensors = {}
    for name in layers:
        out_f, in_f = shapes[name.split(".", 2)[2]]
        key = f"diffusion_model.{name}"
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale
    save_file(tensors, str(path))


def write_scaled_fp8(src: pathlib.Path, dst: pathlib.Path) -> None:
    """An fp8 'scaled' copy of a tiny model, laid out like the common Wan2.2 fp8_scaled
    files: every Linear weight float8_e4m3fn with a per-tensor `scale_weight`, plus the
    `scaled_fp8` marker (2 elements: no fp8 matmul)."""
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src))
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2:  # every Linear
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[k[: -len("weight")] + "scale_weight"] = scale.reshape(()).float()
        else:
            out[k] = v
    out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(out, str(dst))
