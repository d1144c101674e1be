"""4-step Lightning (lightx2v) calibration in-process on real ComfyUI models: a LoRA
loaded as LoraLoaderModelOnly loads it, 4 steps, cfg 1, handover at step 2; the state
records the LoRA patches, and Apply warns when the model's patches differ."""
import importlib

import pytest
import torch

import harness

pytestmark = pytest.mark.comfyui
LATENT = {"samples": torch.zeros(1, 16, 2, 8, 8)}
LORA_LAYERS = [f"blocks.{i}.{n}" for i in range(2) for n in ("self_attn.q", "ffn.0", "ffn.2")]


def conditioning(seed):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(1, 512, 4096)
    ctx[:, :24] = torch.randn(1, 24, 4096, generator=g) * 0.2
    return [[ctx, {}]]


@pytest.fixture
def nodes(comfy):
    return {name: importlib.import_module(f"comfyui_hifloat4.nodes.{name}") for name in ("calibrate", "apply")}


@pytest.fixture
def pair(load_unet):
    return load_unet("tiny_wan2.2_t2v_high_noise.safetensors"), load_unet("tiny_wan2.2_t2v_low_noise.safetensors")


@pytest.fixture
def with_lora(comfy, tmp_path):
    """LoraLoaderModelOnly's effect: comfy.sd.load_lora_for_models(model, None, lora, strength, 0)."""
    def load(model, strength=1.0, seed=0):
        path = tmp_path / f"lora_{seed}.safetensors"
        harness.write_lora(path, LORA_LAYERS, seed=seed, scale=0.2)
        lora = comfy["comfy.sd"].comfy.utils.load_torch_file(str(path))
        return comfy["comfy.sd"].load_lora_for_models(model, None, lora, strength, 0)[0]
    return load


def lightning(nodes, high, low):
    """The Lightning schedule of the official 4-step template: 4 steps, cfg 1, handover at 2."""
    with torch.inference_mode():
        return nodes["calibrate"].HiF4CalibrateWan22().calibrate(
            model_high_noise=high, model_low_noise=low, positive=conditioning(1), negative=conditioning(2),
            latent_image=LATENT, seed=3, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple",
            switch_step=2, percentile=99.9, alpha=0.5, filename_prefix="lightning")["result"][0]


def apply_texts(nodes, model, state) -> list[str]:
    with torch.inference_mode():
        out = nodes["apply"].HiF4ApplyW4A4().apply(model, state, "auto", weights="unpacked")
    return out["ui"]["text"] if isinstance(out, dict) else []


@pytest.fixture
def lightning_state(nodes, pair, with_lora, calib_dir):
    return lightning(nodes, with_lora(pair[0]), with_lora(pair[1], seed=1))


def test_lightning_calibration_records_each_experts_lora(lightning_state, pair, with_lora, comfy):
    record = comfy["patch_record"].patch_record
    assert lightning_state.patches == {"high_noise": record(with_lora(pair[0])),
                                       "low_noise": record(with_lora(pair[1], seed=1))}
    (group,) = lightning_state.patches["high_noise"]
    assert group["strength"] == 1.0 and group["keys"] == len(LORA_LAYERS)
    assert lightning_state.patches["high_noise"] != lightning_state.patches["low_noise"]


def test_lightning_calibration_records_its_schedule(lightning_state):
    c = lightning_state.calibration
    assert (c["steps"], c["cfg"], c["switch_step"]) == (4, 1.0, 2)


def test_cfg_1_calibration_runs_the_cond_pass_only(lightning_state):
    """ComfyUI skips the uncond pass at cfg 1, as it does when generating: one chunk per call."""
    calls = lightning_state.calibration["calls"]
    assert calls["high_noise"] == {"forward": 2, "batched": 0} and calls["low_noise"] == {"forward": 2, "batched": 0}


def test_the_state_is_built_from_the_lora_patched_weights(nodes, pair, lightning_state):
    plain = lightning(nodes, *pair)
    patched = lightning_state.experts["high_noise"].layers
    assert not torch.equal(patched["blocks.0.ffn.0"].wmax, plain.experts["high_noise"].layers["blocks.0.ffn.0"].wmax)
    assert torch.equal(patched["blocks.3.ffn.0"].wmax, plain.experts["high_noise"].layers["blocks.3.ffn.0"].wmax)


def test_the_saved_state_keeps_the_record(lightning_state, calib_dir):
    from hifloat4.state import load_state
    assert load_state(calib_dir / "lightning_00001.safetensors").patches == lightning_state.patches


def test_apply_says_nothing_when_the_loras_match(nodes, pair, with_lora, lightning_state):
    assert apply_texts(nodes, with_lora(pair[0]), lightning_state) == []


@pytest.mark.parametrize("model, what", [
    (lambda pair, lora: pair[0], "missing: 6 patched weights at strength 1"),
    (lambda pair, lora: lora(pair[0], strength=0.5), "different strength: 6 patched weights at 0.5, calibrated at 1"),
    (lambda pair, lora: lora(lora(pair[0]), seed=2, strength=0.8), "extra: 6 patched weights at strength 0.8"),
])
def test_apply_warns_how_the_loras_differ(nodes, pair, with_lora, lightning_state, caplog, model, what):
    with caplog.at_level("WARNING", logger="hifloat4"):
        texts = apply_texts(nodes, model(pair, with_lora), lightning_state)
    assert len(texts) == 1 and "high_noise expert" in texts[0] and what in texts[0]
    assert any(what in r.getMessage() for r in caplog.records)


def test_apply_says_nothing_for_a_state_without_a_record(nodes, pair, with_lora, lightning_state):
    import dataclasses
    assert apply_texts(nodes, with_lora(pair[0], strength=0.5), dataclasses.replace(lightning_state, patches=None)) == []
