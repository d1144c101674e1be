"""The example workflows in workflows/ (ComfyUI UI format 0.4, served as templates).

Plain CPU CI (no ComfyUI): every workflow is checked against a snapshot of the node
catalogue of each tested ComfyUI version with this plugin loaded
(tests/fixtures/object_info_<version>.json, from `../shared/comfy_harness/run_prompt.py
--object-info`, trimmed to this plugin's nodes and the core node types the workflows
use): node types exist, links are type-correct and consistent, widget values fit the
widgets, required inputs are connected.

Marked `comfyui` (needs COMFYUI_DIR and the tiny harness models): the snapshot of the
running version still matches its live catalogue (the plugin's nodes and the core nodes
the workflows use *now*; the rest of core churns every release and is not compared),
ComfyUI lists and serves the workflows as templates, and each workflow, converted to
an API prompt the way the frontend does (with the tiny models and random conditioning
substituted), validates and runs in the real server.
Set HIF4_UPDATE_OBJECT_INFO=1 to (re)write the running version's snapshot from the live server.
"""
from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import sys
import urllib.parse
import urllib.request

import pytest

from hifloat4 import sampling
from hifloat4 import state as hstate

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
FIXTURES = ROOT / "tests" / "fixtures"
TESTED_VERSIONS = ("0.3.64", "0.33.0")  # one snapshot each; the oldest is what the workflows must run on
sys.path.insert(0, str(ROOT / "tests" / "comfy"))
import harness  # found through the sys.path insert above (stdlib-only at import time)

# The template browser (frontend 1.27 and current) shows a custom node's template by its
# file name alone: the name is the card's title (and, with - and _ as spaces, its text).
T2V_CALIBRATE = "Calibrate HiF4 for Wan2.2 T2V-A14B"
T2V_APPLY = "Wan2.2 T2V-A14B with HiF4 W4A4"
I2V_APPLY = "Wan2.2 I2V-A14B with HiF4 W4A4"
TI2V_APPLY = "Wan2.2 TI2V-5B with HiF4 W4A4"
T2V_COMPARE = "Wan2.2 T2V-A14B unquantized vs HiF4 W4A4"
T2V_LIGHTNING = "Wan2.2 T2V-A14B Lightning 4-step with HiF4 W4A4"
EXPECTED = {T2V_CALIBRATE, T2V_APPLY, I2V_APPLY, TI2V_APPLY, T2V_COMPARE, T2V_LIGHTNING}
# The files users download for the official Wan2.2 T2V 4-step (lightx2v) template, per expert.
LIGHTNING_LORAS = {"high_noise": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors",
                   "low_noise": "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"}
# Nodes the frontend itself provides (never in /object_info, dropped from API prompts).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
# Core nodes of newer ComfyUI releases that 0.3.64 lacks (the newest official Wan2.2
# templates use them); the workflows must run on 0.3.64 too.
NEWER_THAN_0_3_64 = {"ComfySwitchNode", "ComfyMathExpression"}
# Combo inputs whose options are the user's files: any file name is acceptable.
USER_FILES = {("UNETLoader", "unet_name"), ("CLIPLoader", "clip_name"), ("VAELoader", "vae_name"),
              ("LoadImage", "image"), ("HiF4LoadPTQState", "state_name"), ("LoraLoaderModelOnly", "lora_name")}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MODES = {0: "always", 2: "never (muted)", 4: "bypass"}
PLUGIN_MODULE = "custom_nodes.comfyui-hifloat4"


# --------------------------------------------------------------------------- catalogue helpers

def fixture_path(version: str) -> pathlib.Path:
    return FIXTURES / f"object_info_{version}.json"


def load_catalogue(version: str = TESTED_VERSIONS[0]) -> dict:
    with open(fixture_path(version), encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if not k.startswith("_")}


def workflow_node_types() -> set[str]:
    """The node types the shipped workflows use (read now: the workflows may change)."""
    return {n["type"] for name in workflow_names() for n in load_workflow(name)["nodes"]} - FRONTEND_ONLY


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # newer ComfyUI: a combo whose options bring their own inputs


def input_type(spec) -> str:
    return "COMBO" if isinstance(spec[0], list) or spec[0] == DYNAMIC_COMBO else spec[0]


def input_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_options(spec) -> list | None:
    options = spec[0] if isinstance(spec[0], list) else input_options(spec).get("options")
    return [o["key"] for o in options] if spec[0] == DYNAMIC_COMBO else options


def all_inputs(info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, required) in the order the frontend creates them."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    return [(name, info["input"][section][name], section == "required")
            for section in ("required", "optional") for name in order.get(section, [])]


def is_widget(spec) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def widget_slots(info: dict) -> list[tuple[str, str, list]]:
    """The frontend's widgets_values layout: (input name, kind, spec), kind "value",
    "control" (control_after_generate, after seed-like INTs) or "upload" (image upload).
    Hidden inputs have no widget; a dynamic combo is followed by the widgets of its first
    (default) option, which is what the shipped workflows select."""
    slots = []
    for name, spec, _ in all_inputs(info):
        if input_options(spec).get("hidden"):
            continue
        if not is_widget(spec):
            continue
        slots.append((name, "value", spec))
        opts = input_options(spec)
        seed_like = input_type(spec) == "INT" and name in ("seed", "noise_seed")  # the frontend's legacy rule
        # frontend 1.27 and current: `control_after_generate ?? seed_like`, so False turns it off
        if input_type(spec) in ("INT", "COMBO") and opts.get("control_after_generate", seed_like):
            slots.append((name, "control", spec))
        if opts.get("image_upload"):
            slots.append((name, "upload", spec))
        if spec[0] == DYNAMIC_COMBO:
            nested = opts["options"][0]["inputs"]
            slots += widget_slots({"input": nested, "input_order": {k: list(v) for k, v in nested.items()}})
    return slots


def value_problem(node_type: str, name: str, spec, value) -> str | None:
    t, opts = input_type(spec), input_options(spec)
    if t == "COMBO":
        options = combo_options(spec) or []
        if (node_type, name) in USER_FILES:
            return None if isinstance(value, str) and value else f"{name}: needs a file name, got {value!r}"
        return None if value in options else f"{name}: {value!r} is not one of {options}"
    kinds = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}
    if not isinstance(value, kinds[t]) or (t in ("INT", "FLOAT") and isinstance(value, bool)):
        return f"{name}: {value!r} is not a {t}"
    too_small = "min" in opts and value < opts["min"]
    too_big = "max" in opts and value > opts["max"]
    if t in ("INT", "FLOAT") and (too_small or too_big):
        return f"{name}: {value!r} outside [{opts.get('min')}, {opts.get('max')}]"
    return None


def load_workflow(name: str) -> dict:
    with open(WORKFLOWS / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS.glob("*.json"))


def nodes_by_id(wf: dict) -> dict[int, dict]:
    return {n["id"]: n for n in wf["nodes"]}


def of_type(wf: dict, node_type: str, active_only=True) -> list[dict]:
    return [n for n in wf["nodes"] if n["type"] == node_type and (not active_only or n.get("mode", 0) == 0)]


# --------------------------------------------------------------------------- UI -> API prompt

def to_api(wf: dict, catalogue: dict) -> dict:
    """The API prompt the frontend queues for this workflow (graphToPrompt): frontend-only
    and muted nodes are left out, bypassed nodes are passed through by type, widget
    values go by name (control/upload values are not sent), links become [id, slot]."""
    nodes, links = nodes_by_id(wf), {link[0]: link for link in wf["links"]}

    def source(link_id):
        _, src_id, slot, _, _, _ = links[link_id]
        src = nodes[src_id]
        while src.get("mode", 0) == 4:  # bypass: the first linked input of the same type
            otype = src["outputs"][slot]["type"]
            inp = next((i for i in src.get("inputs", []) if i["type"] == otype and i.get("link") is not None), None)
            if inp is None:
                return None
            _, src_id, slot, _, _, _ = links[inp["link"]]
            src = nodes[src_id]
        if src.get("mode", 0) == 2 or src["type"] in FRONTEND_ONLY:
            return None
        return [str(src["id"]), slot]

    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        info = catalogue[n["type"]]
        inputs = {}
        for (name, kind, _), value in zip(widget_slots(info), n.get("widgets_values", [])):
            if kind == "value":
                inputs[name] = value
        for inp in n.get("inputs", []):
            if inp.get("link") is None:
                continue
            src = source(inp["link"])
            if src is not None:
                inputs[inp["name"]] = src
            else:
                inputs.pop(inp["name"], None)
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


# --------------------------------------------------------------------------- plain CPU checks

@pytest.fixture(scope="module", params=TESTED_VERSIONS)
def catalogue(request):
    """Each tested version's snapshot: the workflows must be valid on all of them."""
    return load_catalogue(request.param)


def test_the_expected_workflows_are_there():
    assert set(workflow_names()) == EXPECTED
    stray = [p.name for p in WORKFLOWS.iterdir() if p.suffix not in (".json", ".jpg") and not p.name.startswith(".")]
    assert not stray, f"unexpected files in workflows/: {stray}"


@pytest.mark.parametrize("version", TESTED_VERSIONS)
def test_fixture_is_a_trimmed_catalogue_of_its_version_with_the_plugin(version):
    meta = json.loads(fixture_path(version).read_text(encoding="utf-8"))["_meta"]
    catalogue = load_catalogue(version)
    assert meta["comfyui_version"] == version
    plugin = {t for t, info in catalogue.items() if info["python_module"] == PLUGIN_MODULE}
    assert {"HiF4CalibrateWan22", "HiF4LoadPTQState", "HiF4ApplyW4A4", "HiF4SaveModel",
            "HiF4LoadDiffusionModel", "HiF4CompareVideos"} <= plugin
    assert fixture_path(version).stat().st_size < 200_000
    assert workflow_node_types() <= set(catalogue)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_is_ui_format_0_4(name):
    wf = load_workflow(name)
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra"):
        assert key in wf, key
    ids = [n["id"] for n in wf["nodes"]]
    assert len(ids) == len(set(ids)), "duplicate node ids"
    assert max(ids) <= wf["last_node_id"]
    link_ids = [link[0] for link in wf["links"]]
    assert len(link_ids) == len(set(link_ids)), "duplicate link ids"
    assert not link_ids or max(link_ids) <= wf["last_link_id"]
    for n in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "properties"):
            assert key in n, (n.get("id"), key)
        assert n["mode"] in MODES, (n["id"], n["mode"])
        assert len(n["pos"]) == 2 and len(n["size"]) == 2
        if n["type"] not in FRONTEND_ONLY:
            assert n["properties"].get("Node name for S&R") == n["type"]
    orders = sorted(n["order"] for n in wf["nodes"])
    assert orders == list(range(len(wf["nodes"])))
    for g in wf["groups"]:
        assert g["title"] and len(g["bounding"]) == 4


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_node_types_exist_in_0_3_64_core_or_this_plugin(name, catalogue):
    for n in load_workflow(name)["nodes"]:
        assert n["type"] not in NEWER_THAN_0_3_64, f"{n['type']} does not exist in ComfyUI 0.3.64"
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in catalogue, f"node {n['id']}: unknown type {n['type']}"
        module = catalogue[n["type"]]["python_module"]
        assert module in ("nodes", PLUGIN_MODULE) or module.startswith("comfy_extras."), (n["type"], module)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_links_are_consistent_and_type_correct(name, catalogue):
    wf = load_workflow(name)
    nodes = nodes_by_id(wf)
    listed = {link[0] for link in wf["links"]}
    for lid, src_id, src_slot, dst_id, dst_slot, ltype in wf["links"]:
        src, dst = nodes[src_id], nodes[dst_id]
        out, inp = src["outputs"][src_slot], dst["inputs"][dst_slot]
        assert lid in (out["links"] or []), f"link {lid} missing from node {src_id} output {src_slot}"
        assert inp["link"] == lid, f"link {lid}: node {dst_id} input {dst_slot} holds {inp['link']}"
        src_type = catalogue[src["type"]]["output"][src_slot]
        specs = {n: s for n, s, _ in all_inputs(catalogue[dst["type"]])}
        assert inp["name"] in specs, f"node {dst_id} ({dst['type']}) has no input {inp['name']}"
        dst_type = input_type(specs[inp["name"]])
        assert out["type"] == src_type and inp["type"] == dst_type, (lid, out["type"], inp["type"])
        assert ltype == src_type, f"link {lid} typed {ltype}, source gives {src_type}"
        assert "*" in (src_type, dst_type) or src_type == dst_type, \
            f"link {lid}: {src['type']}.{out['name']} ({src_type}) -> {dst['type']}.{inp['name']} ({dst_type})"
    for n in wf["nodes"]:
        for inp in n.get("inputs", []):
            assert inp.get("link") is None or inp["link"] in listed, (n["id"], inp)
        for out in n.get("outputs", []):
            assert set(out.get("links") or []) <= listed, (n["id"], out)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_inputs_outputs_and_widget_values_match_the_nodes(name, catalogue):
    problems = []
    for n in load_workflow(name)["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            assert len(n["widgets_values"]) == 1 and isinstance(n["widgets_values"][0], str)
            continue
        info, where = catalogue[n["type"]], f"node {n['id']} ({n['type']})"
        outs = [(o["name"], o["type"]) for o in n["outputs"]]
        # newer releases may append outputs (0.33's SaveVideo returns its VIDEO); the frontend adds them on load
        assert outs == list(zip(info["output_name"], info["output"]))[:len(outs)], where
        for slot, o in enumerate(n["outputs"]):
            assert o.get("slot_index", slot) == slot, where
        specs = {name: (spec, req) for name, spec, req in all_inputs(info)}
        seen = set()
        for inp in n.get("inputs", []):
            assert inp["name"] in specs and inp["name"] not in seen, f"{where}: input {inp['name']}"
            seen.add(inp["name"])
            spec, _ = specs[inp["name"]]
            if is_widget(spec):  # a widget converted to an input socket
                assert inp.get("widget", {}).get("name") == inp["name"], f"{where}: {inp['name']} is a widget"
            else:
                assert "widget" not in inp, f"{where}: {inp['name']} is a socket"
        for iname, (spec, required) in specs.items():
            if required and not is_widget(spec):
                linked = any(i["name"] == iname and i.get("link") is not None for i in n.get("inputs", []))
                if not linked:
                    problems.append(f"{where}: required input {iname} is not connected")
        slots, values = widget_slots(info), n.get("widgets_values", [])
        # a widget a newer release appended as an optional input with a default is filled in on load
        appended = all(not specs.get(sl[0], (None, True))[1] and "default" in input_options(sl[2])
                       for sl in slots[len(values):])
        if len(slots) < len(values) or (len(slots) > len(values) and not appended):
            problems.append(f"{where}: {len(values)} widgets_values for {[(s[0], s[1]) for s in slots]}")
            continue
        for (iname, kind, spec), value in zip(slots, values):
            if kind == "control":
                ok = value in CONTROL_VALUES
                problems += [] if ok else [f"{where}: {iname} control {value!r}"]
            elif kind == "upload":
                problems += [] if value == "image" else [f"{where}: upload widget {value!r}"]
            else:
                p = value_problem(n["type"], iname, spec, value)
                problems += [f"{where}: {p}"] if p else []
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_api_prompt_has_every_required_input(name, catalogue):
    """What the frontend would queue (muted/bypassed nodes resolved) is complete."""
    prompt = to_api(load_workflow(name), catalogue)
    for nid, node in prompt.items():
        for iname, spec, required in all_inputs(catalogue[node["class_type"]]):
            if required:
                assert iname in node["inputs"], f"node {nid} ({node['class_type']}) lacks {iname}"
            value = node["inputs"].get(iname)
            if isinstance(value, list) and not is_widget(spec):
                assert value[0] in prompt, f"node {nid}.{iname} links to a node that is not sent"
    outputs = [n for n in prompt.values() if catalogue[n["class_type"]]["output_node"]]
    assert outputs, "no output node"


def _state_link_chain(wf):
    """Every active Apply gets its state from an active Load PTQ State or Calibrate node,
    its model from a ModelSamplingSD3, and feeds a sampler."""
    nodes, links = nodes_by_id(wf), {link[0]: link for link in wf["links"]}
    applies = of_type(wf, "HiF4ApplyW4A4")
    assert applies
    for a in applies:
        inp = {i["name"]: i for i in a["inputs"]}
        assert nodes[links[inp["ptq_state"]["link"]][1]]["type"] in ("HiF4LoadPTQState", "HiF4CalibrateWan22")
        assert nodes[links[inp["model"]["link"]][1]]["type"] == "ModelSamplingSD3"
        targets = [nodes[links[lid][3]]["type"] for lid in a["outputs"][0]["links"]]
        assert targets and set(targets) <= {"KSamplerAdvanced", "KSampler"}
        assert a["widgets_values"][0] == "auto"
    return applies


def test_t2v_apply_is_the_official_two_expert_structure_plus_hif4():
    wf = load_workflow(T2V_APPLY)
    counts = {t: len(of_type(wf, t)) for t in ("UNETLoader", "ModelSamplingSD3", "KSamplerAdvanced",
                                               "HiF4ApplyW4A4", "HiF4LoadPTQState", "CLIPLoader",
                                               "CLIPTextEncode", "EmptyHunyuanLatentVideo", "VAEDecode")}
    assert counts == {"UNETLoader": 2, "ModelSamplingSD3": 2, "KSamplerAdvanced": 2, "HiF4ApplyW4A4": 2,
                      "HiF4LoadPTQState": 1, "CLIPLoader": 1, "CLIPTextEncode": 2, "EmptyHunyuanLatentVideo": 1,
                      "VAEDecode": 1}
    _state_link_chain(wf)
    first, second = sorted(of_type(wf, "KSamplerAdvanced"), key=lambda n: n["widgets_values"][0] == "disable")
    assert first["widgets_values"][0] == "enable" and first["widgets_values"][-1] == "enable"
    assert second["widgets_values"][0] == "disable" and second["widgets_values"][-1] == "disable"
    assert first["widgets_values"][8] == second["widgets_values"][7]  # end_at_step == start_at_step


def test_lightning_is_the_official_4_step_graph_plus_hif4():
    """Each expert: UNETLoader -> the official lightx2v LoRA at 1.0 -> ModelSamplingSD3 (shift 5)
    -> Apply -> KSamplerAdvanced (4 steps, cfg 1, handover at 2); the muted calibration
    sees the same LoRA'd models on the same schedule."""
    wf = load_workflow(T2V_LIGHTNING)
    applies = _state_link_chain(wf)
    samplers = sorted(of_type(wf, "KSamplerAdvanced"), key=lambda n: n["widgets_values"][0] == "disable")
    (cal,) = of_type(wf, "HiF4CalibrateWan22", active_only=False)
    for expert, sampler in zip(LIGHTNING_LORAS, samplers):
        apply = _upstream(wf, sampler, "model", "HiF4ApplyW4A4")
        assert apply in applies
        shift = _upstream(wf, apply, "model", "ModelSamplingSD3")
        assert shift["widgets_values"] == [5.0]
        lora = _upstream(wf, shift, "model", "LoraLoaderModelOnly")
        assert lora["widgets_values"] == [LIGHTNING_LORAS[expert], 1.0]
        assert expert in _upstream(wf, lora, "model", "UNETLoader")["widgets_values"][0]
        assert _upstream(wf, cal, f"model_{expert}", "ModelSamplingSD3") is shift
    first, second = samplers
    assert first["widgets_values"][3:5] == [4, 1.0] and first["widgets_values"][7:9] == [0, 2]
    assert second["widgets_values"][3:5] == [4, 1.0] and second["widgets_values"][7] == 2
    assert cal["widgets_values"][1:3] == [4, 1.0] and cal["widgets_values"][5] == 2


@pytest.mark.parametrize("name", sorted(EXPECTED - {T2V_CALIBRATE}))
def test_apply_workflows_load_a_state_and_apply_it_per_expert(name):
    wf = load_workflow(name)
    applies = _state_link_chain(wf)
    unets = of_type(wf, "UNETLoader")
    assert len(applies) == len(unets) == (1 if name == TI2V_APPLY else 2)


def test_state_names_match_what_the_calibration_saves():
    """A fresh install: the first state a calibrate node saves is <prefix>_00001.safetensors,
    which is what the Load PTQ State nodes ask for."""
    def prefixes(wf):
        return {n["widgets_values"][-2] for n in of_type(wf, "HiF4CalibrateWan22", active_only=False)}

    t2v_prefix = prefixes(load_workflow(T2V_CALIBRATE))
    assert len(t2v_prefix) == 1
    for name in EXPECTED - {T2V_CALIBRATE}:
        wf = load_workflow(name)
        wanted = prefixes(wf) or t2v_prefix
        for load in of_type(wf, "HiF4LoadPTQState"):
            assert load["widgets_values"][0] in {f"{p}_00001.safetensors" for p in wanted}, name


def test_calibration_nodes_run_where_intended():
    """T2V: the calibrate workflow calibrates; I2V/TI2V/Lightning carry a muted calibrate node."""
    assert of_type(load_workflow(T2V_CALIBRATE), "HiF4CalibrateWan22")
    for name in (I2V_APPLY, TI2V_APPLY, T2V_LIGHTNING):
        wf = load_workflow(name)
        cal = of_type(wf, "HiF4CalibrateWan22", active_only=False)
        assert len(cal) == 1 and cal[0]["mode"] == 2
        assert cal[0]["widgets_values"][-1] == ""  # no extra prompts (I2V: they would lack the image)
    for name in (T2V_APPLY, T2V_COMPARE):
        assert not of_type(load_workflow(name), "HiF4CalibrateWan22", active_only=False)


def test_comparison_rows_differ_only_by_the_quantization():
    wf = load_workflow(T2V_COMPARE)
    nodes, links = nodes_by_id(wf), {link[0]: link for link in wf["links"]}
    samplers = of_type(wf, "KSamplerAdvanced")
    assert len(samplers) == 4
    firsts = [s for s in samplers if s["widgets_values"][0] == "enable"]
    assert len(firsts) == 2
    seeds = [next(i for i in s["inputs"] if i["name"] == "noise_seed") for s in firsts]
    assert seeds[0]["link"] is not None and links[seeds[0]["link"]][1] == links[seeds[1]["link"]][1], \
        "both rows take noise_seed from one node"
    assert nodes[links[seeds[0]["link"]][1]]["type"] == "PrimitiveInt"

    def upstream_models(s):
        chain, node = [], s
        while True:
            inp = next((i for i in node.get("inputs", []) if i["type"] == "MODEL"), None)
            if inp is None:
                return chain
            node = nodes[links[inp["link"]][1]]
            chain.append(node["type"])

    def key(s):
        ins = {i["name"]: links[i["link"]][1] for i in s["inputs"] if i["name"] not in ("model", "latent_image")}
        return json.dumps([s["widgets_values"], ins])

    rows = sorted(upstream_models(s) for s in samplers)
    assert rows == [["HiF4ApplyW4A4", "ModelSamplingSD3", "UNETLoader"]] * 2 + [["ModelSamplingSD3", "UNETLoader"]] * 2
    quant = [s for s in samplers if upstream_models(s)[0] == "HiF4ApplyW4A4"]
    plain = [s for s in samplers if upstream_models(s)[0] != "HiF4ApplyW4A4"]
    assert sorted(map(key, quant)) == sorted(map(key, plain))
    assert of_type(wf, "ImageStitch") and of_type(wf, "SaveVideo")
    (cmp_,) = of_type(wf, "HiF4CompareVideos")  # metrics: bf16 row first, HiF4 row second
    src = {i["name"]: nodes[links[i["link"]][1]] for i in cmp_["inputs"]}
    assert [upstream_models(nodes[links[d["inputs"][0]["link"]][1]])[0] for d in (src["images_a"], src["images_b"])] \
        == ["ModelSamplingSD3", "HiF4ApplyW4A4"]
    shown = {nodes[links[lid][3]]["type"] for o in cmp_["outputs"] for lid in o["links"]}
    assert shown == {"PreviewImage", "PreviewAny"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nodes_carry_the_registry_id_and_version_manager_installs_from(name, catalogue):
    """ComfyUI-Manager offers to install a workflow's missing nodes from each node's
    properties.cnr_id (the Comfy Registry id) and ver; core nodes say comfy-core."""
    project = _pyproject()["project"]
    for n in load_workflow(name)["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        plugin = catalogue[n["type"]]["python_module"] == PLUGIN_MODULE
        expected = (project["name"], project["version"]) if plugin else ("comfy-core", "0.3.64")
        assert (n["properties"].get("cnr_id"), n["properties"].get("ver")) == expected, (n["id"], n["type"])


def test_template_names_are_titles_a_person_reads():
    for name in EXPECTED:
        assert "_" not in name and "Wan2.2" in name and "HiF4" in name, name
        assert (WORKFLOWS / f"{name}.jpg").is_file(), f"{name}: no thumbnail"


def flow_simple_sigmas(shift: float, steps: int) -> list[float]:
    """ComfyUI's "simple" schedule of a ModelSamplingSD3 (discrete flow, 1000 timesteps)."""
    def sigma(t: float) -> float:
        return shift * t / (1 + (shift - 1) * t)
    table = [sigma(i / 1000) for i in range(1, 1001)]
    return [table[-(1 + int(x * len(table) / steps))] for x in range(steps)] + [0.0]


def _upstream(wf, node, input_name, node_type):
    """The nearest node of node_type feeding `input_name` of node (following MODEL inputs)."""
    nodes, links = nodes_by_id(wf), {link[0]: link for link in wf["links"]}
    inp = next(i for i in node["inputs"] if i["name"] == input_name)
    src = nodes[links[inp["link"]][1]]
    while src["type"] != node_type:
        src = nodes[links[next(i for i in src["inputs"] if i["type"] == "MODEL")["link"]][1]]
    return src


def test_wan22_t2v_boundary_with_shift_8_is_one_step_after_the_official_handover():
    """Why the templates set switch_step: -1 (Wan2.2's boundary sigma 0.875) gives step 11
    of 20 with shift 8 (sigma at step 10 is 0.889), the official graphs hand over at 10."""
    sigmas = flow_simple_sigmas(8.0, 20)
    assert round(sigmas[10], 3) == 0.889
    assert sampling.resolve_switch_step(-1, sigmas, 0.875) == 11


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_calibration_and_generation_switch_experts_at_the_same_step(name):
    """The state a template uses was calibrated with the expert handover its samplers use
    (the apply-only T2V templates use the state of the T2V calibration template)."""
    wf = load_workflow(name)
    own = of_type(wf, "HiF4CalibrateWan22", active_only=False)
    cal_wf = wf if own else load_workflow(T2V_CALIBRATE)
    (cal,) = of_type(cal_wf, "HiF4CalibrateWan22", active_only=False)
    seed, steps, cfg, sampler, scheduler, switch = cal["widgets_values"][:6]
    firsts = [s for s in of_type(wf, "KSamplerAdvanced") if s["widgets_values"][0] == "enable"]
    if name == TI2V_APPLY:  # one model: no handover
        assert not firsts and not any(i["name"] == "model_low_noise" and i.get("link") for i in cal["inputs"])
        return
    assert firsts
    if switch == -1:
        shift = _upstream(cal_wf, cal, "model_high_noise", "ModelSamplingSD3")["widgets_values"][0]
        assert scheduler == "simple", "the test computes only the simple schedule"
        kind = "i2v" if of_type(cal_wf, "WanImageToVideo") else "t2v"
        switch = sampling.resolve_switch_step(-1, flow_simple_sigmas(shift, steps), sampling.boundary_sigma(kind))
    for first in firsts:
        first_steps, first_end = first["widgets_values"][3], first["widgets_values"][8]
        assert (first_steps, first_end) == (steps, switch), f"{name}: samplers hand over at {first_end} of " \
            f"{first_steps} steps, the calibration at {switch} of {steps}"


# --------------------------------------------------------------------------- real ComfyUI

comfyui = pytest.mark.comfyui
needs_comfy = pytest.mark.skipif(bool(harness.missing_requirements()),
                                 reason=f"real ComfyUI unavailable: {harness.missing_requirements()}")

TINY_UNET = {"t2v_high": "tiny_wan2.2_t2v_high_noise.safetensors", "t2v_low": "tiny_wan2.2_t2v_low_noise.safetensors",
             "i2v_high": "tiny_wan2.2_i2v_high_noise.safetensors", "i2v_low": "tiny_wan2.2_i2v_low_noise.safetensors",
             "ti2v_5B": "tiny_wan2.2_ti2v_5b.safetensors"}
TINY_VAE = "tiny_wan_2.1_vae.safetensors"
TINY_LORA = {expert: f"tiny_lightning_{expert}.safetensors" for expert in LIGHTNING_LORAS}
TINY_STEPS = 4


def trim_catalogue(full: dict, types) -> dict:
    """The snapshot format: only `types`, no tooltips/descriptions, file lists emptied."""
    out = {}
    for t in sorted(types):
        info = copy.deepcopy(full[t])
        info.pop("description", None)
        for section, inputs in info["input"].items():
            if section == "hidden":
                continue
            for name, spec in inputs.items():
                if len(spec) > 1 and isinstance(spec[1], dict):
                    spec[1].pop("tooltip", None)
                if (t, name) in USER_FILES:
                    if isinstance(spec[0], list):
                        spec[0] = []
                    elif "options" in input_options(spec):
                        spec[1]["options"] = []
        info.pop("output_tooltips", None)
        out[t] = info
    return out


def tiny_prompt(prompt: dict) -> dict:
    """The API prompt on the harness's tiny models: random conditioning instead of the
    text encoder, 64x64x5 video, 4 steps, a flat start image; a Wan2.2-VAE decode
    (TI2V-5B, 48 channels; the harness has only a Wan2.1 VAE) becomes a latent digest."""
    p = copy.deepcopy(prompt)
    wan22_vae = {k for k, n in p.items() if n["class_type"] == "VAELoader"
                 and n["inputs"]["vae_name"] == "wan2.2_vae.safetensors"}
    replaced = set()
    for k, n in list(p.items()):
        t, inp = n["class_type"], n["inputs"]
        if t == "UNETLoader":
            inp["unet_name"] = next(v for key, v in TINY_UNET.items() if key in inp["unet_name"])
        elif t == "VAELoader":
            inp["vae_name"] = TINY_VAE
        elif t == "LoraLoaderModelOnly":
            inp["lora_name"] = next(v for key, v in TINY_LORA.items() if key in inp["lora_name"])
        elif t == "CLIPLoader":
            del p[k]
        elif t == "CLIPTextEncode":
            p[k] = harness.node("HarnessRandomConditioning", seed=int(k), length=512, active_tokens=24, dim=4096,
                                std=0.2, outlier_channels=4, outlier_scale=10.0)
        elif t == "LoadImage":
            p[k] = harness.node("EmptyImage", width=64, height=64, batch_size=1, color=0x808080)
        elif t in ("EmptyHunyuanLatentVideo", "WanImageToVideo", "Wan22ImageToVideoLatent"):
            inp.update(width=64, height=64, length=5)
        elif t in ("KSamplerAdvanced", "KSampler", "HiF4CalibrateWan22"):
            scale = TINY_STEPS / inp["steps"]
            inp["steps"] = TINY_STEPS
            for s in ("start_at_step", "end_at_step"):
                if s in inp and inp[s] < 10000:
                    inp[s] = round(inp[s] * scale)
            if t == "HiF4CalibrateWan22":
                if inp["switch_step"] >= 0:
                    inp["switch_step"] = round(inp["switch_step"] * scale)
                inp.pop("clip", None)
                inp["extra_prompts"] = ""
        elif t == "VAEDecode" and inp["vae"][0] in wan22_vae:
            p[k] = harness.node("HarnessLatentDigest", samples=inp["samples"], label=f"latent_{k}")
            replaced.add(k)

    def refs(node):
        return [v[0] for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]

    for k in [k for k, n in p.items() if set(refs(n)) & replaced]:  # consumed the decoded images
        del p[k]
    while True:  # and whatever consumed those
        gone = [k for k, n in p.items() if any(r not in p for r in refs(n))]
        if not gone:
            break
        for k in gone:
            del p[k]
    return p


def only_ancestors_of(prompt: dict, node_id: str) -> dict:
    keep, todo = set(), [node_id]
    while todo:
        k = todo.pop()
        if k in keep:
            continue
        keep.add(k)
        todo += [v[0] for v in prompt[k]["inputs"].values() if isinstance(v, list) and len(v) == 2
                 and isinstance(v[0], str)]
    return {k: v for k, v in prompt.items() if k in keep}


def unmuted_calibration(name: str, catalogue) -> tuple[dict, str]:
    """The workflow with its muted calibrate node switched on, cut to that node's inputs."""
    wf = load_workflow(name)
    cal = of_type(wf, "HiF4CalibrateWan22", active_only=False)[0]
    cal["mode"] = 0
    return only_ancestors_of(to_api(wf, catalogue), str(cal["id"])), str(cal["id"])


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflows_ws")
    models = harness.make_models_dir(root)
    for seed, name in enumerate(TINY_LORA.values()):  # stand-ins for the Lightning LoRAs
        harness.write_lora(models / "loras" / name, [f"blocks.{i}.{n}" for i in range(4)
                                                     for n in ("self_attn.q", "ffn.0", "ffn.2")], seed=seed)
    server = harness.ComfyServer(models, [harness.plugin_link(root)], log_path=root / "comfy.log")
    yield {"server": server, "models": models}
    server.stop()


def run_ok(server, prompt: dict, timeout=600):
    status, resp = server.queue(prompt)
    assert status == 200, json.dumps(resp)[:4000]
    assert resp.get("node_errors") == {}, json.dumps(resp["node_errors"])[:4000]
    entry = server.wait(resp["prompt_id"], timeout)
    result = harness.Result(status=entry["status"].get("status_str"), entry=entry)
    assert result.status == "success", result.describe()
    return result


def live_version(server) -> str:
    return server.http("/system_stats")[1]["system"]["comfyui_version"]


@comfyui
@needs_comfy
def test_snapshot_matches_the_live_catalogue(live):
    """The plugin's nodes and the core nodes the workflows use, as the running ComfyUI
    declares them, equal its snapshot (a version without a snapshot fails: make one)."""
    server = live["server"]
    full, version = server.object_info(), live_version(server)
    used = workflow_node_types() | {t for t, info in full.items() if info["python_module"] == PLUGIN_MODULE}
    path = fixture_path(version)
    if os.environ.get("HIF4_UPDATE_OBJECT_INFO") == "1":
        data = {"_meta": {"comfyui_version": version, "source": "../shared/comfy_harness/run_prompt.py "
                          "--object-info, trimmed by tests/test_workflows.py:trim_catalogue",
                          "note": "tooltips/descriptions dropped; user-file option lists emptied"},
                **trim_catalogue(full, used)}
        path.write_text(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    assert path.is_file(), f"no snapshot for ComfyUI {version}: rerun with HIF4_UPDATE_OBJECT_INFO=1"
    assert version in TESTED_VERSIONS, f"add {version} to TESTED_VERSIONS"
    assert trim_catalogue(full, used) == load_catalogue(version), \
        "the node catalogue changed: rerun with HIF4_UPDATE_OBJECT_INFO=1 and review the diff"


@comfyui
@needs_comfy
def test_comfyui_lists_and_serves_the_workflows_as_templates(live):
    server = live["server"]
    status, listing = server.http("/workflow_templates")
    assert status == 200
    assert sorted(listing.get(harness.PLUGIN_NAME, [])) == sorted(EXPECTED), listing
    for name in EXPECTED:
        url = f"{server.url}/api/workflow_templates/{harness.PLUGIN_NAME}/{urllib.parse.quote(name)}.json"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert json.loads(r.read()) == load_workflow(name)


@pytest.fixture(scope="module")
def live_catalogue(live):
    """The snapshot of the running ComfyUI's version (the workflows run against it)."""
    return load_catalogue(live_version(live["server"]))


@pytest.fixture(scope="module")
def calibrated(live, live_catalogue):
    """The four calibrations the workflows provide, run on the tiny models: the T2V
    calibrate workflow as a whole (with its preview), and the muted calibrate nodes of
    the I2V, TI2V and Lightning workflows switched on. Each saves <prefix>_00001.safetensors."""
    server = live["server"]
    results = {T2V_CALIBRATE:
               run_ok(server, tiny_prompt(to_api(load_workflow(T2V_CALIBRATE), live_catalogue)))}
    for name in (I2V_APPLY, TI2V_APPLY, T2V_LIGHTNING):
        prompt, _ = unmuted_calibration(name, live_catalogue)
        results[name] = run_ok(server, tiny_prompt(prompt))
    saved = sorted(p.name for p in (live["models"] / "calib_states").iterdir())
    assert saved == ["wan22_i2v_a14b_hif4_00001.safetensors", "wan22_t2v_a14b_hif4_00001.safetensors",
                     "wan22_t2v_a14b_lightning_hif4_00001.safetensors", "wan22_ti2v_5b_hif4_00001.safetensors"]
    return results


@comfyui
@needs_comfy
def test_calibrate_workflow_saves_a_state_and_renders_a_preview(calibrated, live_catalogue):
    result = calibrated[T2V_CALIBRATE]
    assert [s["filename"] for s in result.saved_states()] == ["wan22_t2v_a14b_hif4_00001.safetensors"]
    wf = load_workflow(T2V_CALIBRATE)
    save = str(of_type(wf, "SaveVideo")[0]["id"])
    assert save in result.outputs, result.describe()


@comfyui
@needs_comfy
@pytest.mark.parametrize("name", sorted(EXPECTED - {T2V_CALIBRATE}))
def test_workflow_runs_in_comfyui(name, live, calibrated, live_catalogue):
    wf = load_workflow(name)
    prompt = tiny_prompt(to_api(wf, live_catalogue))
    assert any(n["class_type"] == "HiF4ApplyW4A4" for n in prompt.values())
    digests = {}
    if name == T2V_COMPARE:  # also look at both rows
        for d in of_type(wf, "VAEDecode"):
            label = "hif4" if "HiF4" in d.get("title", "") else "plain"
            digests[label] = str(1000 + d["id"])
            prompt[digests[label]] = harness.node("HarnessImageDigest", images=[str(d["id"]), 0], label=label)
    result = run_ok(live["server"], prompt)
    outputs = [str(n["id"]) for n in of_type(wf, "SaveVideo")]
    if name == TI2V_APPLY:  # decoded by a digest instead (see tiny_prompt)
        assert any(d["label"].startswith("latent_") for o in result.outputs.values()
                   for d in o.get("harness_digest", []))
    else:
        assert all(o in result.outputs for o in outputs), result.describe()
    if digests:
        plain, hif4 = result.digest("plain"), result.digest("hif4")
        assert plain["finite"] and hif4["finite"] and plain["shape"] == hif4["shape"]
        assert plain["sha256"] != hif4["sha256"], "the HiF4 row should differ from the unquantized row"
        report = result.outputs[str(of_type(wf, "PreviewAny")[0]["id"])]["text"][0]
        assert f"({plain['shape'][0]} frames)" in report, report
        psnr = float(re.search(r"overall: PSNR (\S+) dB", report).group(1))
        ssim = float(re.search(r"SSIM ([0-9.]+) \(worst", report).group(1))
        assert 0 < psnr < 200 and 0 <= ssim < 1, report  # finite: the rows differ
        assert len(result.outputs[str(of_type(wf, "PreviewImage")[0]["id"])]["images"]) == 1


def _apply_texts(result, wf) -> dict[str, list[str]]:
    """The text each Apply node showed (its "ui" output), by node title."""
    return {a["title"]: result.outputs.get(str(a["id"]), {}).get("text", []) for a in of_type(wf, "HiF4ApplyW4A4")}


@comfyui
@needs_comfy
def test_lightning_state_records_its_schedule_and_loras(live, calibrated):
    state = hstate.load_state(live["models"] / "calib_states" / "wan22_t2v_a14b_lightning_hif4_00001.safetensors")
    c = state.calibration
    assert (c["steps"], c["cfg"], c["switch_step"]) == (4, 1.0, 2)
    for expert in LIGHTNING_LORAS:
        (group,) = state.patches[expert]
        assert group["strength"] == 1.0 and group["keys"] == 12  # the tiny LoRA patches 12 Linears
        assert group["names"] == [TINY_LORA[expert]]  # found upstream through ModelSamplingSD3


@comfyui
@needs_comfy
def test_lightning_apply_is_silent_with_its_loras_and_warns_at_another_strength(live, calibrated, live_catalogue):
    wf = load_workflow(T2V_LIGHTNING)
    prompt = tiny_prompt(to_api(wf, live_catalogue))
    assert _apply_texts(run_ok(live["server"], prompt), wf) == {a["title"]: [] for a in of_type(wf, "HiF4ApplyW4A4")}
    high_lora = next(k for k, n in prompt.items() if n["class_type"] == "LoraLoaderModelOnly"
                     and "high_noise" in n["inputs"]["lora_name"])
    prompt[high_lora]["inputs"]["strength_model"] = 0.5
    texts = _apply_texts(run_ok(live["server"], prompt), wf)
    assert texts["Apply HiFloat4 W4A4 (low noise)"] == []
    (warning,) = texts["Apply HiFloat4 W4A4 (high noise)"]
    assert f"different strength: 12 patched weights at 0.5, calibrated at 1 ({TINY_LORA['high_noise']})" in warning
