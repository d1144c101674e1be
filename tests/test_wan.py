"""Specification of hifloat4.wan: the Wan2.2 layer policy, variant detection, fingerprints."""
import json

import pytest
import torch

from hifloat4 import wan
from hifloat4.tools.tiny_wan import make_tiny_wan
from hifloat4.wan_model import WanConfig, WanModel

A14B = dict(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40)
TI2V_5B = dict(dim=3072, ffn_dim=14336, num_layers=30, num_heads=24, in_dim=48, out_dim=48)


def meta_wan(**kw) -> WanModel:
    """A real-size Wan transformer that allocates no memory."""
    with torch.device("meta"):
        return WanModel(WanConfig(**kw))


def boundary(obj) -> list[str]:
    """The layers kept in high precision (text/time embeddings, time projection, head, img_emb.*)."""
    return wan.classify_layer_names(wan.linear_shapes(obj))[1]


def unclassified(obj) -> list[str]:
    """Linears that are neither main nor boundary: left untouched by the policy."""
    return wan.classify_layer_names(wan.linear_shapes(obj))[2]


@pytest.fixture(scope="module")
def t2v_a14b():
    return meta_wan(**A14B)


def small(variant="t2v", **kw) -> WanModel:
    """A fast tiny model for fingerprint tests."""
    return make_tiny_wan(variant, dim=128, ffn_dim=256, layers=2, text_dim=64, **kw)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_wan("t2v", layers=3)


# --------------------------------------------------------------------------- layer policy

def test_a14b_expert_has_400_main_linears(t2v_a14b):
    assert len(wan.main_linear_names(t2v_a14b)) == 400


def test_a14b_expert_has_6_boundary_linears(t2v_a14b):
    assert boundary(t2v_a14b) == [
        "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
        "time_projection.1", "head.head"]


def test_ti2v_5b_has_300_main_and_6_boundary_linears():
    model = meta_wan(**TI2V_5B)
    assert (len(wan.main_linear_names(model)), len(boundary(model))) == (300, 6)


def test_main_linears_come_in_block_order_then_fixed_layer_order(tiny):
    names = wan.main_linear_names(tiny)
    assert names[:10] == [f"blocks.0.{s}" for s in (
        "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
    assert names[10] == "blocks.1.self_attn.q" and names[-1] == "blocks.2.ffn.2"


def test_block_order_is_numeric_not_lexicographic():
    names = wan.main_linear_names(meta_wan(dim=128, ffn_dim=128, num_layers=12))
    assert [n for n in names if n.endswith("ffn.2")][9:11] == ["blocks.9.ffn.2", "blocks.10.ffn.2"]


def test_state_dict_gives_the_same_names_as_the_module(tiny):
    sd = tiny.state_dict()
    assert wan.main_linear_names(sd) == wan.main_linear_names(tiny)
    assert boundary(sd) == boundary(tiny)


def test_shape_mapping_gives_the_same_names_as_the_module(t2v_a14b):
    shapes = {k: list(v.shape) for k, v in t2v_a14b.state_dict().items()}
    assert wan.main_linear_names(shapes) == wan.main_linear_names(t2v_a14b)


def test_comfyui_key_prefix_is_stripped(tiny):
    sd = {"model.diffusion_model." + k: v for k, v in tiny.state_dict().items()}
    sd["first_stage_model.decoder.conv.weight"] = torch.zeros(2, 2)
    assert wan.main_linear_names(sd) == wan.main_linear_names(tiny)


def test_wrapped_module_prefix_is_stripped(tiny):
    wrapper = torch.nn.Module()
    wrapper.diffusion_model = tiny
    assert boundary(wrapper) == boundary(tiny)
    assert wan.find_prefix(wan._raw_entries(wrapper)[0]) == "diffusion_model."


def test_img_emb_linears_are_boundary_and_k_img_v_img_are_unclassified():
    model = meta_wan(dim=128, ffn_dim=256, num_layers=2, in_dim=36, img_dim=1280)
    assert boundary(model)[-2:] == ["img_emb.proj.1", "img_emb.proj.3"]
    assert unclassified(model) == [
        "blocks.0.cross_attn.k_img", "blocks.0.cross_attn.v_img",
        "blocks.1.cross_attn.k_img", "blocks.1.cross_attn.v_img"]
    assert len(wan.main_linear_names(model)) == 20


def test_wan22_models_have_no_unclassified_linears(tiny):
    assert unclassified(tiny) == []


def test_extra_linear_is_reported_not_classified(tiny):
    sd = dict(tiny.state_dict())
    sd["vace_blocks.0.after_proj.weight"] = torch.zeros(256, 256)
    assert unclassified(sd) == ["vace_blocks.0.after_proj"]
    assert "vace_blocks.0.after_proj" not in wan.main_linear_names(sd)


def test_norm_and_modulation_weights_are_not_linears(tiny):
    names = wan.linear_shapes(tiny.state_dict())
    assert not any("norm" in n or "modulation" in n or "patch_embedding" in n for n in names)


def test_linear_shapes_are_out_in(tiny):
    shapes = wan.linear_shapes(tiny)
    assert shapes["blocks.0.ffn.0"] == (512, 256) and shapes["text_embedding.0"] == (256, 4096)


class _LinearLikeOp(torch.nn.Module):
    """Computes like a Linear without subclassing nn.Linear (as ComfyUI's mixed-precision ops do)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features))


def test_linear_like_modules_that_do_not_subclass_nn_linear_are_layers(tiny):
    model = make_tiny_wan("t2v", layers=3)
    model.blocks[1].ffn[0] = _LinearLikeOp(256, 512)
    assert wan.linear_shapes(model) == wan.linear_shapes(tiny)


def test_a_module_whose_weight_does_not_fit_its_features_is_not_a_linear():
    op = _LinearLikeOp(4, 3)
    op.in_features = 5
    assert not wan.is_linear(op) and wan.is_linear(torch.nn.Linear(2, 3))


# --------------------------------------------------------------------------- variant

def test_detects_t2v_a14b(t2v_a14b):
    v = wan.detect_variant(t2v_a14b)
    assert (v.family, v.variant, v.kind, v.dim, v.ffn_dim, v.layers, v.in_dim, v.out_dim) == \
        ("wan2.2", "t2v_a14b", "t2v", 5120, 13824, 40, 16, 16)


def test_detects_i2v_a14b_from_36_input_channels():
    v = wan.detect_variant(meta_wan(in_dim=36, **A14B))
    assert (v.variant, v.kind) == ("i2v_a14b", "i2v")


def test_detects_ti2v_5b():
    v = wan.detect_variant(meta_wan(**TI2V_5B))
    assert (v.variant, v.kind, v.layers, v.in_dim, v.out_dim) == ("ti2v_5b", "ti2v", 30, 48, 48)


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v"])
def test_tiny_models_are_custom_variants_of_their_kind(variant):
    v = wan.detect_variant(make_tiny_wan(variant, layers=1, text_dim=64).state_dict())
    assert (v.family, v.variant, v.kind, v.dim, v.ffn_dim, v.layers, v.text_dim) == \
        ("wan2.2", "custom", variant, 256, 512, 1, 64)


def test_img_emb_marks_a_wan21_model():
    v = wan.detect_variant(meta_wan(in_dim=36, img_dim=1280, **A14B))
    assert (v.family, v.variant, v.has_img_emb) == ("wan2.1", "custom", True)


def test_non_wan_module_is_rejected():
    with pytest.raises(wan.NotWanError, match="not a Wan transformer"):
        wan.detect_variant(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_missing_block_layer_is_rejected(tiny):
    sd = dict(tiny.state_dict())
    del sd["blocks.1.cross_attn.v.weight"]
    with pytest.raises(wan.NotWanError, match="blocks.1.cross_attn.v"):
        wan.detect_variant(sd)


# --------------------------------------------------------------------------- fingerprint

def test_fingerprint_lists_main_and_boundary_layer_shapes(tiny):
    fp = wan.fingerprint(tiny)
    assert len(fp["layers"]) == 30 + 6
    assert fp["layers"]["blocks.2.ffn.2"] == [256, 512]
    assert list(fp["layers"]) == sorted(fp["layers"])


def test_t2v_and_i2v_differ_in_shape_hash_though_their_linears_are_equal():
    t2v, i2v = wan.fingerprint(small("t2v")), wan.fingerprint(small("i2v"))
    assert t2v["layers"] == i2v["layers"]
    assert t2v["shape_hash"] != i2v["shape_hash"]


def test_fingerprint_is_json_serialisable(tiny):
    fp = wan.fingerprint(tiny)
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_is_well_formed(tiny):
    wan.check_fingerprint(wan.fingerprint(tiny))


def test_experts_with_equal_shapes_get_equal_shape_hash_and_different_content_hash():
    hi = wan.fingerprint(small("t2v", expert="high_noise"))
    lo = wan.fingerprint(small("t2v", expert="low_noise"))
    assert hi["shape_hash"] == lo["shape_hash"]
    assert hi["content_hash"] != lo["content_hash"]


def test_fingerprint_of_state_dict_equals_fingerprint_of_module(tiny):
    assert wan.fingerprint(tiny.state_dict()) == wan.fingerprint(tiny)


def test_content_hash_ignores_storage_dtype_of_a_bf16_checkpoint():
    bf16 = small("t2v", dtype=torch.bfloat16)
    as_fp32 = {k: v.float() for k, v in bf16.state_dict().items()}
    as_fp16 = {k: v.half() for k, v in bf16.state_dict().items()}
    hashes = {wan.fingerprint(sd)["content_hash"] for sd in (bf16.state_dict(), as_fp32, as_fp16)}
    assert len(hashes) == 1


def test_content_hash_sees_a_change_in_a_probed_weight(tiny):
    sd = dict(tiny.state_dict())
    before = wan.fingerprint(sd)["content_hash"]
    sd["head.head.weight"] = sd["head.head.weight"].clone()
    sd["head.head.weight"][0, 0] += 1.0
    assert wan.fingerprint(sd)["content_hash"] != before


def test_meta_model_has_shapes_but_no_content_hash(t2v_a14b):
    fp = wan.fingerprint(t2v_a14b)
    assert len(fp["layers"]) == 406 and fp["content_hash"] is None and fp["probe"] is None


def test_get_weight_overrides_how_weights_are_read(tiny):
    plain = wan.fingerprint(tiny)
    doubled = wan.fingerprint(tiny, get_weight=lambda n: 2 * tiny.get_submodule(n).weight)
    assert doubled["content_hash"] != plain["content_hash"]
    assert doubled["probe"] == [2 * v for v in plain["probe"]]


def test_check_fingerprint_rejects_tampered_layers(tiny):
    fp = wan.fingerprint(tiny)
    fp["layers"]["blocks.0.ffn.0"] = [512, 255]
    with pytest.raises(ValueError, match="shape_hash"):
        wan.check_fingerprint(fp)


def test_check_fingerprint_rejects_tampered_probe(tiny):
    fp = wan.fingerprint(tiny)
    fp["probe"][0] += 1.0
    with pytest.raises(ValueError, match="content_hash"):
        wan.check_fingerprint(fp)


# --------------------------------------------------------------------------- matching

@pytest.fixture(scope="module")
def pair():
    return {e: wan.fingerprint(small("t2v", expert=e)) for e in ("high_noise", "low_noise")}


def test_match_picks_the_expert_with_identical_content(pair):
    low = wan.fingerprint(small("t2v", expert="low_noise"))
    assert wan.match_fingerprint(low, pair) == "low_noise"


def test_match_accepts_a_copy_rounded_to_another_dtype(pair):
    fp16 = wan.fingerprint(small("t2v", expert="high_noise", dtype=torch.float16))
    assert fp16["content_hash"] != pair["high_noise"]["content_hash"]  # fp32 master: rounding differs
    assert wan.match_fingerprint(fp16, pair) == "high_noise"


def test_match_refuses_a_model_with_other_weights(pair):
    other = wan.fingerprint(small("t2v", seed=7))
    assert wan.match_fingerprint(other, pair) is None


def test_match_refuses_a_model_with_other_shapes(pair):
    other = wan.fingerprint(small("i2v"))
    assert wan.match_fingerprint(other, pair) is None


def test_match_refuses_when_weights_are_unreadable(pair):
    shapes_only = wan.fingerprint({k: v.shape for k, v in small("t2v").state_dict().items()})
    assert shapes_only["shape_hash"] == pair["high_noise"]["shape_hash"]
    assert wan.match_fingerprint(shapes_only, pair) is None


def test_match_refuses_two_candidates_with_identical_content(pair):
    twins = {"a": pair["high_noise"], "b": pair["high_noise"]}
    assert wan.match_fingerprint(pair["high_noise"], twins) is None


def test_fingerprint_of_a_non_wan_module_is_refused():
    with pytest.raises(wan.NotWanError):
        wan.fingerprint(torch.nn.Sequential(torch.nn.Linear(4, 4)))
