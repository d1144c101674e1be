"""nodes/comfy (weights, w4a4, calibration) against ComfyUI's real ModelPatcher, ops and LoRA code, in
this process (needs ComfyUI's dependencies in this interpreter, e.g. the ComfyUI
venv). Exactness: every quantized path equals hifloat4.linear's reference bits."""
import os

import pytest
import torch

import harness
from hifloat4.calibrate import CalibConfig

pytestmark = pytest.mark.comfyui
T2V_HIGH = "tiny_wan2.2_t2v_high_noise.safetensors"
LAYER = "blocks.1.ffn.0"


@pytest.fixture
def model(load_unet):
    return load_unet(T2V_HIGH)


def masks_for(comfy, model, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = comfy["weights"].linear_modules(model, names)
    return {n: torch.rand(mods[n].in_features, generator=g) * 2 + 0.25 for n in names}


def quants(masks, rotation=None):
    """{layer: LayerQuant} as hifloat4.plan hands them to w4a4.apply_w4a4."""
    from hifloat4.linear import LayerQuant
    return {n: LayerQuant(m, rotation) for n, m in masks.items()}


def layer(comfy, model, name=LAYER):
    return comfy["weights"].linear_modules(model, [name])[name]


def load(comfy, patcher):
    comfy["comfy.model_management"].load_models_gpu([patcher])


def reference(comfy, x, weight, bias, mask):
    L = comfy["linear"]
    return torch.nn.functional.linear(L.prepare_activation(x, mask), L.prepare_weight(weight, mask), bias)


# --------------------------------------------------------------------------- apply

def test_quantized_clone_computes_the_reference_bits(comfy, model):
    masks = masks_for(comfy, model, [LAYER])
    m = layer(comfy, model)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, comfy["w4a4"].apply_w4a4(model, quants(masks, None)))
    with torch.no_grad():
        assert torch.equal(m(x), reference(comfy, x, w0, m.bias, masks[LAYER]))


def test_rotation_is_applied_to_both_weight_and_activation(comfy, model):
    from hifloat4.rotation import Rotation
    L = comfy["linear"]
    masks = masks_for(comfy, model, [LAYER])
    m = layer(comfy, model)
    rot = Rotation(block=256, seed=5)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, comfy["w4a4"].apply_w4a4(model, quants(masks, rot)))
    with torch.no_grad():
        expected = torch.nn.functional.linear(L.prepare_activation(x, masks[LAYER], rot),
                                              L.prepare_weight(w0, masks[LAYER], rot), m.bias)
        assert torch.equal(m(x), expected)


def test_loading_the_input_model_again_restores_bf16_behaviour(comfy, model):
    m = layer(comfy, model)
    w0, x = m.weight.detach().clone(), torch.randn(2, 9, m.in_features)
    load(comfy, comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, [LAYER]), None)))
    load(comfy, model)
    with torch.no_grad():
        assert torch.equal(m(x), torch.nn.functional.linear(x, w0, m.bias))
    assert "forward" not in m.__dict__ or not isinstance(m.__dict__["forward"], comfy["w4a4"].QuantizedForward)


def test_apply_leaves_the_input_patcher_untouched(comfy, model):
    before = (dict(model.patches), dict(model.object_patches), model.patches_uuid, repr(model.wrappers))
    comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, [LAYER]), None))
    assert (dict(model.patches), dict(model.object_patches), model.patches_uuid, repr(model.wrappers)) == before


def test_applying_twice_is_refused(comfy, model):
    masks = masks_for(comfy, model, [LAYER])
    once = comfy["w4a4"].apply_w4a4(model, quants(masks, None))
    with pytest.raises(ValueError, match="already"):
        comfy["w4a4"].apply_w4a4(once, quants(masks, None))


def test_weight_adapter_in_the_lowvram_path_gets_bf16_and_returns_exact_bf16(comfy, model):
    masks = masks_for(comfy, model, [LAYER])
    clone = comfy["w4a4"].apply_w4a4(model, quants(masks, None))
    key = comfy["weights"].weight_key(LAYER)
    w = layer(comfy, model).weight.detach().to(torch.bfloat16)
    patched = comfy["comfy.model_patcher"].LowVramPatch(key, clone.patches)(w.clone())
    expected = comfy["linear"].prepare_weight(w, masks[LAYER])
    assert patched.dtype == torch.bfloat16 and torch.equal(patched.float(), expected)


def test_fingerprint_reads_original_weights_while_a_quantized_clone_is_loaded(comfy, model):
    before = comfy["weights"].model_fingerprint(model)
    names = ["blocks.0.self_attn.q", "blocks.0.ffn.2", "blocks.2.ffn.2", "blocks.3.self_attn.q"]
    load(comfy, comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, names), None)))
    assert comfy["weights"].model_fingerprint(model) == before


# --------------------------------------------------------------------------- LoRA order and hooks

def test_weight_patch_added_after_ours_is_moved_before_the_quantization(comfy, model):
    masks = masks_for(comfy, model, [LAYER])
    clone = comfy["w4a4"].apply_w4a4(model, quants(masks, None))
    key = comfy["weights"].weight_key(LAYER)
    w = layer(comfy, model).weight.detach().clone()
    diff = torch.randn_like(w) * 0.05
    clone.add_patches({key: ("diff", (diff,))})
    uid = clone.patches_uuid
    assert comfy["w4a4"].order_quantization_last(clone) is True and clone.patches_uuid != uid
    got = comfy["comfy.lora"].calculate_weight(clone.patches[key], w.clone(), key)
    assert torch.equal(got, comfy["linear"].prepare_weight(w + diff, masks[LAYER]))
    uid = clone.patches_uuid
    assert comfy["w4a4"].order_quantization_last(clone) is False and clone.patches_uuid == uid


def test_hook_patches_on_quantized_layers_are_refused(comfy, model):
    clone = comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, [LAYER]), None))
    key = comfy["weights"].weight_key(LAYER)
    clone.hook_patches = {object(): {key: [(1.0, ("diff", (torch.zeros(1),)), 1.0, None, None)]}}
    with pytest.raises(ValueError, match="hook"):
        comfy["w4a4"].order_quantization_last(clone)


# --------------------------------------------------------------------------- fp8 scaled sources

FP8_HIGH = "tiny_wan2.2_t2v_high_noise_fp8_scaled.safetensors"


def fp8_file_weight(name):
    """The real values an fp8_scaled file stores for a layer: fp8 weight * scale_weight."""
    from safetensors import safe_open
    path = os.path.join(os.environ["COMFY_HARNESS_MODELS"], "diffusion_models", FP8_HIGH)
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(f"{name}.weight").float() * f.get_tensor(f"{name}.scale_weight").float()


def test_fp8_scaled_layers_are_read_as_their_dequantized_real_values(comfy, load_unet):
    model = load_unet(FP8_HIGH)
    m = layer(comfy, model)  # 0.3.64: scaled_fp8 nn.Linear; current: MixedPrecisionOps.Linear (QuantizedTensor)
    assert comfy["weights"].weight_mode(m) == "forward"
    assert torch.equal(comfy["weights"].original_weight(model, LAYER, m), fp8_file_weight(LAYER))


def test_fp8_scaled_model_runs_q_of_its_dequantized_weight(comfy, load_unet):
    model = load_unet(FP8_HIGH)
    masks = masks_for(comfy, model, [LAYER])
    m = layer(comfy, model)
    x = torch.randn(2, 9, m.in_features)
    load(comfy, comfy["w4a4"].apply_w4a4(model, quants(masks, None)))
    with torch.no_grad():
        assert torch.equal(m(x), reference(comfy, x, fp8_file_weight(LAYER), m.bias.float(), masks[LAYER]))


def test_fp8_weights_are_quantized_once_per_sampling_run(comfy, load_unet, monkeypatch):
    model = load_unet(FP8_HIGH)
    clone = comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, [LAYER]), None))
    calls = []
    real = comfy["w4a4"].hlinear.prepare_weight
    monkeypatch.setattr(comfy["w4a4"].hlinear, "prepare_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = layer(comfy, model)
    x = torch.randn(2, 9, m.in_features)
    load(comfy, clone)
    with torch.no_grad():
        first, second = m(x), m(x)
    assert len(calls) == 1 and torch.equal(first, second)
    release = clone.wrappers[comfy["comfy.patcher_extension"].WrappersMP.OUTER_SAMPLE][comfy["weights"].PLUGIN_KEY][0]
    release(lambda: None)  # the end of a sampling run drops the cached weights
    with torch.no_grad():
        assert torch.equal(m(x), first) and len(calls) == 2


def test_comfy_quant_formats_that_hif4_cannot_start_from_are_refused_by_name(comfy, model):
    m = layer(comfy, model)
    for fmt in ("int8_tensorwise", "nvfp4", "mxfp8"):
        m.quant_format = fmt  # what ComfyUI's mixed-precision ops record from a layer's comfy_quant entry
        with pytest.raises(ValueError, match=f"'{fmt}' quantized format"):
            comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, [LAYER]), None))
    del m.quant_format


def test_int8_layers_are_refused_because_the_ffn_bypasses_their_forward(comfy, model):
    if not hasattr(comfy["comfy.ops"], "linear_input_act"):
        pytest.skip("this ComfyUI has no INT8 ffn bypass (comfy.ops.linear_input_act)")
    m = layer(comfy, model, "blocks.0.ffn.2")
    m.quant_format = "int8_tensorwise"
    with pytest.raises(ValueError, match="linear_input_act"):
        comfy["w4a4"].apply_w4a4(model, quants(masks_for(comfy, model, ["blocks.0.ffn.2"]), None))
    del m.quant_format


# --------------------------------------------------------------------------- Dynamic VRAM

def test_weight_adapter_survives_the_dynamic_vram_rebuild_with_the_same_bits(comfy, model):
    from hifloat4.rotation import Rotation
    lora = comfy["comfy.lora"]
    if not hasattr(lora, "prefetch_prepared_value"):
        pytest.skip("this ComfyUI has no Dynamic VRAM (comfy.lora.prefetch_prepared_value)")
    mp = comfy["comfy.model_patcher"]
    masks = masks_for(comfy, model, [LAYER])
    rot = Rotation(block=256, seed=3)
    clone = comfy["w4a4"].apply_w4a4(model, quants(masks, rot))
    key = comfy["weights"].weight_key(LAYER)
    w = layer(comfy, model).weight.detach().to(torch.bfloat16)
    expected = comfy["linear"].prepare_weight(w, masks[LAYER], rot)
    patch = mp.LowVramPatch(key, clone.patches)
    size = patch.memory_required()
    assert size >= masks[LAYER].numel() * 4  # the mask travels in the prepared buffer
    patch.prepare(torch.empty(size, dtype=torch.uint8), None, copy=True)
    rebuilt = patch.prepared_patches[-1][1]
    assert type(rebuilt) is comfy["w4a4"].HiF4WeightAdapter and rebuilt is not clone.patches[key][-1][1]
    assert torch.equal(patch(w.clone()).float(), expected)


# --------------------------------------------------------------------------- calibration

def test_observers_feed_statistics_and_leave_outputs_unchanged(comfy, model):
    m = layer(comfy, model)
    x = torch.randn(2, 7, m.in_features)
    with comfy["calibration"].CalibrationSession(model, CalibConfig(percentile=99.0)) as session:
        load(comfy, session.clone)
        with torch.no_grad():
            y = m(x)
        observed = session.observers[LAYER].observation
        stats, sample = observed.stats, observed.sample
        assert stats.calls == 1 and torch.equal(stats.absmax, x.abs().amax(dim=(0, 1)))
        assert sample.calls == 1 and torch.equal(sample.tokens(), x.reshape(14, -1))
    assert torch.equal(y, torch.nn.functional.linear(x, m.weight, m.bias))


def test_observers_are_removed_when_calibration_fails(comfy, model):
    m = layer(comfy, model)
    with pytest.raises(RuntimeError, match="boom"):
        with comfy["calibration"].CalibrationSession(model, CalibConfig()) as session:
            load(comfy, session.clone)
            assert isinstance(m.__dict__.get("forward"), comfy["calibration"].Observer)
            raise RuntimeError("boom")
    assert not isinstance(m.__dict__.get("forward"), comfy["calibration"].Observer)
    assert not session.active


def test_calib_states_folder_is_registered_for_safetensors(comfy):
    folder_paths = comfy["folder_paths"]
    paths, exts = folder_paths.folder_names_and_paths["calib_states"]
    assert paths[0] == os.path.abspath(os.path.join(folder_paths.models_dir, "calib_states"))
    assert paths[-1] == str(harness.REPO / "calib_states") and exts == {".safetensors"}
