"""What a new user meets first, in a real ComfyUI server (issue 11): empty file lists
answer with what to do, Calibrate has no randomizing seed control and is served from
ComfyUI's cache when nothing changed, every input has a tooltip, a state made for
another model type is refused in words (even with a named expert), and the nodes that
write files show the file on the node (progress text), in /history and in the log."""
import asyncio
import json
import struct
import uuid

import harness
import pytest
import wan_prompts as P
from harness import node

pytestmark = pytest.mark.comfyui
PLUGIN_NODES = ("HiF4CalibrateWan22", "HiF4LoadPTQState", "HiF4ApplyW4A4", "HiF4CompareVideos", "HiF4SaveModel",
                "HiF4LoadDiffusionModel")
TEXT_EVENT = 3  # server.BinaryEventTypes.TEXT (send_progress_text)
T2V_HIGH = "tiny_wan2.2_t2v_high_noise.safetensors"


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A server of its own: its calib_states start empty, its diffusion_models hold no
    packed checkpoint (the two lists a new user sees empty)."""
    root = tmp_path_factory.mktemp("first_contact")
    models = harness.make_models_dir(root)
    srv = harness.ComfyServer(models, [harness.plugin_link(root)], log_path=root / "comfy.log")
    yield {"server": srv, "models": models, "log": root / "comfy.log"}
    srv.stop()


def ok(result):
    assert result.status == "success", result.describe()
    return result


def run_with_node_texts(server, prompt: dict, timeout=600) -> tuple[harness.Result, list[tuple[str, str]]]:
    """Run a prompt as the browser does (websocket client) and collect the progress
    texts the frontend draws under the nodes: [(node id, text)]."""
    import aiohttp

    client_id = uuid.uuid4().hex

    async def go():
        texts = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{server.url.replace('http', 'ws', 1)}/ws?clientId={client_id}") as ws:
                status, resp = server.http("/prompt", {"prompt": prompt, "client_id": client_id})
                assert status == 200, resp
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == TEXT_EVENT:
                        n = struct.unpack(">I", msg.data[4:8])[0]
                        texts.append((msg.data[8:8 + n].decode(), msg.data[8 + n:].decode()))
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        event = json.loads(msg.data)
                        data = event.get("data", {})
                        if data.get("prompt_id") == resp["prompt_id"] and (
                                event["type"] in ("execution_error", "execution_interrupted", "execution_success")
                                or (event["type"] == "executing" and data.get("node") is None)):
                            break
        return resp["prompt_id"], texts

    prompt_id, texts = asyncio.run(asyncio.wait_for(go(), timeout))
    entry = server.wait(prompt_id, timeout)
    return harness.Result(entry["status"].get("status_str"), entry), texts


def validation_errors(result) -> str:
    assert result.status == "invalid", result.describe()
    return json.dumps(result.entry["response"])


def t2v_calibration(prefix: str) -> dict:
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"1", "2", "3", "4", "5", "6", "7"}}
    p["20"] = P.calibrate_node(P.T2V, prefix, steps=2, switch_step=1)
    return p


@pytest.fixture(scope="module")
def calibrated(fresh):
    """One T2V calibration, run the way the browser runs it (collecting node texts)."""
    return run_with_node_texts(fresh["server"], t2v_calibration("fc/t2v"))


# --------------------------------------------------------------------------- 1: empty lists
# (first in this module: the lists are empty until `calibrated` runs)

@pytest.mark.parametrize("value", ["missing", None])
def test_empty_state_list_says_run_calibrate_then_refresh(fresh, value):
    loader = node("HiF4LoadPTQState") if value == "missing" else node("HiF4LoadPTQState", state_name=None)
    p = P.quantized(P.T2V, ["20", 0])
    p["20"] = loader
    errors = validation_errors(fresh["server"].run(p))
    assert "no PTQ states in" in errors and "calib_states" in errors and "then press R" in errors
    assert "Calibrate Wan2.2 HiF4" in errors
    assert "positional argument" not in errors and "NoneType" not in errors


@pytest.mark.parametrize("value", ["missing", None])
def test_empty_packed_model_list_says_how_to_make_one(fresh, value):
    loader = node("HiF4LoadDiffusionModel") if value == "missing" else node("HiF4LoadDiffusionModel", unet_name=None)
    p = P.bf16(P.T2V)
    p["1"] = loader  # in place of the high-noise UNETLoader
    errors = validation_errors(fresh["server"].run(p))
    assert "no packed HiF4 checkpoints in" in errors and "Save HiF4 Model" in errors and "then press R" in errors
    assert "positional argument" not in errors and "NoneType" not in errors


def test_load_functions_without_a_file_say_what_to_do(comfy, tmp_path, monkeypatch):
    """In-process: the node methods themselves, called as ComfyUI calls them with an
    empty list (no value) or a null value."""
    import importlib
    fp = comfy["folder_paths"]
    for folder in ("calib_states", "diffusion_models"):
        (tmp_path / folder).mkdir()
        monkeypatch.setitem(fp.folder_names_and_paths, folder, ([str(tmp_path / folder)], {".safetensors"}))
    load = importlib.import_module("comfyui_hifloat4.nodes.load").HiF4LoadPTQState
    packed = importlib.import_module("comfyui_hifloat4.nodes.packed").HiF4LoadDiffusionModel
    for cls, arg, words in ((load, "state_name", "no PTQ states in"),
                            (packed, "unet_name", "no packed HiF4 checkpoints in")):
        assert cls.VALIDATE_INPUTS(input_types={}).startswith(f"{words} {tmp_path}")
        assert cls.VALIDATE_INPUTS(input_types={}, **{arg: None}).startswith(words)
        with pytest.raises(FileNotFoundError, match=words):
            cls().load()


# --------------------------------------------------------------------------- 2: seed, tooltips

def test_calibrate_seed_has_no_control_after_generate(fresh):
    info = fresh["server"].object_info()
    # the frontend (1.27 and current) adds the control to an INT named seed unless this is False
    assert info["HiF4CalibrateWan22"]["input"]["required"]["seed"][1]["control_after_generate"] is False


def test_every_plugin_input_has_a_tooltip(fresh):
    info = fresh["server"].object_info()
    missing = [f"{name}.{inp}" for name in PLUGIN_NODES for section in ("required", "optional")
               for inp, spec in info[name]["input"].get(section, {}).items()
               if not (len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("tooltip"))]
    assert not missing, missing


def test_queueing_an_unchanged_calibration_again_does_not_recalibrate(fresh, calibrated):
    again, texts = run_with_node_texts(fresh["server"], t2v_calibration("fc/t2v"))
    ok(again)
    assert texts == []  # served from ComfyUI's cache: the node did not run
    assert sorted(p.name for p in (fresh["models"] / "calib_states" / "fc").iterdir()) == ["t2v_00001.safetensors"]


# --------------------------------------------------------------------------- 4: what was written

def test_calibrate_shows_the_written_file_on_the_node_in_history_and_in_the_log(fresh, calibrated):
    result, texts = calibrated
    ok(result)
    shown = "saved PTQ state calib_states/fc/t2v_00001.safetensors"
    assert [t for nid, t in texts if nid == "20" and shown in t], texts
    assert shown in result.outputs["20"]["text"][0]
    log_lines = [line for line in fresh["log"].read_text().splitlines() if shown in line]
    assert len(log_lines) == 1, log_lines


def test_save_shows_the_written_file_on_the_node_in_history_and_in_the_log(fresh, calibrated):
    p = {"1": node("UNETLoader", unet_name=T2V_HIGH, weight_dtype="default"),
         "20": node("HiF4LoadPTQState", state_name="fc/t2v_00001.safetensors"),
         "21": node("HiF4SaveModel", model=["1", 0], ptq_state=["20", 0], expert="auto",
                    filename_prefix="fc/saved")}
    result, texts = run_with_node_texts(fresh["server"], p)
    ok(result)
    shown = "saved packed HiF4 model diffusion_models/fc/saved_00001.safetensors"
    assert [t for nid, t in texts if nid == "21" and shown in t], texts
    assert shown in result.outputs["21"]["text"][-2]
    assert sum(shown in line for line in fresh["log"].read_text().splitlines()) == 1


# --------------------------------------------------------------------------- 3: wrong model

def test_auto_refusal_says_what_the_state_was_made_for_and_what_the_model_is(fresh, calibrated):
    p = P.quantized(P.I2V, ["20", 0])
    p["20"] = node("HiF4LoadPTQState", state_name="fc/t2v_00001.safetensors")
    result = fresh["server"].run(p)
    assert result.status == "error"
    msg = result.error()["exception_message"]
    assert "made for a custom Wan2.2 T2V model" in msg and "this model is a custom Wan2.2 I2V model" in msg
    assert "hash" not in msg


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_a_named_expert_does_not_apply_t2v_masks_to_an_i2v_model(fresh, calibrated, expert):
    p = P.quantized(P.I2V, ["20", 0], expert=expert)
    p["20"] = node("HiF4LoadPTQState", state_name="fc/t2v_00001.safetensors")
    result = fresh["server"].run(p)
    assert result.status == "error", result.describe()
    assert "even when the expert is picked explicitly" in result.error()["exception_message"]


def test_save_refuses_another_model_type_with_a_named_expert(fresh, calibrated):
    p = {"1": node("UNETLoader", unet_name="tiny_wan2.2_i2v_high_noise.safetensors", weight_dtype="default"),
         "20": node("HiF4LoadPTQState", state_name="fc/t2v_00001.safetensors"),
         "21": node("HiF4SaveModel", model=["1", 0], ptq_state=["20", 0], expert="high_noise",
                    filename_prefix="fc/wrong")}
    result = fresh["server"].run(p)
    assert result.status == "error"
    assert "this model is a custom Wan2.2 I2V model" in result.error()["exception_message"]
    assert not list((fresh["models"] / "diffusion_models" / "fc").glob("wrong*"))


def test_named_expert_on_other_weights_of_the_same_type_warns_on_the_node(fresh, calibrated):
    # the low-noise model with the high-noise expert's masks: same type, other weights
    p = {k: v for k, v in P.bf16(P.T2V).items() if k in {"2", "4", "5", "6", "7"}}
    p["20"] = node("HiF4LoadPTQState", state_name="fc/t2v_00001.safetensors")
    p["21"] = node("HiF4ApplyW4A4", model=["4", 0], ptq_state=["20", 0], expert="high_noise")
    p["22"] = node("KSampler", model=["21", 0], seed=1, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                   positive=["5", 0], negative=["6", 0], latent_image=["7", 0], denoise=1.0)
    p["23"] = node("HarnessLatentDigest", samples=["22", 0], label="warned")
    result, texts = run_with_node_texts(fresh["server"], p)
    ok(result)
    assert [t for nid, t in texts if nid == "21" and "weights differ" in t], texts
    assert "weights differ" in result.outputs["21"]["text"][0]
