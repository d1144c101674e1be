"""HiF4 models next to other ComfyUI extensions, in this process (README, "Works with"):
TeaCache/MagCache-style step caches, core's TorchCompileModel, and GGUF sources (refused,
saying why and where the original file is)."""
import importlib
import os
import pathlib
from unittest import mock

import pytest
import torch

pytestmark = pytest.mark.comfyui
T2V_HIGH = "tiny_wan2.2_t2v_high_noise.safetensors"
HIGH = "high_noise"


@pytest.fixture(scope="module")
def files(comfy, tmp_path_factory):
    """A calibrated state and the packed file of the harness's high-noise expert."""
    probe = importlib.import_module("layout_probe")
    d = tmp_path_factory.mktemp("interop")
    return {"packed": probe.export_tiny(d), "state": d / "state.safetensors"}


@pytest.fixture
def mods(comfy):
    return {"apply": importlib.import_module("comfyui_hifloat4.nodes.apply"),
            "state": importlib.import_module("hifloat4.state"),
            "sample": importlib.import_module("comfy.sample")}


def hif4_model(comfy, mods, files, load_unet, kind):
    """The tiny expert as 'Apply HiFloat4 W4A4' returns it (unpacked) or as 'Load HiF4
    Diffusion Model' loads its packed file."""
    if kind == "packed":
        return comfy["packed_loader"].load_packed_model(str(files["packed"]))
    with torch.inference_mode():
        out = mods["apply"].HiF4ApplyW4A4().apply(load_unet(T2V_HIGH), mods["state"].load_state(files["state"]), HIGH)
    return (out["result"] if isinstance(out, dict) else out)[0]


def sample(mods, model, steps=4):
    """KSampler's computation (comfy.sample.sample), euler, cfg 1: one model call per step."""
    g = torch.Generator().manual_seed(0)
    latent = torch.zeros(1, 16, 2, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[torch.randn(1, 24, 4096, generator=g) * 0.2, {}]]
    with torch.inference_mode():
        return mods["sample"].sample(model, noise, steps, 1.0, "euler", "simple", cond, cond, latent, seed=0,
                                     disable_pbar=True)


class StepCache:
    """What TeaCache/MagCache do to a Wan model, reduced to its hooks: a
    model_function_wrapper that swaps WanModel.forward_orig (unittest.mock.patch.multiple)
    for one that skips the transformer blocks on every `skip_every`-th call, adding the
    residual cached on the last computed call instead."""

    def __init__(self, diffusion_model, skip_every: int | None):
        self.dm, self.skip_every, self.calls, self.residual = diffusion_model, skip_every, 0, None
        self.original = diffusion_model.forward_orig

    def forward_orig(self, x, *args, **kwargs):
        self.calls += 1
        if self.skip_every and self.calls % self.skip_every == 0 and self.residual is not None:
            return x + self.residual
        out = self.original(x, *args, **kwargs)
        self.residual = out - x
        return out

    def __call__(self, model_function, kwargs):
        with mock.patch.multiple(self.dm, forward_orig=self.forward_orig):
            return model_function(kwargs["input"], kwargs["timestep"], **kwargs["c"])


def cached(model, skip_every):
    clone = model.clone()
    cache = StepCache(clone.model.diffusion_model, skip_every)
    clone.set_model_unet_function_wrapper(cache)
    return clone, cache


def count_calls(layer):
    calls = []
    return calls, layer.register_forward_pre_hook(lambda m, args: calls.append(1))


@pytest.mark.parametrize("kind", ["unpacked", "packed"])
def test_a_step_cache_that_skips_nothing_leaves_the_hif4_bits_unchanged(comfy, mods, files, load_unet, kind):
    model = hif4_model(comfy, mods, files, load_unet, kind)
    plain = sample(mods, model)
    with_cache, cache = cached(model, None)
    assert torch.equal(sample(mods, with_cache), plain)
    assert cache.calls == 4


@pytest.mark.parametrize("kind", ["unpacked", "packed"])
def test_a_step_cache_runs_the_hif4_layers_only_on_the_steps_it_computes(comfy, mods, files, load_unet, kind):
    model = hif4_model(comfy, mods, files, load_unet, kind)
    with_cache, cache = cached(model, 2)  # computes calls 1 and 3, skips 2 and 4
    calls, hook = count_calls(model.model.diffusion_model.blocks[1].ffn[0])
    try:
        out = sample(mods, with_cache)
    finally:
        hook.remove()
    assert cache.calls == 4 and len(calls) == 2
    assert torch.isfinite(out).all() and not torch.equal(out, sample(mods, model))


def test_torch_compile_model_runs_the_packed_model_quantized(comfy, mods, files, load_unet):
    """Core's TorchCompileModel (inductor, on the CPU here) compiles the packed model's
    diffusion_model: dynamo breaks the graph at each HiF4 kernel call (a C++ extension it
    cannot trace), which runs as uncompiled; inductor's fused kernels for the other ops
    change float rounding only, far less than HiF4 quantization changes the result."""
    node = importlib.import_module("comfy_extras.nodes_torch_compile").TorchCompileModel
    model = comfy["packed_loader"].load_packed_model(str(files["packed"]))
    expected = sample(mods, model, steps=2)
    quantization = (sample(mods, load_unet(T2V_HIGH), steps=2) - expected).abs().max()
    out = node.execute(model, "inductor")
    compiled = sample(mods, (out.result if hasattr(out, "result") else out)[0], steps=2)
    assert (compiled - expected).abs().max() < 0.01 * quantization


class GGMLTensor(torch.Tensor):
    """ComfyUI-GGUF's GGMLTensor as other code sees it (ops.py there): the raw GGUF blocks
    in a uint8 tensor, `shape` the logical one, the type in `tensor_type`; `to` keeps them."""

    def to(self, *args, **kwargs):
        new = super().to(*args, **kwargs)
        new.tensor_type = getattr(self, "tensor_type", None)
        new.tensor_shape = getattr(self, "tensor_shape", new.data.shape)
        return new

    def clone(self, *args, **kwargs):
        return self

    def detach(self, *args, **kwargs):
        return self

    @property
    def shape(self):
        if not hasattr(self, "tensor_shape"):
            self.tensor_shape = self.size()
        return self.tensor_shape


def as_gguf_q4_k(model) -> None:
    """The block Linears of a loaded MODEL stored the way ComfyUI-GGUF loads a Q4_K file
    (144 bytes per 256 values; the contents do not matter for the refusal)."""
    import enum
    kind = enum.IntEnum("GGMLQuantizationType", {"Q4_K": 12}).Q4_K
    for name, m in model.model.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if name.startswith("blocks.") and isinstance(w, torch.Tensor) and w.ndim == 2:
            out_f, in_f = w.shape
            raw = torch.Tensor._make_subclass(GGMLTensor, torch.zeros(out_f, in_f // 256 * 144, dtype=torch.uint8))
            raw.tensor_type, raw.tensor_shape = kind, torch.Size((out_f, in_f))
            m.weight = torch.nn.Parameter(raw, requires_grad=False)


def test_apply_refuses_a_gguf_model_saying_why_and_where_the_original_is(comfy, mods, files):
    path = pathlib.Path(os.environ["COMFY_HARNESS_MODELS"]) / "diffusion_models" / T2V_HIGH
    model = comfy["comfy.sd"].load_diffusion_model(str(path))
    as_gguf_q4_k(model)
    with pytest.raises(ValueError) as err, torch.inference_mode():
        mods["apply"].HiF4ApplyW4A4().apply(model, mods["state"].load_state(files["state"]), HIGH)
    msg = str(err.value)
    assert "GGUF Q4_K" in msg and "already quantized" in msg and "compounding" in msg
    assert "masks are calibrated on the statistics of the unquantized weights" in msg
    assert "Comfy-Org/Wan_2.2_ComfyUI_Repackaged" in msg and "fp16.safetensors" in msg
