"""Specification of nodes/comfy/lora_graph.py: the LoRA file names and strengths
upstream of the Calibrate node's MODEL inputs in a queued (API-format) prompt. Plain
CPU, no ComfyUI."""
import pytest
from nodes_by_path import load_node_module

lora_graph = load_node_module("comfy/lora_graph")
loras_upstream = lora_graph.loras_upstream


def unet(name="wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def lora(model, name, strength=1.0, class_type="LoraLoaderModelOnly"):
    return {"class_type": class_type, "inputs": {"model": [model, 0], "lora_name": name, "strength_model": strength}}


def shift(model):
    return {"class_type": "ModelSamplingSD3", "inputs": {"model": [model, 0], "shift": 5.0}}


def calibrate(high, low=None):
    inputs = {"model_high_noise": [high, 0], "steps": 4}
    if low is not None:
        inputs["model_low_noise"] = [low, 0]
    return {"class_type": "HiF4CalibrateWan22", "inputs": inputs}


HIGH = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors"
LOW = "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors"


def test_the_lightning_chain_through_model_sampling_gives_each_expert_its_lora():
    prompt = {"1": unet(), "2": lora("1", HIGH), "3": shift("2"), "4": unet("low"), "5": lora("4", LOW),
              "6": shift("5"), "9": calibrate("3", "6")}
    assert loras_upstream(prompt, "9", "model_high_noise") == {1.0: [HIGH]}
    assert loras_upstream(prompt, "9", "model_low_noise") == {1.0: [LOW]}


def test_stacked_loaders_group_by_strength_in_load_order():
    prompt = {"1": unet(), "2": lora("1", "a.safetensors"), "3": lora("2", "b.safetensors", 0.5, "LoraLoader"),
              "4": lora("3", "c.safetensors"), "9": calibrate("4")}
    assert loras_upstream(prompt, "9", "model_high_noise") == {1.0: ["a.safetensors", "c.safetensors"],
                                                                0.5: ["b.safetensors"]}


def test_a_custom_loader_with_lora_name_and_strength_model_counts():
    prompt = {"1": unet(), "2": lora("1", "a.safetensors", 0.8, "MyLoraLoader"), "9": calibrate("2")}
    assert loras_upstream(prompt, "9", "model_high_noise") == {0.8: ["a.safetensors"]}


def test_a_linked_strength_records_no_name_but_the_walk_goes_on():
    prompt = {"1": unet(), "2": lora("1", "a.safetensors"), "3": lora("2", "b.safetensors"),
              "7": {"class_type": "PrimitiveFloat", "inputs": {"value": 1.0}}, "9": calibrate("3")}
    prompt["3"]["inputs"]["strength_model"] = ["7", 0]
    assert loras_upstream(prompt, "9", "model_high_noise") == {1.0: ["a.safetensors"]}


def test_an_unconnected_input_has_no_loras():
    prompt = {"1": unet(), "2": lora("1", HIGH), "9": calibrate("2")}
    assert loras_upstream(prompt, "9", "model_low_noise") == {}


@pytest.mark.parametrize("prompt, node_id", [
    (None, "9"), ({}, None), ({}, "9"), ([], "9"), ("garbage", "9"),
    ({"9": "not a node"}, "9"), ({"9": {"inputs": "x"}}, "9"), ({"9": calibrate("404")}, "9"),
    ({"9": calibrate("2"), "2": {"class_type": "LoraLoader"}}, "9"),
    ({"9": calibrate("2"), "2": {"inputs": {"model": ["2", 0], "lora_name": "loop.safetensors",
                                            "strength_model": 1.0}}}, "9"),  # a cycle
    ({"9": calibrate("2"), "2": {"inputs": {"model": [["2"], 0], "lora_name": 5, "strength_model": True}}}, "9"),
    ({"9": {"inputs": {"model_high_noise": [None, 0, 1]}}}, "9"),
])
def test_garbage_and_cyclic_graphs_give_what_they_can_and_never_raise(prompt, node_id):
    found = loras_upstream(prompt, node_id, "model_high_noise")
    assert found in ({}, {1.0: ["loop.safetensors"]})
