"""Packed HiF4 checkpoints in ComfyUI, in this process (needs ComfyUI's dependencies, e.g.
the ComfyUI venv): the loader gives the Apply node's bits without bf16 main weights,
weight hooks and re-quantization are refused, 'Save HiF4 Model' writes the same model
(with a LoRA merged before quantization). LoRAs after the loader:
test_packed_lora_inprocess.py."""
import importlib
import os
import pathlib

import harness
import pytest
import torch

pytestmark = pytest.mark.comfyui
T2V_HIGH = "tiny_wan2.2_t2v_high_noise.safetensors"
HIGH = "high_noise"


def harness_path(name):
    return pathlib.Path(os.environ["COMFY_HARNESS_MODELS"]) / "diffusion_models" / name


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A PTQ state calibrated with the core on the harness's high-noise expert, and that
    expert exported with `python -m hifloat4 export`."""
    from safetensors.torch import load_file

    from hifloat4 import export as hexp
    from hifloat4 import state as hstate
    from hifloat4.calibrate import CalibConfig, calibrate
    from hifloat4.tools.tiny_wan import example_inputs
    from hifloat4.wan_model import WanConfig, WanModel

    d = tmp_path_factory.mktemp("packed")
    model = WanModel(WanConfig()).eval().requires_grad_(False)
    model.load_state_dict(load_file(str(harness_path(T2V_HIGH))))
    x, t, ctx = example_inputs(model, text_len=24)
    state = calibrate({HIGH: model}, lambda: model(x, t, ctx), CalibConfig())
    paths = {"state": d / "state.safetensors", "packed": d / "t2v_high_hif4.safetensors"}
    hstate.save_state(paths["state"], state)
    assert hexp.main(["--model", str(harness_path(T2V_HIGH)), "--state", str(paths["state"]), "--out",
                      str(paths["packed"])]) == 0
    return paths


@pytest.fixture
def mods(comfy):
    return {"packed": importlib.import_module("comfyui_hifloat4.nodes.packed"),
            "loader": importlib.import_module("comfyui_hifloat4.nodes.comfy.packed_loader"),
            "weights": importlib.import_module("comfyui_hifloat4.nodes.comfy.weights"),
            "apply": importlib.import_module("comfyui_hifloat4.nodes.apply"),
            "policy": importlib.import_module("comfyui_hifloat4.nodes.policy"),
            "state": importlib.import_module("hifloat4.state"),
            "export": importlib.import_module("hifloat4.export"),
            "checkpoint": importlib.import_module("hifloat4.checkpoint")}


@pytest.fixture
def diffusion_dir(comfy, tmp_path, monkeypatch):
    monkeypatch.setitem(comfy["folder_paths"].folder_names_and_paths, "diffusion_models",
                        ([str(tmp_path)], {".safetensors"}))
    return tmp_path


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 16, 2, 8, 8, generator=g), torch.tensor([0.9, 0.6]),
            torch.randn(2, 24, 4096, generator=g) * 0.2)


def run(comfy, patcher, seed=0):
    comfy["comfy.model_management"].load_models_gpu([patcher])
    x, t, ctx = inputs(seed)
    with torch.inference_mode():
        return patcher.model.apply_model(x, t, c_crossattn=ctx)


def applied(mods, model, state_path, **choices):
    """Apply's MODEL (a node returning a UI warning returns {"ui", "result"})."""
    with torch.inference_mode():
        out = mods["apply"].HiF4ApplyW4A4().apply(model, mods["state"].load_state(state_path), HIGH, **choices)
    return (out["result"] if isinstance(out, dict) else out)[0]


def lora_model(comfy, model, tmp_path):
    path = tmp_path / "lora.safetensors"
    harness.write_lora(path, [f"blocks.{i}.{n}" for i in range(4) for n in ("self_attn.q", "ffn.0", "ffn.2")])
    lora = comfy["comfy.sd"].comfy.utils.load_torch_file(str(path))
    return comfy["comfy.sd"].load_lora_for_models(model, None, lora, 1.0, 0)[0]


# --------------------------------------------------------------------------- loading

def test_packed_model_computes_the_apply_nodes_bits(comfy, mods, files, load_unet):
    packed = mods["loader"].load_packed_model(str(files["packed"]))
    fake = applied(mods, load_unet(T2V_HIGH), files["state"])
    for seed in (0, 1):
        assert torch.equal(run(comfy, packed, seed), run(comfy, fake, seed))


def test_packed_model_holds_codes_not_the_unpacked_main_weights(comfy, mods, files, load_unet):
    packed = mods["loader"].load_packed_model(str(files["packed"]))
    plain = load_unet(T2V_HIGH)
    root = packed.model.diffusion_model
    q = root.blocks[0].ffn[0]
    assert q.weight.dtype == torch.uint8 and tuple(q.weight.shape) == (512, 4 * 36)  # planar rows
    assert root.head.head.weight.dtype == plain.model.diffusion_model.head.head.weight.dtype
    shapes = {tuple(t.shape) for t in list(root.parameters()) + list(root.buffers()) if t.is_floating_point()}
    assert (512, 256) not in shapes and (256, 512) not in shapes  # no float tensor of an ffn weight's shape
    assert len(mods["loader"].packed_layer_names(packed)) == 40
    assert packed.model_size() < 0.5 * plain.model_size()


def test_loader_refuses_a_checkpoint_missing_a_model_tensor(comfy, mods, files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(files["packed"]), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys() if k != "blocks.1.norm3.weight"}  # noqa: SIM118
        meta = f.metadata()
    save_file(t, str(tmp_path / "holey.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="missing blocks.1.norm3.weight"):  # the core's exact key set
        mods["loader"].load_packed_model(str(tmp_path / "holey.safetensors"))


def test_loader_refuses_a_checkpoint_with_an_extra_tensor(comfy, mods, files, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(files["packed"]), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    t["evil.weight"] = torch.zeros(1 << 20)
    save_file(t, str(tmp_path / "evil.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="unexpected evil.weight"):
        mods["loader"].load_packed_model(str(tmp_path / "evil.safetensors"))


def test_loader_lists_only_marked_files_and_validates_names(comfy, mods, files, diffusion_dir):
    node = mods["packed"].HiF4LoadDiffusionModel
    (diffusion_dir / "hif4").mkdir()
    os.symlink(files["packed"], diffusion_dir / "hif4" / "mine.safetensors")
    os.symlink(harness_path(T2V_HIGH), diffusion_dir / T2V_HIGH)
    assert node.INPUT_TYPES()["required"]["unet_name"][0] == ["hif4/mine.safetensors"]
    assert node.VALIDATE_INPUTS(input_types={}, unet_name="hif4/mine.safetensors") is True
    assert "not a packed HiF4 checkpoint" in node.VALIDATE_INPUTS(input_types={}, unet_name=T2V_HIGH)
    assert "not found" in node.VALIDATE_INPUTS(input_types={}, unet_name="nope.safetensors")
    assert "not found" in node.VALIDATE_INPUTS(input_types={}, unet_name="../../" + files["packed"].name)
    assert "are .safetensors files" in node.VALIDATE_INPUTS(input_types={}, unet_name="x.ckpt")
    model = node().load("hif4/mine.safetensors")[0]
    assert mods["loader"].is_packed_model(model)


# --------------------------------------------------------------------------- refusals

def test_weight_hooks_on_a_packed_model_are_refused_with_a_clear_message(comfy, mods, files):
    packed = mods["loader"].load_packed_model(str(files["packed"]))
    hooked = packed.clone()
    key = "diffusion_model.blocks.0.ffn.0.weight"
    hooked.hook_patches = {object(): {key: [(1.0, ("diff", (torch.zeros(1),)), 1.0, None, None)]}}
    with pytest.raises(ValueError, match="(?s)weight hooks .* not supported.*blocks.0.ffn.0"):
        mods["loader"].check_packed_model(hooked)  # our PREPARE_SAMPLING wrapper refuses them
    wrappers = hooked.wrappers["prepare_sampling"]
    assert mods["loader"].guard_wrapper in wrappers[mods["loader"].PACKED_KEY]
    mods["loader"].check_packed_model(packed)  # the original stays usable


def test_apply_on_a_packed_model_is_refused_before_sampling(comfy, mods, files):
    packed = mods["loader"].load_packed_model(str(files["packed"]))
    state = mods["state"].load_state(files["state"])
    with pytest.raises(ValueError, match="packed HiF4 checkpoint"), torch.inference_mode():
        mods["apply"].HiF4ApplyW4A4().apply(packed, state, HIGH)


def test_object_patches_on_packed_layers_are_refused(comfy, mods, files):
    packed = mods["loader"].load_packed_model(str(files["packed"]))
    clone = packed.clone()
    clone.add_object_patch("diffusion_model.blocks.0.ffn.0.forward", lambda x: x)
    with pytest.raises(ValueError, match="blocks.0.ffn.0"):
        mods["loader"].check_packed_model(clone)


# --------------------------------------------------------------------------- saving

def test_save_node_writes_the_same_model_as_the_cli(comfy, mods, files, load_unet, diffusion_dir):
    state = mods["state"].load_state(files["state"])
    out = mods["packed"].HiF4SaveModel().save(load_unet(T2V_HIGH), state, "auto", "hif4/t2v_high")
    assert out["ui"]["hifloat4_models"] == [{"filename": "t2v_high_00001.safetensors", "subfolder": "hif4",
                                             "type": "diffusion_models"}]
    saved = diffusion_dir / "hif4" / "t2v_high_00001.safetensors"
    a, b = mods["checkpoint"].load_hif4_checkpoint(saved), mods["checkpoint"].load_hif4_checkpoint(files["packed"])
    assert all(torch.equal(a.layers[n].weight.data, b.layers[n].weight.data) for n in b.layers)
    assert torch.equal(run(comfy, mods["loader"].load_packed_model(str(saved))),
                       run(comfy, mods["loader"].load_packed_model(str(files["packed"]))))
    again = mods["packed"].HiF4SaveModel().save(load_unet(T2V_HIGH), state, HIGH, "hif4/t2v_high")
    assert again["ui"]["hifloat4_models"][0]["filename"] == "t2v_high_00002.safetensors"


TUNED = {"alpha": 0.3, "statistic": "adaptive", "keep_high_precision": 3}


def test_save_with_tuned_choices_writes_the_model_apply_runs_with_them(comfy, mods, files, load_unet, diffusion_dir):
    state = mods["state"].load_state(files["state"])
    out = mods["packed"].HiF4SaveModel().save(load_unet(T2V_HIGH), state, "auto", "hif4/tuned", **TUNED)
    saved = diffusion_dir / "hif4" / out["ui"]["hifloat4_models"][0]["filename"]
    assert len(mods["checkpoint"].load_hif4_checkpoint(saved).kept) == 3
    assert any("kept unquantized" in t for t in out["ui"]["text"])
    tuned = applied(mods, load_unet(T2V_HIGH), files["state"], **TUNED)
    plain = applied(mods, load_unet(T2V_HIGH), files["state"])
    packed = mods["loader"].load_packed_model(str(saved))
    assert torch.equal(run(comfy, packed), run(comfy, tuned))
    assert not torch.equal(run(comfy, tuned), run(comfy, plain))


def test_apply_names_the_layers_it_keeps_in_high_precision(comfy, mods, files, load_unet):
    state = mods["state"].load_state(files["state"])
    with torch.inference_mode():
        out = mods["apply"].HiF4ApplyW4A4().apply(load_unet(T2V_HIGH), state, HIGH, keep_high_precision=2)
    plan = mods["weights"].plan_for(load_unet(T2V_HIGH), mods["policy"].w4a4_config(state, HIGH, keep_high_precision=2))
    (text,) = out["ui"]["text"]
    assert len(plan.kept) == 2 and all(n in text for n in plan.kept) and "MB" in text
    patched = {k for k in out["result"][0].object_patches if k.endswith(".forward")}
    assert all(f"diffusion_model.{n}.forward" not in patched for n in plan.kept)
    assert len(patched) == len(plan.layers)


def test_save_node_packs_an_fp8_scaled_model_like_the_cli(comfy, mods, files, load_unet, diffusion_dir):
    """0.3.64 loads fp8_scaled files as scale_weight layers, current ComfyUI as comfy_quant
    QuantizedTensor layers with weight_scale keys; both must pack the dequantized weights."""
    fp8 = "tiny_wan2.2_t2v_high_noise_fp8_scaled.safetensors"
    cli = diffusion_dir / "cli_fp8.safetensors"
    assert mods["export"].main(["--model", str(harness_path(fp8)), "--state", str(files["state"]),
                                "--expert", HIGH, "--out", str(cli)]) == 0
    state = mods["state"].load_state(files["state"])
    mods["packed"].HiF4SaveModel().save(load_unet(fp8), state, HIGH, "fp8")
    a = mods["checkpoint"].load_hif4_checkpoint(diffusion_dir / "fp8_00001.safetensors")
    b = mods["checkpoint"].load_hif4_checkpoint(cli)
    assert set(a.tensors) == set(b.tensors) and not any(k.endswith(("scale", "comfy_quant")) for k in a.tensors)
    assert all(torch.equal(a.layers[n].weight.data, b.layers[n].weight.data) for n in b.layers)
    # the other tensors are those ComfyUI runs, dequantized exactly, so the file computes what Apply on the
    # same MODEL computes, up to rounding order (0.3.64's scaled fp8 op scales the input instead of the weight)
    got = run(comfy, mods["loader"].load_packed_model(str(diffusion_dir / "fp8_00001.safetensors")))
    want = run(comfy, applied(mods, load_unet(fp8), files["state"]))
    assert (got - want).norm() / want.norm() < 1e-5


def test_save_node_merges_a_lora_before_quantization(comfy, mods, files, load_unet, diffusion_dir, tmp_path):
    state = mods["state"].load_state(files["state"])
    base = load_unet(T2V_HIGH)
    with_lora = lora_model(comfy, base, tmp_path)
    mods["packed"].HiF4SaveModel().save(with_lora, state, HIGH, "lora_merged")
    packed = mods["loader"].load_packed_model(str(diffusion_dir / "lora_merged_00001.safetensors"))
    fake = applied(mods, with_lora, files["state"])
    plain = applied(mods, base, files["state"])
    assert torch.equal(run(comfy, packed), run(comfy, fake))
    assert not torch.equal(run(comfy, packed), run(comfy, plain))


def test_save_node_refuses_packed_applied_and_escaping_names(comfy, mods, files, load_unet, diffusion_dir):
    state = mods["state"].load_state(files["state"])
    node = mods["packed"].HiF4SaveModel()
    with pytest.raises(ValueError, match="already a packed HiF4 model"):
        node.save(mods["loader"].load_packed_model(str(files["packed"])), state, HIGH, "x")
    with pytest.raises(ValueError, match="before 'Apply HiFloat4 W4A4'"):
        node.save(applied(mods, load_unet(T2V_HIGH), files["state"]), state, HIGH, "x")
    for prefix in ("../escape", "/abs/x", "sub/../../x"):
        with pytest.raises(ValueError, match="inside"):
            node.save(load_unet(T2V_HIGH), state, HIGH, prefix)
    assert sorted(p.name for p in diffusion_dir.rglob("*")) == []


def test_save_node_errors_name_diffusion_models_and_refuse_a_symlinked_subfolder(comfy, mods, files, load_unet,
                                                                                  diffusion_dir):
    state = mods["state"].load_state(files["state"])
    node = mods["packed"].HiF4SaveModel()
    with pytest.raises(ValueError, match="inside diffusion_models"):
        node.save(load_unet(T2V_HIGH), state, HIGH, "../escape")
    outside = diffusion_dir.parent / (diffusion_dir.name + "_outside")
    outside.mkdir()
    (diffusion_dir / "linked").symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside diffusion_models"):
        node.save(load_unet(T2V_HIGH), state, HIGH, "linked/x")
    assert list(outside.iterdir()) == []


def test_cancel_during_save_leaves_no_file(comfy, mods, files, load_unet, diffusion_dir):
    mm = comfy["comfy.model_management"]
    state = mods["state"].load_state(files["state"])
    model = load_unet(T2V_HIGH)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            mods["packed"].HiF4SaveModel().save(model, state, HIGH, "cancelled")
    finally:
        mm.interrupt_current_processing(False)
    assert list(diffusion_dir.rglob("*")) == []


def test_loader_list_skips_a_fifo_and_a_hostile_header(comfy, mods, files, diffusion_dir):
    os.symlink(files["packed"], diffusion_dir / "mine.safetensors")
    os.mkfifo(diffusion_dir / "pipe.safetensors")
    deep = b"[" * 100_000 + b"]" * 100_000
    (diffusion_dir / "deep.safetensors").write_bytes(len(deep).to_bytes(8, "little") + deep)
    node = mods["packed"].HiF4LoadDiffusionModel
    assert node.INPUT_TYPES()["required"]["unet_name"][0] == ["mine.safetensors"]
    assert "not a packed HiF4 checkpoint" in node.VALIDATE_INPUTS(input_types={}, unet_name="deep.safetensors")
    assert node.VALIDATE_INPUTS(input_types={}, unet_name="pipe.safetensors") is not True


def test_calibrate_refuses_a_packed_or_applied_model_naming_itself(comfy, mods, files, load_unet):
    node = importlib.import_module("comfyui_hifloat4.nodes.calibrate").HiF4CalibrateWan22()
    for model in (mods["loader"].load_packed_model(str(files["packed"])),
                  applied(mods, load_unet(T2V_HIGH), files["state"])):
        with pytest.raises(ValueError, match="'Calibrate Wan2.2 HiF4' needs an unquantized MODEL"):
            node.calibrate(model, positive=None, negative=None, latent_image=None, seed=0, steps=1, cfg=1.0,
                           sampler_name="euler", scheduler="simple", switch_step=-1, percentile=99.9, alpha=0.5,
                           filename_prefix="x")


# --------------------------------------------------------------------------- Apply keeping weights packed

def test_apply_with_packed_weights_computes_the_unpacked_bits(comfy, mods, files, load_unet):
    packed = applied(mods, load_unet(T2V_HIGH), files["state"], weights="packed")
    fake = applied(mods, load_unet(T2V_HIGH), files["state"], weights="unpacked")
    assert mods["loader"].is_packed_model(packed) and not mods["loader"].is_packed_model(fake)
    for seed in (0, 1):
        assert torch.equal(run(comfy, packed, seed), run(comfy, fake, seed))


def test_apply_with_packed_weights_holds_codes_and_leaves_its_input_unchanged(comfy, mods, files, load_unet):
    model = load_unet(T2V_HIGH)
    before = model.model.diffusion_model.blocks[0].ffn[0].weight.detach().clone()
    packed = applied(mods, model, files["state"], weights="packed")
    layer = packed.model.diffusion_model.blocks[0].ffn[0]
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (512, 4 * 36)
    assert packed.model_size() < 0.5 * model.model_size()
    assert torch.equal(model.model.diffusion_model.blocks[0].ffn[0].weight, before) and not model.object_patches


def test_apply_with_packed_weights_merges_a_lora_loaded_before_it(comfy, mods, files, load_unet, tmp_path):
    with_lora = lora_model(comfy, load_unet(T2V_HIGH), tmp_path)
    packed = applied(mods, with_lora, files["state"], weights="packed")
    assert torch.equal(run(comfy, packed), run(comfy, applied(mods, with_lora, files["state"], weights="unpacked")))
    assert not torch.equal(run(comfy, packed), run(comfy, applied(mods, load_unet(T2V_HIGH), files["state"])))


def test_apply_with_packed_weights_keeps_model_sampling_and_wrappers_of_its_input(comfy, mods, files, load_unet):
    advanced = importlib.import_module("comfy_extras.nodes_model_advanced")
    shifted = advanced.ModelSamplingSD3().patch(load_unet(T2V_HIGH), 8.0)[0]
    marker = lambda executor, *a, **k: executor(*a, **k)  # noqa: E731
    shifted.add_wrapper_with_key("outer_sample", "someone_else", marker)
    packed = applied(mods, shifted, files["state"], weights="packed")
    assert packed.get_model_object("model_sampling") is shifted.get_model_object("model_sampling")
    assert float(packed.get_model_object("model_sampling").shift) == 8.0
    assert marker in packed.wrappers["outer_sample"]["someone_else"]
    assert mods["loader"].guard_wrapper in packed.wrappers["prepare_sampling"][mods["loader"].PACKED_KEY]


def test_apply_refuses_int8_compute_with_unpacked_weights(comfy, mods, files, load_unet):
    with pytest.raises(ValueError, match="int8.*packed"):
        applied(mods, load_unet(T2V_HIGH), files["state"], weights="unpacked", compute="int8")
