"""Specification of hifloat4.experts: which expert of a PTQ state fits a model, and a
refusal that says what the state was made for and what the model is."""
import pytest
import torch

from hifloat4 import experts, wan
from hifloat4.tools.tiny_wan import make_tiny_wan
from hifloat4.wan_model import WanConfig, WanModel

HIGH, LOW = "high_noise", "low_noise"


def small(variant="t2v", **kw):
    return wan.fingerprint(make_tiny_wan(variant, dim=128, ffn_dim=256, layers=2, text_dim=64, **kw))


def meta_fingerprint(**kw) -> dict:
    with torch.device("meta"):
        return wan.fingerprint(WanModel(WanConfig(**kw)))


@pytest.fixture(scope="module")
def t2v_pair():
    return {HIGH: small("t2v", expert=HIGH), LOW: small("t2v", expert=LOW)}


# --------------------------------------------------------------------------- words

def test_a14b_experts_are_named_as_users_know_them():
    t2v = meta_fingerprint(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40)
    i2v = meta_fingerprint(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40, in_dim=36)
    assert experts.expert_title(t2v, HIGH) == "Wan2.2 T2V-A14B (high-noise expert)"
    assert wan.fingerprint_title(i2v) == "Wan2.2 I2V-A14B"


def test_ti2v_5b_single_model_has_no_expert_label():
    ti2v = meta_fingerprint(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_dim=48, out_dim=48)
    assert experts.expert_title(ti2v, "single") == "Wan2.2 TI2V-5B"


def test_other_sizes_say_their_type_and_size():
    assert wan.fingerprint_title(small("i2v")) == "a custom Wan2.2 I2V model (dim 128, 2 blocks, 36 input channels)"


def test_state_title_lists_the_model_once_and_its_experts(t2v_pair):
    assert experts.state_title(t2v_pair) == "a custom Wan2.2 T2V model (dim 128, 2 blocks, 16 input channels) " \
                                            "(high-noise and low-noise experts)"


# --------------------------------------------------------------------------- decisions

def test_auto_takes_the_expert_with_the_same_weights(t2v_pair):
    assert experts.choose_expert(small("t2v", expert=LOW), t2v_pair, "auto") == experts.ExpertChoice(LOW)


def test_auto_refuses_another_model_type_saying_what_the_state_was_made_for(t2v_pair):
    with pytest.raises(experts.ExpertMismatch) as e:
        experts.choose_expert(small("i2v"), t2v_pair, "auto")
    msg = str(e.value)
    assert "made for a custom Wan2.2 T2V model" in msg and "this model is a custom Wan2.2 I2V model" in msg
    assert "shape_hash" not in msg and "content_hash" not in msg


@pytest.mark.parametrize("requested", [HIGH, LOW])
def test_another_model_type_is_refused_even_when_the_expert_is_named(t2v_pair, requested):
    with pytest.raises(experts.ExpertMismatch, match="even when the expert is picked explicitly") as e:
        experts.choose_expert(small("i2v"), t2v_pair, requested)
    assert f"T2V model (dim 128, 2 blocks, 16 input channels) ({requested.replace('_', '-')} expert)" in str(e.value)


def test_other_dims_are_another_model_type(t2v_pair):
    bigger = wan.fingerprint(make_tiny_wan("t2v", dim=128, ffn_dim=512, layers=2, text_dim=64))
    with pytest.raises(experts.ExpertMismatch, match="another model type"):
        experts.choose_expert(bigger, t2v_pair, HIGH)


def test_auto_refuses_other_weights_of_the_same_type_and_says_how_to_override(t2v_pair):
    with pytest.raises(experts.ExpertMismatch, match="pick that expert explicitly") as e:
        experts.choose_expert(small("t2v", seed=7), t2v_pair, "auto")
    assert "this model is a custom Wan2.2 T2V model (dim 128, 2 blocks, 16 input channels) with other weights" \
        in str(e.value)


def test_named_expert_on_other_weights_of_the_same_type_is_taken_with_a_warning(t2v_pair):
    choice = experts.choose_expert(small("t2v", seed=7), t2v_pair, HIGH)
    assert choice.name == HIGH
    assert "weights differ" in choice.warning and "T2V" in choice.warning


def test_named_expert_on_its_own_weights_has_no_warning(t2v_pair):
    assert experts.choose_expert(small("t2v", expert=HIGH), t2v_pair, HIGH) == experts.ExpertChoice(HIGH)


def test_named_expert_must_exist_in_the_state(t2v_pair):
    with pytest.raises(experts.ExpertMismatch, match="no single expert; it has: high_noise, low_noise"):
        experts.choose_expert(small("t2v"), t2v_pair, "single")


def test_unknown_request_is_refused(t2v_pair):
    with pytest.raises(experts.ExpertMismatch, match="one of auto, high_noise"):
        experts.choose_expert(small("t2v"), t2v_pair, "medium")
