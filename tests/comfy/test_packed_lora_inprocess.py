"""LoRA on packed HiF4 models in ComfyUI, in this process: LoraLoaderModelOnly's patches
after 'Load HiF4 Diffusion Model' (or packed Apply) are bypassed as exact low-rank terms
(default) or merged into the codes, through ComfyUI's own sampling preparation, full
load and lowvram (and Dynamic VRAM's patch attribute where this ComfyUI has it)."""
import contextlib
import importlib
import logging

import harness
import pytest
import torch
from test_packed_inprocess import HIGH, T2V_HIGH, applied, files, inputs, mods  # noqa: F401  (fixtures)

from hifloat4.lora import dequantize_packed
from hifloat4.packed_linear import planar_weight

pytestmark = pytest.mark.comfyui
LORA_LAYERS = [f"blocks.{i}.{n}" for i in range(4) for n in ("self_attn.q", "ffn.0", "ffn.2")]
LAYER = "blocks.1.ffn.0"
KEY = f"diffusion_model.{LAYER}.weight"


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "lora.safetensors"
    harness.write_lora(path, LORA_LAYERS, scale=0.15)
    return path


def with_lora(comfy, model, path, strength=1.0):
    lora = comfy["comfy.sd"].comfy.utils.load_torch_file(str(path))
    return comfy["comfy.sd"].load_lora_for_models(model, None, lora, strength, 0)[0]


def sampled(comfy, patcher, seed=0):
    """The model's output as a sampler gets it: ComfyUI's prepare_sampling (PREPARE_SAMPLING
    wrappers, load_models_gpu), the model's apply_model, cleanup."""
    x, t, ctx = inputs(seed)
    with prepared(comfy, patcher, x.shape) as real, torch.inference_mode():
        return real.apply_model(x, t, c_crossattn=ctx)


@contextlib.contextmanager
def prepared(comfy, patcher, shape):
    """ComfyUI's sampling preparation as a sampler runs it (the patcher's wrappers in the
    model options, then prepare_sampling), cleaned up after."""
    helpers = importlib.import_module("comfy.sampler_helpers")
    options = comfy["comfy.model_patcher"].create_model_options_clone(patcher.model_options)
    helpers.prepare_model_patcher(patcher, {}, options)
    real, conds, models = helpers.prepare_sampling(patcher, shape, {}, options)
    try:
        yield real
    finally:
        helpers.cleanup_models(conds, models)


def packed(mods, files, lora="bypass"):
    return mods["loader"].load_packed_model(str(files["packed"]), lora=lora)


def layer(model, name=LAYER):
    return model.model.diffusion_model.get_submodule(name)


def expected_merge(comfy, module, codes, path, strength=1.0):
    """Codes of packing (the weight the codes stand for + the LoRA's delta) with the layer's
    mask and rotation, the delta computed here from the file: what Save HiF4 Model packs."""
    from safetensors.torch import load_file
    t = load_file(str(path))
    up, down = t[f"diffusion_model.{LAYER}.lora_up.weight"], t[f"diffusion_model.{LAYER}.lora_down.weight"]
    real = dequantize_packed(codes, module.hif4.shape[1], module.hif4_mask, module.hif4.rotation)
    return planar_weight(real + strength * torch.mm(up.float(), down.float()), module.hif4_mask, module.hif4.rotation)


def distance(a, b):
    return float((a.float() - b.float()).norm())


# --------------------------------------------------------------------------- bypass (default)

def test_bypassed_lora_changes_the_output_and_moves_it_toward_unquantized_plus_lora(comfy, mods, files, load_unet,
                                                                                     lora_file):
    base = packed(mods, files)
    plain = sampled(comfy, base)
    bypass = sampled(comfy, with_lora(comfy, base, lora_file))
    reference = sampled(comfy, with_lora(comfy, load_unet(T2V_HIGH), lora_file))
    assert not torch.equal(bypass, plain)
    assert distance(bypass, reference) < 0.5 * distance(plain, reference)


def test_bypass_keeps_the_codes_and_the_clones_patches(comfy, mods, files, lora_file):
    base = packed(mods, files)
    before = layer(base).weight.detach().clone()
    clone = with_lora(comfy, base, lora_file)
    patches = list(clone.patches[KEY])
    sampled(comfy, clone)
    assert torch.equal(layer(base).weight, before)
    assert clone.patches[KEY] == patches and not clone.backup


def test_bypass_adds_the_lora_term_to_the_packed_layer_output(comfy, mods, files, lora_file):
    from safetensors.torch import load_file
    clone = with_lora(comfy, packed(mods, files), lora_file, strength=0.7)
    sampled(comfy, clone)  # prepares the bypass terms
    m = layer(clone)
    x = torch.randn(2, 5, m.in_features)
    t = load_file(str(lora_file))
    delta = 0.7 * torch.mm(t[f"diffusion_model.{LAYER}.lora_up.weight"], t[f"diffusion_model.{LAYER}.lora_down.weight"])
    with torch.inference_mode():
        y = m(x)
        m.hif4.bypass = None
        y0 = m(x)
    assert torch.allclose(y - y0, x @ delta.T, atol=1e-5)


def test_lora_strength_scales_the_bypassed_term(comfy, mods, files, lora_file):
    base = packed(mods, files)
    plain = sampled(comfy, base)
    weak = sampled(comfy, with_lora(comfy, base, lora_file, 0.25))
    strong = sampled(comfy, with_lora(comfy, base, lora_file, 1.0))
    assert 0 < distance(weak, plain) < distance(strong, plain)


def test_stacked_loras_are_both_bypassed(comfy, mods, files, lora_file, tmp_path):
    other = tmp_path / "other.safetensors"
    harness.write_lora(other, LORA_LAYERS, seed=5, scale=0.15)
    base = packed(mods, files)
    one = sampled(comfy, with_lora(comfy, base, lora_file))
    both = with_lora(comfy, with_lora(comfy, base, lora_file), other)
    assert len(both.patches[KEY]) == 2
    assert not torch.equal(sampled(comfy, both), one)


def test_cores_bypass_lora_loader_gives_the_same_output(comfy, mods, files, lora_file):
    """Current ComfyUI's LoraLoaderBypass wraps the layers' forwards (injections): it works on
    packed layers as is, with the bits of our bypass."""
    sd = comfy["comfy.sd"]
    if not hasattr(sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no LoRA bypass loader (comfy.sd.load_bypass_lora_for_models)")
    base = packed(mods, files)
    lora = sd.comfy.utils.load_torch_file(str(lora_file))
    core = sampled(comfy, sd.load_bypass_lora_for_models(base, None, lora, 1.0, 0)[0])
    assert torch.equal(core, sampled(comfy, with_lora(comfy, base, lora_file)))
    assert not torch.equal(core, sampled(comfy, base))


def test_a_lora_on_no_packed_layer_runs_as_before(comfy, mods, files, tmp_path):
    """A patch on a high-precision layer (the head) is merged by core as usual."""
    base = packed(mods, files)
    head = base.model.diffusion_model.head.head
    clone = base.clone()
    clone.add_patches({"diffusion_model.head.head.weight": (torch.full_like(head.weight, 0.01),)}, 1.0)
    out = sampled(comfy, clone)
    assert not torch.equal(out, sampled(comfy, base))
    assert all(m.hif4.bypass == [] for m in mods["loader"].packed_modules(clone).values())


def test_non_lora_patches_on_a_bypassed_layer_are_merged_with_a_log_line(comfy, mods, files, caplog):
    base = packed(mods, files)
    m = layer(base)
    codes = m.weight.detach().clone()
    delta = torch.randn(m.out_features, m.in_features, generator=torch.Generator().manual_seed(3)) * 0.02
    clone = base.clone()
    clone.add_patches({KEY: (delta,)}, 1.0)  # a full diff
    with caplog.at_level(logging.INFO, logger="hifloat4"), prepared(comfy, clone, inputs()[0].shape):
        real_w = dequantize_packed(codes, m.in_features, m.hif4_mask, m.hif4.rotation)
        assert torch.equal(m.weight, planar_weight(real_w + delta, m.hif4_mask, m.hif4.rotation))
        assert m.hif4.bypass is None
    assert "other than plain LoRAs" in caplog.text and LAYER in caplog.text


# --------------------------------------------------------------------------- merge

def test_merge_packs_the_merged_weight_and_unpatching_restores_the_codes(comfy, mods, files, lora_file):
    base = packed(mods, files, lora="merge")
    m = layer(base)
    codes = m.weight.detach().clone()
    clone = with_lora(comfy, base, lora_file)
    comfy["comfy.model_management"].load_models_gpu([clone])
    assert torch.equal(m.weight, expected_merge(comfy, m, codes, lora_file))
    clone.unpatch_model()
    assert torch.equal(m.weight, codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_convert_weight_reads_codes_in_any_lora_compute_dtype(comfy, mods, files, dtype):
    """ComfyUI casts the codes to its LoRA compute dtype (fp32, fp16 on GPUs) before
    convert_weight: every byte value survives the cast."""
    m = layer(packed(mods, files, lora="merge"))
    codes = m.weight.detach()
    assert torch.equal(m.convert_weight(codes.to(dtype)), m.convert_weight(codes))
    assert torch.equal(m.set_weight(m.convert_weight(codes), return_weight=True),
                       planar_weight(dequantize_packed(codes, m.in_features, m.hif4_mask, m.hif4.rotation),
                                     m.hif4_mask, m.hif4.rotation))


def test_merged_lora_changes_the_output_and_moves_it_toward_unquantized_plus_lora(comfy, mods, files, load_unet,
                                                                                  lora_file):
    base = packed(mods, files, lora="merge")
    plain = sampled(comfy, base)
    merged = sampled(comfy, with_lora(comfy, base, lora_file))
    reference = sampled(comfy, with_lora(comfy, load_unet(T2V_HIGH), lora_file))
    assert not torch.equal(merged, plain)
    assert distance(merged, reference) < distance(plain, reference)


# --------------------------------------------------------------------------- lowvram, Dynamic VRAM

def lowvram_sampled(comfy, patcher, monkeypatch):
    """`sampled` with ComfyUI's lowvram load (every layer's patch left to its forward as
    a LowVramPatch), which a CPU run never picks on its own."""
    mm = comfy["comfy.model_management"]

    def load_lowvram(models, *args, **kwargs):
        models[0].load(torch.device("cpu"), lowvram_model_memory=1)

    monkeypatch.setattr(mm, "load_models_gpu", load_lowvram)
    try:
        return sampled(comfy, patcher)
    finally:
        monkeypatch.undo()
        patcher.unpatch_model()


@pytest.mark.parametrize("mode", ["bypass", "merge"])
def test_lowvram_gives_the_full_loads_output(comfy, mods, files, lora_file, monkeypatch, mode):
    clone = with_lora(comfy, packed(mods, files, lora=mode), lora_file)
    full = sampled(comfy, clone)
    comfy["comfy.model_management"].unload_all_models()
    low = lowvram_sampled(comfy, clone, monkeypatch)
    assert torch.equal(low, full)


def test_lowvram_merge_leaves_the_stored_codes_alone(comfy, mods, files, lora_file, monkeypatch):
    base = packed(mods, files, lora="merge")
    codes = layer(base).weight.detach().clone()
    lowvram_sampled(comfy, with_lora(comfy, base, lora_file), monkeypatch)
    assert torch.equal(layer(base).weight, codes)


def test_dynamic_vram_patch_attribute_is_merged_in_the_forward(comfy, mods, files, lora_file):
    """ModelPatcherDynamic leaves a layer's patches as `weight_lowvram_function` (a
    LowVramPatch), which core would apply to the codes; the packed forward merges them."""
    if not hasattr(comfy["comfy.lora"], "prefetch_prepared_value"):
        pytest.skip("this ComfyUI has no Dynamic VRAM (comfy.lora.prefetch_prepared_value)")
    base = packed(mods, files, lora="merge")
    clone = with_lora(comfy, base, lora_file)
    m = layer(clone)
    x = torch.randn(2, 5, m.in_features)
    m.weight_lowvram_function = comfy["comfy.model_patcher"].LowVramPatch(KEY, clone.patches)
    try:
        with torch.inference_mode():
            y = m(x)
            comfy["comfy.model_management"].load_models_gpu([clone])  # the full load's merge
            m.weight_lowvram_function = None
            assert torch.equal(y, m(x))
    finally:
        m.weight_lowvram_function = None


def test_other_weight_functions_are_refused_in_the_forward(comfy, mods, files):
    m = layer(packed(mods, files))
    m.weight_function = [lambda w: w]
    try:
        with pytest.raises(RuntimeError, match="weight function other than ComfyUI's LoRA patch"):
            m(torch.randn(1, 3, m.in_features))
    finally:
        m.weight_function = []


# --------------------------------------------------------------------------- packed Apply

@pytest.mark.parametrize("mode", ["bypass", "merge"])
def test_a_lora_after_packed_apply_acts_as_on_the_loaded_file(comfy, mods, files, load_unet, lora_file, mode):
    applied_model = applied(mods, load_unet(T2V_HIGH), files["state"], weights="packed", lora=mode)
    after_apply = sampled(comfy, with_lora(comfy, applied_model, lora_file))
    assert torch.equal(after_apply, sampled(comfy, with_lora(comfy, packed(mods, files, mode), lora_file)))
    assert not torch.equal(after_apply, sampled(comfy, applied_model))
