"""The calibrate, load and apply nodes in a real ComfyUI server on the harness's tiny Wan2.2 models:
calibrate -> file -> load -> apply -> sample for T2V, I2V and TI2V-5B, the bf16
branch left bit-identical, LoRA order, cancel, fp8 weights."""
import time

import pytest

import harness
import wan_prompts as P
from harness import node

pytestmark = pytest.mark.comfyui

CONTRACT_REQUIRED = {
    "HiF4CalibrateWan22": {"model_high_noise", "positive", "negative", "latent_image", "seed", "steps", "cfg",
                           "sampler_name", "scheduler", "switch_step", "percentile", "alpha", "filename_prefix"},
    "HiF4LoadPTQState": {"state_name"},
    "HiF4ApplyW4A4": {"model", "ptq_state", "expert"},
}
DISPLAY = {"HiF4CalibrateWan22": "Calibrate Wan2.2 HiF4", "HiF4LoadPTQState": "Load PTQ State",
           "HiF4ApplyW4A4": "Apply HiFloat4 W4A4"}


def ok(result):
    assert result.status == "success", result.describe()
    return result


@pytest.fixture(scope="module")
def baseline_t2v(server):
    """bf16 T2V digest, taken before any plugin node ran on this server."""
    return ok(server.run(P.bf16(P.T2V))).digest("final_latent")


@pytest.fixture(scope="module")
def t2v(server, baseline_t2v):
    """One calibrate + apply + sample run of the T2V pair."""
    return ok(server.run(P.calibrate_and_quantize(P.T2V, "hif4test/t2v")))


# --------------------------------------------------------------------------- registration

def test_nodes_register_with_the_contract_inputs(server):
    info = server.object_info()
    for name, required in CONTRACT_REQUIRED.items():
        assert info[name]["display_name"] == DISPLAY[name]
        assert set(info[name]["input"]["required"]) == required
    calib = info["HiF4CalibrateWan22"]
    assert calib["output_node"] and calib["output"] == ["PTQ_STATE"]
    assert set(calib["input"]["optional"]) == {"model_low_noise", "clip", "extra_prompts", "rotation",
                                               "rotation_block"}
    assert info["HiF4LoadPTQState"]["output"] == ["PTQ_STATE"]
    assert info["HiF4ApplyW4A4"]["output"] == ["MODEL"]
    choices = {"alpha", "statistic", "rotation", "rotation_block", "keep_high_precision"}
    assert set(info["HiF4SaveModel"]["input"]["optional"]) == choices
    assert set(info["HiF4ApplyW4A4"]["input"]["optional"]) == choices | {"weights", "compute", "lora"}
    assert set(info["HiF4LoadDiffusionModel"]["input"]["optional"]) == {"compute", "lora"}
    assert info["HiF4LoadDiffusionModel"]["input"]["optional"]["lora"][0] == ["bypass", "merge"]
    assert info["HiF4ApplyW4A4"]["input"]["optional"]["weights"][0] == ["auto", "packed", "unpacked"]
    assert info["HiF4ApplyW4A4"]["input"]["optional"]["compute"][0] == ["auto", "simulate", "int8"]
    assert info["HiF4ApplyW4A4"]["input"]["required"]["expert"][0] == ["auto", "high_noise", "low_noise", "single"]
    assert calib["input"]["required"]["sampler_name"][0] == info["KSampler"]["input"]["required"]["sampler_name"][0]


def test_bf16_digest_with_plugin_loaded_equals_a_server_without_it(workspace, baseline_t2v):
    plain = harness.ComfyServer(workspace["models"], [], log_path=workspace["root"] / "plain.log")
    try:
        reference = ok(plain.run(P.bf16(P.T2V))).digest("final_latent")
    finally:
        plain.stop()
    assert baseline_t2v["sha256"] == reference["sha256"]


# --------------------------------------------------------------------------- T2V pair

def test_t2v_calibration_saves_a_counted_state_file(t2v, workspace):
    saved = t2v.saved_states()
    assert saved == [{"filename": "t2v_00001.safetensors", "subfolder": "hif4test", "type": "calib_states"}]
    assert (workspace["models"] / "calib_states" / "hif4test" / "t2v_00001.safetensors").is_file()


def test_t2v_quantized_output_is_finite_and_differs_from_bf16(t2v, baseline_t2v):
    d = t2v.digest("hif4_final")
    assert d["finite"] and d["shape"] == baseline_t2v["shape"]
    assert d["sha256"] != baseline_t2v["sha256"]
    assert abs(d["std"] - baseline_t2v["std"]) < 0.5 * baseline_t2v["std"]  # same kind of latent, not noise


def test_bf16_branch_is_unchanged_after_quantized_sampling(server, t2v, baseline_t2v):
    again = ok(server.run(P.bf16(P.T2V, fresh=True))).digest("final_latent")
    assert again["sha256"] == baseline_t2v["sha256"]


def test_torch_compile_model_node_runs_the_quantized_model(server, t2v):
    # TorchCompileModel (inductor) after Apply: sampling must still work and give the same
    # latent. Inductor may reorder the float ops of the unquantized parts (attention,
    # norms), so bits can differ; the statistics must not.
    p = P.load_and_quantize(P.T2V, "hif4test/t2v_00001.safetensors")
    for apply_id, sampler_id, compile_id in (("21", "23", "31"), ("22", "24", "32")):
        p[compile_id] = harness.node("TorchCompileModel", model=[apply_id, 0], backend="inductor")
        p[sampler_id]["inputs"]["model"] = [compile_id, 0]
    compiled = ok(server.run(p, timeout=900)).digest("hif4_final")
    eager = t2v.digest("hif4_final")
    assert compiled["finite"] and compiled["shape"] == eager["shape"]
    assert abs(compiled["mean"] - eager["mean"]) < 0.05 * eager["std"]
    assert abs(compiled["std"] - eager["std"]) < 0.05 * eager["std"]


def test_loaded_state_reproduces_the_calibrated_run(server, t2v):
    loaded = ok(server.run(P.load_and_quantize(P.T2V, "hif4test/t2v_00001.safetensors")))
    assert loaded.digest("hif4_final")["sha256"] == t2v.digest("hif4_final")["sha256"]


def test_second_calibration_takes_the_next_counter(server, t2v, workspace):
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"1", "2", "3", "4", "5", "6", "7"}}
    p["20"] = P.calibrate_node(P.T2V, "hif4test/t2v", steps=2, switch_step=1)
    assert ok(server.run(p)).saved_states()[0]["filename"] == "t2v_00002.safetensors"


def test_auto_refuses_a_model_the_state_was_not_calibrated_on(server, t2v):
    p = P.quantized(P.I2V, ["20", 0])
    p["20"] = node("HiF4LoadPTQState", state_name="hif4test/t2v_00001.safetensors")
    result = server.run(p)
    assert result.status == "error"
    msg = result.error()["exception_message"]
    assert "made for a custom Wan2.2 T2V model" in msg and "(high-noise and low-noise experts)" in msg
    assert "this model is a custom Wan2.2 I2V model" in msg


def test_explicit_expert_overrides_the_fingerprint(server, t2v):
    p = P.load_and_quantize(P.T2V, "hif4test/t2v_00001.safetensors", expert="high_noise")
    assert ok(server.run(p)).digest("hif4_final")["finite"]


def test_load_refuses_a_missing_state_before_running(server):
    p = P.load_and_quantize(P.T2V, "no_such_state.safetensors")
    result = server.run(p)
    assert result.status == "invalid"
    assert "not found in calib_states" in str(result.entry["response"])


# --------------------------------------------------------------------------- I2V pair, TI2V-5B

def test_i2v_pair_calibrates_applies_and_samples(server, workspace):
    bf16 = ok(server.run(P.bf16(P.I2V))).digest("i2v_final_latent")
    result = ok(server.run(P.calibrate_and_quantize(P.I2V, "hif4test/i2v")))
    d = result.digest("hif4_final")
    assert d["finite"] and d["sha256"] != bf16["sha256"]
    assert (workspace["models"] / "calib_states" / "hif4test" / "i2v_00001.safetensors").is_file()
    assert ok(server.run(P.bf16(P.I2V, fresh=True))).digest("i2v_final_latent")["sha256"] == bf16["sha256"]


def test_ti2v_single_model_calibrates_applies_and_samples(server, workspace):
    bf16 = ok(server.run(P.bf16(P.TI2V))).digest("ti2v_final_latent")
    result = ok(server.run(P.calibrate_and_quantize(P.TI2V, "hif4test/ti2v")))
    d = result.digest("hif4_final")
    assert d["finite"] and d["shape"] == bf16["shape"] and d["sha256"] != bf16["sha256"]
    assert (workspace["models"] / "calib_states" / "hif4test" / "ti2v_00001.safetensors").is_file()
    assert ok(server.run(P.bf16(P.TI2V, fresh=True))).digest("ti2v_final_latent")["sha256"] == bf16["sha256"]


# --------------------------------------------------------------------------- LoRA order

def _high_noise_only(state: str, lora_before: bool, lora: str | None) -> dict:
    """High-noise half of the T2V prompt: UNET -> [LoRA] -> shift -> Apply -> [LoRA] -> sampler."""
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"1", "3", "5", "6", "7", "8"}}
    p["20"] = node("HiF4LoadPTQState", state_name=state)
    p["21"] = node("HiF4ApplyW4A4", model=["3", 0], ptq_state=["20", 0], expert="high_noise")
    p["8"]["inputs"]["model"] = ["21", 0]
    if lora and lora_before:
        p["30"] = node("LoraLoaderModelOnly", model=["1", 0], lora_name=lora, strength_model=1.0)
        p["3"]["inputs"]["model"] = ["30", 0]
    elif lora:
        p["30"] = node("LoraLoaderModelOnly", model=["21", 0], lora_name=lora, strength_model=1.0)
        p["8"]["inputs"]["model"] = ["30", 0]
    p["10"] = node("HarnessLatentDigest", samples=["8", 0], label="high")
    return p


def test_lora_added_after_apply_is_merged_before_quantization(server, t2v, workspace):
    harness.write_lora(workspace["models"] / "loras" / "tiny_lora.safetensors",
                       [f"blocks.{i}.{n}" for i in range(4) for n in ("self_attn.q", "ffn.0", "ffn.2")])
    state = "hif4test/t2v_00001.safetensors"
    before = ok(server.run(_high_noise_only(state, True, "tiny_lora.safetensors"))).digest("high")
    after = ok(server.run(_high_noise_only(state, False, "tiny_lora.safetensors"))).digest("high")
    plain = ok(server.run(_high_noise_only(state, True, None))).digest("high")
    assert after["sha256"] == before["sha256"]
    assert plain["sha256"] != before["sha256"]


# --------------------------------------------------------------------------- fp8 weights

@pytest.mark.parametrize("source", ["fp8_e4m3fn", "fp8_scaled"])
def test_fp8_models_run_quantized(server, t2v, workspace, source):
    unet = "tiny_wan2.2_t2v_high_noise.safetensors"
    if source == "fp8_scaled":
        name = "tiny_wan2.2_t2v_high_noise_fp8_scaled.safetensors"
        dst = workspace["models"] / "diffusion_models" / name
        if not dst.exists():
            harness.write_scaled_fp8(dst.parent / unet, dst)
        unet, dtype = name, "default"
    else:
        dtype = "fp8_e4m3fn"
    p = _high_noise_only("hif4test/t2v_00001.safetensors", True, None)
    p["1"]["inputs"].update(unet_name=unet, weight_dtype=dtype)
    quant = ok(server.run(p)).digest("high")
    p["8"]["inputs"]["model"] = ["3", 0]
    unquant = ok(server.run(p)).digest("high")
    assert quant["finite"] and quant["sha256"] != unquant["sha256"]


def test_fp8_scaled_pair_calibrates_saves_applies_and_samples(server, workspace):
    """The default Wan2.2 files are fp8_scaled: calibrate -> state file -> Load PTQ State ->
    Apply on both experts -> sample, and the unquantized branch stays what it was."""
    plain_before = ok(server.run(P.on_fp8_scaled(P.bf16(P.T2V, fresh=True)))).digest("final_latent")
    quant = ok(server.run(P.on_fp8_scaled(P.calibrate_and_quantize(P.T2V, "hif4fp8/t2v")))).digest("hif4_final")
    assert sorted(p.name for p in (workspace["models"] / "calib_states" / "hif4fp8").iterdir()) == \
        ["t2v_00001.safetensors"]
    loaded = ok(server.run(P.on_fp8_scaled(P.load_and_quantize(P.T2V, "hif4fp8/t2v_00001.safetensors"))))
    plain_after = ok(server.run(P.on_fp8_scaled(P.bf16(P.T2V, fresh=True)))).digest("final_latent")
    assert quant["finite"] and quant["sha256"] != plain_before["sha256"]
    assert loaded.digest("hif4_final")["sha256"] == quant["sha256"]
    assert plain_after["sha256"] == plain_before["sha256"]


# --------------------------------------------------------------------------- cancel

def test_cancel_stops_calibration_writes_nothing_and_leaves_models_clean(server, t2v, baseline_t2v, workspace):
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"1", "2", "3", "4", "5", "6", "7"}}
    p["20"] = P.calibrate_node(P.T2V, "hif4test/cancelled", steps=400)
    st, resp = server.queue(p)
    assert st == 200, resp
    t0 = time.time()
    while not server.is_running() and time.time() - t0 < 30:
        time.sleep(0.1)
    time.sleep(2.0)  # well inside the ~400-step calibration
    server.http("/interrupt", {})
    entry = server.wait(resp["prompt_id"], timeout=120)
    result = harness.Result(entry["status"].get("status_str"), entry)
    assert result.error()["event"] == "execution_interrupted", result.describe()
    assert time.time() - t0 < 60
    assert not list((workspace["models"] / "calib_states" / "hif4test").glob("cancelled*"))
    again = ok(server.run(P.bf16(P.T2V, fresh=True))).digest("final_latent")
    assert again["sha256"] == baseline_t2v["sha256"]


def test_example_prompt_files_match_the_builders():
    import json
    for name, build in P.EXAMPLES.items():
        with open(harness.PROMPTS / name) as f:
            saved = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        assert saved == build(), f"{name} is stale: run wan_prompts.write_examples"
