"""The calibrate node called in-process on real ComfyUI models: extra prompts through
a CLIP, one progress bar over prompts x steps, cancel through the progress hook."""
import importlib

import pytest
import torch

pytestmark = pytest.mark.comfyui
LATENT = {"samples": torch.zeros(1, 16, 2, 8, 8)}


def conditioning(seed):
    """umt5-shaped like the harness's random conditioning."""
    g = torch.Generator().manual_seed(seed)
    ctx = torch.zeros(1, 512, 4096)
    ctx[:, :24] = torch.randn(1, 24, 4096, generator=g) * 0.2
    return [[ctx, {}]]


class FakeClip:
    """CLIPTextEncode's two calls, recording the texts."""

    def __init__(self):
        self.texts = []

    def tokenize(self, text):
        self.texts.append(text)
        return text

    def encode_from_tokens_scheduled(self, tokens):
        return conditioning(100 + len(self.texts))


@pytest.fixture
def nodes(comfy):
    return {name: importlib.import_module(f"comfyui_hifloat4.nodes.{name}") for name in ("calibrate", "policy")}


@pytest.fixture
def progress(comfy, monkeypatch):
    """Every ProgressBar update as (value, total); set .raise_at to cancel there."""
    import comfy.utils

    class Log(list):
        raise_at = None

    log = Log()

    def hook(value, total, preview, node_id=None):
        log.append((value, total))
        if log.raise_at is not None and value >= log.raise_at:
            raise comfy.model_management.InterruptProcessingException()
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    return log


@pytest.fixture
def pair(load_unet):
    return load_unet("tiny_wan2.2_t2v_high_noise.safetensors"), load_unet("tiny_wan2.2_t2v_low_noise.safetensors")


def calibrate(nodes, pair, **kw):
    args = dict(model_high_noise=pair[0], positive=conditioning(1), negative=conditioning(2), latent_image=LATENT,
                seed=3, steps=4, cfg=3.5, sampler_name="euler", scheduler="simple", switch_step=-1,
                percentile=99.9, alpha=0.5, filename_prefix="run/t2v", model_low_noise=pair[1])
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return nodes["calibrate"].HiF4CalibrateWan22().calibrate(**args)


def test_extra_prompts_are_encoded_with_the_clip_and_sampled(nodes, pair, calib_dir, progress):
    clip = FakeClip()
    out = calibrate(nodes, pair, clip=clip, extra_prompts="a cat\n\n  the sea \n")
    state = out["result"][0]
    assert clip.texts == ["a cat", "the sea"]
    assert state.calibration["prompts"] == 3
    assert (calib_dir / "run" / "t2v_00001.safetensors").is_file()


def test_one_progress_bar_spans_prompts_times_steps(nodes, pair, calib_dir, progress):
    calibrate(nodes, pair, clip=FakeClip(), extra_prompts="a cat")
    values = [v for v, _ in progress]
    assert {t for _, t in progress} == {8} and values == sorted(values) and values[-1] == 8


def test_calibration_says_which_prompt_expert_and_steps_it_samples(nodes, pair, calib_dir, progress, caplog):
    with caplog.at_level("INFO", logger="hifloat4"):
        calibrate(nodes, pair, clip=FakeClip(), extra_prompts="a cat", switch_step=2)
    said = [r.getMessage() for r in caplog.records if "calibrating prompt" in r.getMessage()]
    assert said == ["HiF4: calibrating prompt 1 of 2: high_noise expert, steps 1-2 of 4",
                    "HiF4: calibrating prompt 1 of 2: low_noise expert, steps 3-4 of 4",
                    "HiF4: calibrating prompt 2 of 2: high_noise expert, steps 1-2 of 4",
                    "HiF4: calibrating prompt 2 of 2: low_noise expert, steps 3-4 of 4"]


def test_switch_step_minus_one_comes_from_the_t2v_boundary(nodes, pair, calib_dir, progress, comfy):
    state = calibrate(nodes, pair)["result"][0]
    sigmas = comfy["calibration"].schedule_sigmas(pair[0], 4, "euler", "simple")
    assert state.calibration["switch_step"] == __import__("hifloat4.sampling", fromlist=["x"]).switch_step_from_sigmas(sigmas, 0.875)
    high, low = state.calibration["sigma_range"]["high_noise"], state.calibration["sigma_range"]["low_noise"]
    assert high[0] >= 0.875 > low[1]


def test_cancel_raises_writes_no_file_and_removes_observers(nodes, pair, calib_dir, progress, comfy):
    progress.raise_at = 3
    with pytest.raises(comfy["comfy.model_management"].InterruptProcessingException):
        calibrate(nodes, pair)
    assert not list(calib_dir.rglob("*.safetensors"))
    for model in pair:
        for m in comfy["weights"].wan_root(model).modules():
            assert not isinstance(m.__dict__.get("forward"), comfy["calibration"].Observer)


def test_extra_prompts_without_clip_are_refused_before_sampling(nodes, pair, calib_dir, progress):
    with pytest.raises(ValueError, match="clip"):
        calibrate(nodes, pair, extra_prompts="a cat")
    assert progress == []


def test_saved_state_loads_back_identical(nodes, pair, calib_dir, progress):
    from hifloat4.state import load_state
    state = calibrate(nodes, pair)["result"][0]
    loaded = load_state(calib_dir / "run" / "t2v_00001.safetensors")
    assert loaded.expert_names == ["high_noise", "low_noise"]
    for name, ex in state.experts.items():
        assert ex.fingerprint == loaded.experts[name].fingerprint
        for ln, ls in ex.layers.items():
            assert torch.equal(ls.mask, loaded.experts[name].layers[ln].mask)
            assert all(torch.equal(getattr(ls, f), getattr(loaded.experts[name].layers[ln], f))
                       for f in ("tails", "errors"))


def test_the_node_records_tails_and_sensitivity_for_every_layer(nodes, pair, calib_dir, progress):
    from hifloat4 import masks as hmasks
    from hifloat4 import state as hstate
    state = calibrate(nodes, pair)["result"][0]
    assert hstate.format_version(state) == hstate.FORMAT_VERSION and hstate.missing_features(state) == []
    for ex in state.experts.values():
        for ls in ex.layers.values():
            assert ls.tails.shape == (3, ls.channels) and ls.errors.shape == (len(hstate.ERROR_KEYS),)
            assert 0.0 < hmasks.sensitivity(ls) < 1.0 and hmasks.adaptive_choice(ls) in hmasks.CANDIDATES


def test_the_node_builds_its_state_with_calibrate_build_state(nodes, pair, calib_dir, progress, monkeypatch):
    import hifloat4.calibrate as hcalibrate
    calls = []
    build = hcalibrate.build_state
    monkeypatch.setattr(hcalibrate, "build_state", lambda *a, **k: calls.append(a) or build(*a, **k))
    state = calibrate(nodes, pair)["result"][0]
    assert len(calls) == 1 and state.statistic == "tail" and state.rotation is None


def test_the_node_calibrates_with_the_rotation_and_records_it(nodes, pair, calib_dir, progress):
    plain = calibrate(nodes, pair)["result"][0]
    rotated = calibrate(nodes, pair, rotation="hadamard", rotation_block=100)["result"][0]
    assert rotated.rotation == {"block": 64, "seed": 0}  # the largest power of two <= 100
    ls, ref = rotated.experts["high_noise"].layers["blocks.0.ffn.2"], plain.experts["high_noise"].layers["blocks.0.ffn.2"]
    assert torch.equal(ls.mask, ref.mask) and not torch.equal(ls.errors, ref.errors)


def test_load_says_what_a_version_1_state_lacks(comfy, nodes, pair, calib_dir, progress):
    import dataclasses

    from hifloat4 import state as hstate
    load = importlib.import_module("comfyui_hifloat4.nodes.load")
    state = calibrate(nodes, pair)["result"][0]
    v1 = dataclasses.replace(state, experts={e: hstate.ExpertState(
        {ln: dataclasses.replace(ls, tails=None, errors=None) for ln, ls in ex.layers.items()}, ex.fingerprint)
        for e, ex in state.experts.items()})
    hstate.save_state(calib_dir / "old.safetensors", v1)
    out = load.HiF4LoadPTQState().load("old.safetensors")
    assert out["result"][0].experts["high_noise"].layers["blocks.0.ffn.0"].errors is None
    assert "sensitivity" in out["ui"]["text"][0] and "adaptive statistic" in out["ui"]["text"][0]
    assert load.HiF4LoadPTQState().load("run/t2v_00001.safetensors")[0].statistic == "tail"
