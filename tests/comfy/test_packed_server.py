"""Packed HiF4 checkpoints in a real ComfyUI server: a tiny T2V expert pair exported
with `python -m hifloat4 export`, loaded by 'Load HiF4 Diffusion Model' in a fresh
server and sampled in the two-expert graph, gives the latent of 'Apply HiFloat4 W4A4'
with the same state, bit for bit. A LoRA on a packed model (LoraLoaderModelOnly, bypassed
or merged) moves the latent toward unquantized+LoRA; 'Save HiF4 Model' writes a
checkpoint the loader runs identically."""
import os
import pathlib
import subprocess
import sys
import urllib.parse
import urllib.request

import harness
import pytest
import wan_prompts as P
from harness import node

pytestmark = pytest.mark.comfyui
HIGH, LOW = "high_noise", "low_noise"
TINY = {HIGH: "tiny_wan2.2_t2v_high_noise.safetensors", LOW: "tiny_wan2.2_t2v_low_noise.safetensors"}
STATE = "hif4packed/t2v_core.safetensors"
PACKED = {HIGH: "hif4packed/t2v_high.safetensors", LOW: "hif4packed/t2v_low.safetensors"}


def ok(result):
    assert result.status == "success", result.describe()
    return result


@pytest.fixture(scope="module")
def exported(workspace):
    """A state calibrated with the core (two-expert sampling of the harness models), and
    both experts exported by the CLI into the models dir."""
    import torch
    from safetensors.torch import load_file

    from hifloat4 import state as hstate
    from hifloat4.calibrate import CalibConfig, calibrate
    from hifloat4.sampling import sample_two_expert
    from hifloat4.wan_model import WanConfig, WanModel

    src = pathlib.Path(os.environ["COMFY_HARNESS_MODELS"]) / "diffusion_models"
    experts = {}
    for name, file in TINY.items():
        m = WanModel(WanConfig()).eval().requires_grad_(False)
        m.load_state_dict(load_file(str(src / file)))
        experts[name] = m
    g = torch.Generator().manual_seed(0)
    ctx, neg = (0.2 * torch.randn(1, 24, 4096, generator=g) for _ in range(2))
    state = calibrate(experts, lambda: sample_two_expert(experts[HIGH], experts[LOW], (1, 16, 2, 8, 8), ctx, neg,
                                                         steps=4, cfg=3.5, seed=1), CalibConfig())
    models = workspace["models"]
    (models / "calib_states" / "hif4packed").mkdir(parents=True, exist_ok=True)
    (models / "diffusion_models" / "hif4packed").mkdir(exist_ok=True)
    hstate.save_state(models / "calib_states" / STATE, state)
    for name, file in TINY.items():
        cmd = [sys.executable, "-m", "hifloat4", "export", "--model", str(src / file), "--state",
               str(models / "calib_states" / STATE), "--expert", "auto", "--out",
               str(models / "diffusion_models" / PACKED[name])]
        done = subprocess.run(cmd, cwd=harness.REPO, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr
        assert f"exported the {name!r} expert" in done.stdout
    return models


@pytest.fixture(scope="module")
def fresh(workspace, exported):
    """A server started after the export: nothing of the packed models is cached in it."""
    srv = harness.ComfyServer(workspace["models"], [workspace["plugin"]], log_path=workspace["root"] / "packed.log")
    yield srv
    srv.stop()


def packed_prompt(files=PACKED) -> dict:
    """The harness T2V two-expert prompt with both UNETLoaders replaced by our loader."""
    p = P.bf16(P.T2V)
    p["1"] = node("HiF4LoadDiffusionModel", unet_name=files[HIGH])
    p["2"] = node("HiF4LoadDiffusionModel", unet_name=files[LOW])
    return p


def high_only(loader: dict, lora: str | None = None, save: str | None = None) -> dict:
    """High-noise half of the T2V prompt on `loader`, optionally through a LoRA, optionally
    saving the latent (SaveLatent, prefix `save`)."""
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"3", "5", "6", "7", "8"}}
    p["1"] = loader
    if lora:
        p["30"] = node("LoraLoaderModelOnly", model=["1", 0], lora_name=lora, strength_model=1.0)
        p["3"]["inputs"]["model"] = ["30", 0]
    p["10"] = node("HarnessLatentDigest", samples=["8", 0], label="high")
    if save:
        p["31"] = node("SaveLatent", samples=["8", 0], filename_prefix=save)
    return p


def saved_latent(server, result):
    """The latent SaveLatent wrote, fetched through the server's /view."""
    from safetensors.torch import load
    item = result.outputs["31"]["latents"][0]
    with urllib.request.urlopen(f"{server.url}/view?{urllib.parse.urlencode(item)}", timeout=60) as r:
        return load(r.read())["latent_tensor"].float()


def test_new_nodes_register_and_list_only_packed_files(fresh):
    info = fresh.object_info()
    load, save = info["HiF4LoadDiffusionModel"], info["HiF4SaveModel"]
    assert load["display_name"] == "Load HiF4 Diffusion Model" and load["output"] == ["MODEL"]
    assert sorted(load["input"]["required"]["unet_name"][0]) == sorted(PACKED.values())
    assert save["display_name"] == "Save HiF4 Model" and save["output_node"]
    assert set(save["input"]["required"]) == {"model", "ptq_state", "expert", "filename_prefix"}


def test_packed_pair_samples_the_latent_of_fake_quant_apply(fresh):
    fake = ok(fresh.run(P.load_and_quantize(P.T2V, STATE))).digest("hif4_final")
    packed = ok(fresh.run(packed_prompt()))
    assert packed.digest("final_latent")["sha256"] == fake["sha256"]
    assert packed.digest("final_latent")["finite"]
    bf16 = ok(fresh.run(P.bf16(P.T2V))).digest("final_latent")
    assert bf16["sha256"] != fake["sha256"]


def test_lora_on_a_packed_model_moves_the_latent_toward_unquantized_plus_lora(fresh, workspace):
    harness.write_lora(workspace["models"] / "loras" / "packed_test_lora.safetensors",
                       [f"blocks.{i}.{n}" for i in range(4) for n in ("self_attn.q", "ffn.0", "ffn.2")], scale=0.15)
    lora = "packed_test_lora.safetensors"

    def latent(loader, with_lora, name):
        return saved_latent(fresh, ok(fresh.run(high_only(loader, lora=lora if with_lora else None,
                                                          save=f"hif4lora/{name}"))))

    packed = node("HiF4LoadDiffusionModel", unet_name=PACKED[HIGH])
    reference = latent(node("UNETLoader", unet_name=TINY[HIGH], weight_dtype="default"), True, "reference")
    plain = latent(packed, False, "plain")
    bypass = latent(packed, True, "bypass")
    merge = latent(node("HiF4LoadDiffusionModel", unet_name=PACKED[HIGH], lora="merge"), True, "merge")
    far = (plain - reference).norm()
    assert (bypass - reference).norm() < 0.5 * far
    assert (merge - reference).norm() < far
    assert not bypass.equal(merge)


def test_loader_refuses_a_plain_model_file_before_running(fresh):
    result = fresh.run(high_only(node("HiF4LoadDiffusionModel", unet_name=TINY[HIGH])))
    assert result.status == "invalid"
    assert "not a packed HiF4 checkpoint" in str(result.entry["response"])


def test_save_node_writes_a_checkpoint_the_loader_runs_like_the_cli_export(fresh, exported):
    p = {"1": node("UNETLoader", unet_name=TINY[HIGH], weight_dtype="default"),
         "20": node("HiF4LoadPTQState", state_name=STATE),
         "21": node("HiF4SaveModel", model=["1", 0], ptq_state=["20", 0], expert="auto",
                    filename_prefix="hif4packed/saved_high")}
    saved = ok(fresh.run(p)).outputs["21"]["hifloat4_models"]
    assert saved == [{"filename": "saved_high_00001.safetensors", "subfolder": "hif4packed",
                      "type": "diffusion_models"}]
    assert (exported / "diffusion_models" / "hif4packed" / "saved_high_00001.safetensors").is_file()
    from_node = ok(fresh.run(high_only(node("HiF4LoadDiffusionModel",
                                            unet_name="hif4packed/saved_high_00001.safetensors"))))
    from_cli = ok(fresh.run(high_only(node("HiF4LoadDiffusionModel", unet_name=PACKED[HIGH]))))
    assert from_node.digest("high")["sha256"] == from_cli.digest("high")["sha256"]


def test_fp8_scaled_experts_export_load_and_sample(fresh):
    """Save HiF4 Model from the fp8_scaled experts (dequantized before packing), then the
    two-expert graph on the saved files."""
    fp8 = P.on_fp8_scaled({"1": node("UNETLoader", unet_name="", weight_dtype="default"),
                           "2": node("UNETLoader", unet_name="", weight_dtype="default")})
    p = {**fp8, "20": node("HiF4LoadPTQState", state_name=STATE),
         "21": node("HiF4SaveModel", model=["1", 0], ptq_state=["20", 0], expert=HIGH,
                    filename_prefix="hif4packed/fp8_high"),
         "22": node("HiF4SaveModel", model=["2", 0], ptq_state=["20", 0], expert=LOW,
                    filename_prefix="hif4packed/fp8_low")}
    ok(fresh.run(p))
    packed = ok(fresh.run(packed_prompt({HIGH: "hif4packed/fp8_high_00001.safetensors",
                                         LOW: "hif4packed/fp8_low_00001.safetensors"}))).digest("final_latent")
    unquantized = ok(fresh.run(P.on_fp8_scaled(P.bf16(P.T2V)))).digest("final_latent")
    assert packed["finite"] and packed["sha256"] != unquantized["sha256"]
