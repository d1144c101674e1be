"""The facts docs/native_comfyui_layout.md states about a HiF4 comfy_kitchen layout on
current ComfyUI, checked with the prototype in layout_probe.py (skipped where ComfyUI has
no layout registry, e.g. 0.3.64): a plugin can register the layout and its linear op; the
layout computes the packed ops' bits; core's LoRA merge re-quantizes in the real basis;
core's lowvram LoRA path runs the layer unquantized; core's loader refuses the format."""
import importlib

import pytest
import torch
from test_packed_inprocess import run

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def probe(comfy):
    lp = importlib.import_module("layout_probe")
    if not lp.AVAILABLE:
        pytest.skip("this ComfyUI has no quantization layout registry (comfy.quant_ops.register_layout_op)")
    lp.register()
    return lp


@pytest.fixture(scope="module")
def files(probe, tmp_path_factory):
    from hifloat4.rotation import Rotation
    out = {}
    for name, rotation in (("plain", None), ("rotated", Rotation(64, 3))):
        d = tmp_path_factory.mktemp(name)
        out[name] = probe.export_tiny(d, rotation)
    return out


def layout_model(comfy, probe, path):
    """The layout path's MODEL in the dtype ComfyUI gives the plugin's own packed model."""
    dtype = comfy["packed_loader"].load_packed_model(str(path)).model.get_dtype()
    return probe.load_layout_model(str(path), comfy["packed_ops"].placeholder, dtype)


def lora(comfy, model, tmp_path):
    import harness
    path = tmp_path / "lora.safetensors"
    harness.write_lora(path, [f"blocks.{i}.{n}" for i in range(4) for n in ("self_attn.q", "ffn.0", "ffn.2")])
    sd = comfy["comfy.sd"].comfy.utils.load_torch_file(str(path))
    return comfy["comfy.sd"].load_lora_for_models(model, None, sd, 1.0, 0)[0]


@pytest.mark.parametrize("kind", ["plain", "rotated"])
def test_layout_model_computes_the_packed_ops_bits(comfy, probe, files, kind):
    plugin = comfy["packed_loader"].load_packed_model(str(files[kind]))
    layout = layout_model(comfy, probe, files[kind])
    assert isinstance(layout.model.diffusion_model.blocks[0].ffn[0].weight, probe.cq.QuantizedTensor)
    for seed in (0, 1):
        assert torch.equal(run(comfy, layout, seed), run(comfy, plugin, seed))


@pytest.mark.parametrize("kind", ["plain", "rotated"])
def test_dequantize_returns_the_real_weight(comfy, probe, files, kind):
    from hifloat4 import packed_linear as hpacked
    from hifloat4.rotation import rotate
    w = layout_model(comfy, probe, files[kind]).model.diffusion_model.blocks[1].ffn[2].weight
    p = w.params
    real = w.dequantize().float()
    stored = hpacked.decode_weight(w._qdata, p.orig_shape[1], torch.float32)  # Q(rot(W / m))
    back = real / p.mask if p.rotation is None else rotate(real / p.mask, p.rotation)
    assert torch.allclose(back, stored, rtol=1e-5, atol=1e-6)


def test_requantizing_a_dequantized_weight_moves_some_values(comfy, probe, files):
    """HiF4 rounding is not idempotent (a group's small scales follow its sub-group maxima,
    which rounding moves), so core's merge re-rounds the unpatched part of W too."""
    from hifloat4 import packed_linear as hpacked
    w = layout_model(comfy, probe, files["plain"]).model.diffusion_model.blocks[1].ffn[2].weight
    again = w.requantize_from_float(w.dequantize().float())
    values = [hpacked.decode_weight(q, w.shape[1], torch.float32) for q in (w._qdata, again._qdata)]
    assert torch.equal(w.dequantize().float() / w.params.mask, values[0])  # the mask round trip is exact here
    assert not torch.equal(values[1], values[0])


def test_core_lora_merge_requantizes_the_patched_real_weight(comfy, probe, files, tmp_path):
    from hifloat4 import packed_linear as hpacked
    model = layout_model(comfy, probe, files["rotated"])
    before = run(comfy, model)
    patched = lora(comfy, model, tmp_path)
    key = "diffusion_model.blocks.2.ffn.0.weight"
    layer = model.model.diffusion_model.blocks[2].ffn[0]
    original = layer.weight
    expected = hpacked.planar_weight(
        comfy["comfy.lora"].calculate_weight(patched.patches[key], original.dequantize().float(), key),
        original.params.mask, original.params.rotation)
    after = run(comfy, patched)  # ModelPatcher.patch_weight_to_device -> set_weight -> requantize_from_float
    assert isinstance(layer.weight, probe.cq.QuantizedTensor) and torch.equal(layer.weight._qdata, expected)
    assert not torch.equal(after, before)
    patched.unpatch_model()
    assert torch.equal(layer.weight._qdata, original._qdata)  # the backup is the QuantizedTensor


def test_a_lowvram_weight_function_makes_core_run_the_layer_unquantized(comfy, probe, files):
    """Non-dynamic lowvram puts a LoRA into `weight_function` (model_patcher.load:
    LowVramPatch); MixedPrecisionOps.forward then dequantizes and runs F.linear on the
    unquantized input: no HiF4 activation quantization."""
    layer = layout_model(comfy, probe, files["plain"]).model.diffusion_model.blocks[0].ffn[0]
    x = torch.randn(1, 5, layer.in_features)
    with torch.inference_mode():  # as ComfyUI samples
        w4a4 = layer(x)
        layer.weight_function = [lambda w: w]  # a LoRA of strength 0, as lowvram installs one
        try:
            unquantized = layer(x)
        finally:
            layer.weight_function = []
        assert not torch.equal(unquantized, w4a4)
        assert torch.equal(unquantized, torch.nn.functional.linear(x, layer.weight.dequantize(), layer.bias))


def test_layout_runs_w4a4_when_f_linear_decomposes_outside_inference_mode(comfy, probe, files):
    """With autograd on, F.linear reaches the layout as aten.t + mm/addmm, not aten.linear;
    without those ops registered, the QuantizedTensor would silently dequantize."""
    layer = layout_model(comfy, probe, files["plain"]).model.diffusion_model.blocks[0].ffn[0]
    x = torch.randn(1, 5, layer.in_features)
    with torch.inference_mode():
        expected = layer(x)
    assert torch.equal(layer(x), expected)


def test_core_loader_refuses_the_registered_format(comfy, probe):
    """Registering a layout and a QUANT_ALGOS entry does not make core's loader read it:
    comfy.ops._load_quantized_module's per-format chain is closed."""
    import json
    ops = comfy["comfy.ops"].mixed_precision_ops({}, torch.float32)
    layer = ops.Linear(64, 8, bias=False)
    conf = torch.tensor(list(json.dumps({"format": probe.FORMAT}).encode()), dtype=torch.uint8)
    sd = {"weight": torch.zeros(8, 36, dtype=torch.uint8), "comfy_quant": conf}
    with pytest.raises(ValueError, match="Unsupported quantization format: hif4_packed"):
        layer.load_state_dict(sd, strict=False)
