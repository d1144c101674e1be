"""Specification of nodes/policy.py: the pure decisions of the ComfyUI nodes
(prompts, state file names, empty file lists). Plain CPU,
no ComfyUI."""
import pytest
from nodes_by_path import load_node_module

policy = load_node_module("policy")

# --------------------------------------------------------------------------- prompts

def test_split_prompts_one_per_nonblank_line_stripped():
    assert policy.split_prompts(" a cat \n\n  \nthe sea\r\n") == ["a cat", "the sea"]


def test_split_prompts_of_nothing_is_empty():
    assert policy.split_prompts("") == [] and policy.split_prompts(None) == []


def test_prompt_seed_differs_per_prompt_and_wraps_at_64_bits():
    assert [policy.prompt_seed(7, i) for i in range(3)] == [7, 8, 9]
    assert policy.prompt_seed(2**64 - 1, 1) == 0


# --------------------------------------------------------------------------- file names

def test_next_counter_starts_at_one():
    assert policy.next_counter([], "wan") == 1


def test_next_counter_follows_the_highest_existing_number():
    names = ["wan_00001.safetensors", "wan_00007.safetensors", "wan_00003.safetensors"]
    assert policy.next_counter(names, "wan") == 8


def test_next_counter_ignores_other_prefixes_and_extensions():
    names = ["wan2_00009.safetensors", "wan_00009.json", "wan_x.safetensors", "other.safetensors"]
    assert policy.next_counter(names, "wan") == 1


def test_next_counter_treats_regex_characters_in_the_prefix_literally():
    assert policy.next_counter(["a.b_00002.safetensors", "axb_00005.safetensors"], "a.b") == 3


def test_state_filename_has_five_digit_counter():
    assert policy.state_filename("wan22_hif4", 12) == "wan22_hif4_00012.safetensors"


def test_split_prefix_separates_subfolder():
    assert policy.split_prefix("wan22/t2v") == ("wan22", "t2v")
    assert policy.split_prefix("plain") == ("", "plain")


@pytest.mark.parametrize("bad", ["../x", "/etc/x", "a/../../x", "C:/x", "", "dir/"])
def test_split_prefix_refuses_names_leaving_calib_states(bad):
    with pytest.raises(ValueError):
        policy.split_prefix(bad)


def test_is_safetensors_name_accepts_only_safetensors():
    assert policy.is_safetensors_name("a/b.safetensors") and not policy.is_safetensors_name("b.pt")


def test_video_size_of_wan21_and_wan22_latents():
    assert policy.video_size([1, 16, 21, 60, 104]) == {"width": 832, "height": 480, "frames": 81}
    assert policy.video_size([1, 48, 31, 44, 80]) == {"width": 1280, "height": 704, "frames": 121}


# --------------------------------------------------------------------------- empty file lists

def test_empty_list_says_where_files_are_looked_for_and_how_to_make_one():
    msg = policy.unpicked_file(None, [], "PTQ states", ["/m/calib_states", "/p/calib_states"], "run Calibrate")
    assert msg == "no PTQ states in /m/calib_states, /p/calib_states: run Calibrate, then press R to refresh the list"


@pytest.mark.parametrize("value", [None, ""])
def test_nothing_picked_from_a_list_with_files_asks_to_pick_one(value):
    assert policy.unpicked_file(value, ["a.safetensors"], "PTQ states", ["/m"], "x") == \
        "no PTQ states picked: choose one of the 1 in the list"


def test_a_picked_name_is_left_to_the_usual_checks():
    assert policy.unpicked_file("gone.safetensors", [], "PTQ states", ["/m"], "x") is None


def test_is_safetensors_name_of_a_missing_value_is_false():
    assert not policy.is_safetensors_name(None)


def test_extra_prompt_takes_the_start_image_entries_of_the_main_prompt():
    image, mask = object(), object()
    main = [["main-text", {"concat_latent_image": image, "concat_mask": mask, "pooled_output": "main-pooled"}]]
    encoded = [["extra-text", {"pooled_output": "extra-pooled"}]]
    out = policy.like_main_prompt(encoded, main)
    assert out == [["extra-text", {"concat_latent_image": image, "concat_mask": mask, "pooled_output": "extra-pooled"}]]


def test_extra_prompt_of_a_text_only_main_prompt_is_unchanged():
    encoded = [["extra-text", {"pooled_output": "p"}]]
    assert policy.like_main_prompt(encoded, [["main", {}]]) == encoded


# --------------------------------------------------------------------------- quantization choices

def _state():
    from hifloat4.state import PTQState
    return PTQState(experts={})


def test_as_calibrated_inputs_become_none_in_the_core_config():
    config = policy.w4a4_config(_state(), "auto")
    assert (config.alpha, config.statistic, config.rotation, config.keep_high_precision) == (None, None, None, 0)


def test_chosen_inputs_pass_through_to_the_core_config():
    config = policy.w4a4_config(_state(), "high_noise", alpha=0.25, statistic="adaptive", rotation="hadamard",
                                rotation_block=256, keep_high_precision=3)
    assert (config.expert, config.alpha, config.statistic, config.rotation, config.rotation_block,
            config.keep_high_precision) == ("high_noise", 0.25, "adaptive", "hadamard", 256, 3)


def test_apply_and_save_declare_the_same_choices_with_their_defaults_as_calibrated():
    inputs = policy.quantization_inputs()
    defaults = {k: v[1]["default"] for k, v in inputs.items()}
    assert defaults == {"alpha": -1.0, "statistic": "as calibrated", "rotation": "as calibrated",
                        "rotation_block": 512, "keep_high_precision": 0}
    assert policy.w4a4_config(_state(), "auto", **defaults) == policy.w4a4_config(_state(), "auto")


def test_auto_weights_stay_packed_on_a_gpu_only():
    assert policy.keep_packed("auto", "cuda") and not policy.keep_packed("auto", "cpu")
    assert policy.keep_packed("packed", "cpu") and not policy.keep_packed("unpacked", "cuda")


def test_an_unknown_weights_choice_is_refused():
    with pytest.raises(ValueError, match="weights must be one of"):
        policy.keep_packed("fp8", "cuda")
