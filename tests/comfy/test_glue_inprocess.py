"""nodes/comfy_glue.py against ComfyUI's real ModelPatcher, ops and LoRA code, in
this process (needs ComfyUI's dependencies in this interpreter, e.g. the ComfyUI
venv). Exactness: every quantized path equals hifloat4.linear's reference bits."""
import os

import pytest
import torch

import harness

pytestmark = pytest.mark.comfyui
T2V_HIGH = "tiny_wan2.2_t2v_high_noise.safetensors"
LAYER = "blocks.1.ffn.0"


@pytest.fixture
def model(load_unet):
    return load_unet(T2V_HIGH)


def masks_for(glue, model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = glue.linear_modules(model, names)
    return {n: torch.rand(mods[n].in_features, generator=g) * 2 + 0.25 for n in names}


def layer(glue, model, name=LAYER):
    return glue.linear_modules(model, [name])[name]


def load(comfy, patcher):
    comfy["comfy.model_management"].load_models_gpu([patcher])


def reference(comfy, x, weight, bias, mask):
    L = comfy["linear"]
    return torch.nn.functional.linear(L.prepare_activation(x, mask), L.prepare_weight(weight, mask), bias)


# --------------------------------------------------------------------------- apply

def test_quantized_clone_computes_the_reference_bits(comfy, model):
    glue = comfy["glue"]
    masks = masks_for(glue, model, [LAYER])
    m = layer(glue, model)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, glue.apply_w4a4(model, masks, lambda n, k: None))
    with torch.no_grad():
        assert torch.equal(m(x), reference(comfy, x, w0, m.bias, masks[LAYER]))


def test_rotation_is_applied_to_both_weight_and_activation(comfy, model):
    from hifloat4.rotation import Rotation
    glue, L = comfy["glue"], comfy["linear"]
    masks = masks_for(glue, model, [LAYER])
    m = layer(glue, model)
    rot = Rotation(block=256, seed=5)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, glue.apply_w4a4(model, masks, lambda n, k: rot))
    with torch.no_grad():
        expected = torch.nn.functional.linear(L.prepare_activation(x, masks[LAYER], rot),
                                              L.prepare_weight(w0, masks[LAYER], rot), m.bias)
        assert torch.equal(m(x), expected)


def test_loading_the_input_model_again_restores_bf16_behaviour(comfy, model):
    glue = comfy["glue"]
    m = layer(glue, model)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, glue.apply_w4a4(model, masks_for(glue, model, [LAYER]), lambda n, k: None))
    load(comfy, model)
    with torch.no_grad():
        assert torch.equal(m(x), torch.nn.functional.linear(x, w0, m.bias))
    assert "forward" not in m.__dict__ or not isinstance(m.__dict__["forward"], glue.QuantizedForward)


def test_apply_leaves_the_input_patcher_untouched(comfy, model):
    glue = comfy["glue"]
    before = (dict(model.patches), dict(model.object_patches), model.patches_uuid, repr(model.wrappers))
    glue.apply_w4a4(model, masks_for(glue, model, [LAYER]), lambda n, k: None)
    assert (dict(model.patches), dict(model.object_patches), model.patches_uuid, repr(model.wrappers)) == before


def test_applying_twice_is_refused(comfy, model):
    glue = comfy["glue"]
    masks = masks_for(glue, model, [LAYER])
    once = glue.apply_w4a4(model, masks, lambda n, k: None)
    with pytest.raises(ValueError, match="already"):
        glue.apply_w4a4(once, masks, lambda n, k: None)


def test_weight_adapter_in_the_lowvram_path_gets_bf16_and_returns_exact_bf16(comfy, model):
    glue = comfy["glue"]
    masks = masks_for(glue, model, [LAYER])
    clone = glue.apply_w4a4(model, masks, lambda n, k: None)
    key = glue.weight_key(LAYER)
    w = layer(glue, model).weight.detach().to(torch.bfloat16)
    patched = comfy["comfy.model_patcher"].LowVramPatch(key, clone.patches)(w.clone())
    expected = comfy["linear"].prepare_weight(w, masks[LAYER])
    assert patched.dtype == torch.bfloat16 and torch.equal(patched.float(), expected)


def test_fingerprint_reads_original_weights_while_a_quantized_clone_is_loaded(comfy, model):
    glue = comfy["glue"]
    before = glue.model_fingerprint(model)
    names = ["blocks.0.self_attn.q", "blocks.0.ffn.2", "blocks.2.ffn.2", "blocks.3.self_attn.q"]
    load(comfy, glue.apply_w4a4(model, masks_for(glue, model, names), lambda n, k: None))
    assert glue.model_fingerprint(model) == before


# --------------------------------------------------------------------------- LoRA order and hooks

def test_weight_patch_added_after_ours_is_moved_before_the_quantization(comfy, model):
    glue = comfy["glue"]
    masks = masks_for(glue, model, [LAYER])
    clone = glue.apply_w4a4(model, masks, lambda n, k: None)
    key = glue.weight_key(LAYER)
    w = layer(glue, model).weight.detach().clone()
    diff = torch.randn_like(w) * 0.05
    clone.add_patches({key: ("diff", (diff,))})
    uid = clone.patches_uuid
    assert glue.order_quantization_last(clone) is True and clone.patches_uuid != uid
    got = comfy["comfy.lora"].calculate_weight(clone.patches[key], w.clone(), key)
    assert torch.equal(got, comfy["linear"].prepare_weight(w + diff, masks[LAYER]))
    uid = clone.patches_uuid
    assert glue.order_quantization_last(clone) is False and clone.patches_uuid == uid


def test_hook_patches_on_quantized_layers_are_refused(comfy, model):
    glue = comfy["glue"]
    clone = glue.apply_w4a4(model, masks_for(glue, model, [LAYER]), lambda n, k: None)
    clone.hook_patches = {object(): {glue.weight_key(LAYER): [(1.0, ("diff", (torch.zeros(1),)), 1.0, None, None)]}}
    with pytest.raises(ValueError, match="hook"):
        glue.order_quantization_last(clone)


# --------------------------------------------------------------------------- fp8 scaled

def test_scaled_fp8_layer_quantizes_its_dequantized_weight_per_forward(comfy):
    glue, ops = comfy["glue"], comfy["comfy.ops"]
    lin = ops.scaled_fp8_ops(override_dtype=torch.float8_e4m3fn).Linear(128, 64, bias=True)
    w = torch.randn(64, 128) * 0.02
    scale = w.abs().max() / 448
    lin.weight = torch.nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
    lin.scale_weight = torch.nn.Parameter(scale.reshape(()), requires_grad=False)
    lin.bias = torch.nn.Parameter(torch.randn(64), requires_grad=False)
    assert glue.weight_mode(lin) == "forward"
    mask = torch.rand(128) + 0.5
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        got = glue.QuantizedForward(lin, mask, None, "forward")(x)
    dequantized = lin.weight.float() * lin.scale_weight
    assert torch.equal(got, reference(comfy, x, dequantized, lin.bias, mask))


# --------------------------------------------------------------------------- calibration

def test_observers_feed_statistics_and_leave_outputs_unchanged(comfy, model):
    glue = comfy["glue"]
    m = layer(glue, model)
    x = torch.randn(2, 7, m.in_features)
    with glue.CalibrationSession(model, 99.0) as session:
        load(comfy, session.clone)
        with torch.no_grad():
            y = m(x)
        stats = session.observers[LAYER].stats
        assert stats.calls == 1 and torch.equal(stats.absmax, x.abs().amax(dim=(0, 1)))
    assert torch.equal(y, torch.nn.functional.linear(x, m.weight, m.bias))


def test_observers_are_removed_when_calibration_fails(comfy, model):
    glue = comfy["glue"]
    m = layer(glue, model)
    with pytest.raises(RuntimeError, match="boom"):
        with glue.CalibrationSession(model, 99.9) as session:
            load(comfy, session.clone)
            assert isinstance(m.__dict__.get("forward"), glue._Observer)
            raise RuntimeError("boom")
    assert not isinstance(m.__dict__.get("forward"), glue._Observer)
    assert not session.active


def test_calib_states_folder_is_registered_for_safetensors(comfy):
    folder_paths = comfy["folder_paths"]
    paths, exts = folder_paths.folder_names_and_paths["calib_states"]
    assert paths[0] == os.path.abspath(os.path.join(folder_paths.models_dir, "calib_states"))
    assert paths[-1] == str(harness.REPO / "calib_states") and exts == {".safetensors"}
