"""Specification of hifloat4.wan_model (a Wan2.2-shaped DiT with ComfyUI's naming) and hifloat4.tools.tiny_wan."""
import os

import pytest
import torch

from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan
from hifloat4.wan_model import WanConfig, WanModel

BLOCK_KEYS = {
    "modulation",
    *(f"{a}.{l}.{p}" for a in ("self_attn", "cross_attn") for l in "qkvo" for p in ("weight", "bias")),
    *(f"{a}.{n}.weight" for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")),
    "norm3.weight", "norm3.bias",
    "ffn.0.weight", "ffn.0.bias", "ffn.2.weight", "ffn.2.bias",
}
TOP_KEYS = {
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
    "head.head.weight", "head.head.bias", "head.modulation",
}


@pytest.fixture(scope="module")
def t2v():
    return make_tiny_wan("t2v")


def _activation_outlier_ratio(model, layer):
    """max / median of the per-channel absmax of `layer`'s input."""
    seen = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.__setitem__("x", inp[0]))
    model(*example_inputs(model))
    handle.remove()
    amax = seen["x"].abs().flatten(0, -2).amax(0)
    return float(amax.max() / amax.median())


def test_state_dict_keys_use_comfyui_wan_naming(t2v):
    keys = set(t2v.state_dict())
    expected = TOP_KEYS | {f"blocks.{i}.{k}" for i in range(4) for k in BLOCK_KEYS}
    assert keys == expected


def test_state_dict_key_order_matches_wanmodel_registration_order(t2v):
    keys = list(t2v.state_dict())
    assert keys[:2] == ["patch_embedding.weight", "patch_embedding.bias"]
    assert keys.index("blocks.0.modulation") < keys.index("blocks.0.self_attn.q.weight")
    assert keys.index("blocks.0.self_attn.norm_k.weight") < keys.index("blocks.0.norm3.weight")
    assert keys[-3:] == ["head.modulation", "head.head.weight", "head.head.bias"]


def test_layer_shapes_follow_the_config(t2v):
    sd = t2v.state_dict()
    assert sd["patch_embedding.weight"].shape == (256, 16, 1, 2, 2)
    assert sd["text_embedding.0.weight"].shape == (256, 4096)
    assert sd["time_embedding.0.weight"].shape == (256, 256)
    assert sd["time_projection.1.weight"].shape == (6 * 256, 256)
    assert sd["blocks.3.ffn.0.weight"].shape == (512, 256)
    assert sd["blocks.3.ffn.2.weight"].shape == (256, 512)
    assert sd["blocks.0.modulation"].shape == (1, 6, 256)
    assert sd["head.head.weight"].shape == (16 * 4, 256)
    assert sd["head.modulation"].shape == (1, 2, 256)


@pytest.mark.parametrize("variant,in_dim,out_dim", [("t2v", 16, 16), ("i2v", 36, 16), ("ti2v", 48, 48)])
def test_variant_sets_input_and_output_channels(variant, in_dim, out_dim):
    cfg = make_tiny_wan(variant, dim=128, ffn_dim=256, layers=1, text_dim=64).config
    assert (cfg.in_dim, cfg.out_dim) == (in_dim, out_dim)


def test_forward_returns_velocity_shaped_like_the_latent(t2v):
    x, t, ctx = example_inputs(t2v, batch=2, frames=2, height=8, width=8, text_len=64)
    out = t2v(x, t, ctx)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_i2v_maps_36_input_channels_to_16_output_channels():
    model = make_tiny_wan("i2v", layers=1)
    x, t, ctx = example_inputs(model)
    assert x.shape[1] == 36
    assert model(x, t, ctx).shape == (1, 16, *x.shape[2:])


def test_conditioning_channels_y_are_concatenated_to_the_latent():
    model = make_tiny_wan("i2v", layers=1)
    x, t, ctx = example_inputs(model)
    assert torch.equal(model(x[:, :16], t, ctx, y=x[:, 16:]), model(x, t, ctx))


def test_wrong_channel_count_is_rejected(t2v):
    x, t, ctx = example_inputs(t2v)
    with pytest.raises(ValueError, match="expected x"):
        t2v(x[:, :8], t, ctx)


def test_spatial_size_must_be_a_multiple_of_the_patch(t2v):
    x, t, ctx = example_inputs(t2v, height=7)
    with pytest.raises(ValueError, match="multiples of the patch"):
        t2v(x, t, ctx)


def test_self_attention_mixes_information_across_tokens(t2v):
    x, t, ctx = example_inputs(t2v)
    x2 = x.clone()
    x2[..., 0, 0, 0] += 1.0  # one pixel of frame 0
    diff = (t2v(x2, t, ctx) - t2v(x, t, ctx)).abs()
    assert diff[..., 1, 6:, 6:].max() > 1e-4  # a patch far away in another frame moves too


def test_output_depends_on_text_context(t2v):
    x, t, ctx = example_inputs(t2v)
    assert not torch.allclose(t2v(x, t, ctx), t2v(x, t, ctx.flip(-1)))


def test_cross_attention_ignores_context_token_order(t2v):
    x, t, ctx = example_inputs(t2v)
    perm = torch.randperm(ctx.shape[1], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t2v(x, t, ctx[:, perm]), t2v(x, t, ctx), rtol=1e-4, atol=1e-4)


def test_output_depends_on_timestep(t2v):
    x, _, ctx = example_inputs(t2v)
    assert not torch.allclose(t2v(x, torch.tensor([900.0]), ctx), t2v(x, torch.tensor([100.0]), ctx))


def test_batch_entries_are_independent(t2v):
    x, t, ctx = example_inputs(t2v, batch=2)
    both = t2v(x, t, ctx)
    torch.testing.assert_close(both[1:], t2v(x[1:], t[1:], ctx[1:]), rtol=1e-4, atol=1e-5)


def test_same_seed_gives_identical_weights():
    a, b = make_tiny_wan("t2v", layers=1), make_tiny_wan("t2v", layers=1)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_experts_of_a_pair_share_shapes_but_differ_in_weights():
    hi = make_tiny_wan("t2v", expert="high_noise").state_dict()
    lo = make_tiny_wan("t2v", expert="low_noise").state_dict()
    assert {k: v.shape for k, v in hi.items()} == {k: v.shape for k, v in lo.items()}
    assert not torch.equal(hi["blocks.0.self_attn.q.weight"], lo["blocks.0.self_attn.q.weight"])


def test_ti2v_has_a_single_expert():
    make_tiny_wan("ti2v", layers=1, expert="single")
    with pytest.raises(ValueError, match="experts"):
        make_tiny_wan("ti2v", layers=1, expert="high_noise")


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="variant"):
        make_tiny_wan("t2i")


def test_outlier_init_creates_outlier_activation_channels():
    model = make_tiny_wan("t2v")
    assert _activation_outlier_ratio(model, model.blocks[0].ffn[2]) > 5
    assert _activation_outlier_ratio(model, model.blocks[-1].self_attn.q) > 5


def test_without_outliers_activation_channels_are_even():
    model = make_tiny_wan("t2v", outlier_channels=0)
    assert _activation_outlier_ratio(model, model.blocks[0].ffn[2]) < 3
    assert _activation_outlier_ratio(model, model.blocks[-1].self_attn.q) < 3


def test_num_heads_defaults_to_dim_over_128():
    assert WanConfig(dim=512).heads == 4
    assert WanConfig(dim=64).heads == 1
    assert WanConfig(dim=256, num_heads=4).head_dim == 64


def test_bfloat16_model_runs_in_bfloat16():
    model = make_tiny_wan("t2v", layers=1, dtype=torch.bfloat16)
    x, t, ctx = example_inputs(model)
    out = model(x, t, ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_img_dim_adds_the_wan21_i2v_image_branch():
    model = make_tiny_wan("i2v", layers=1, img_dim=64)
    keys = set(model.state_dict())
    assert {"img_emb.proj.1.weight", "img_emb.proj.3.weight", "blocks.0.cross_attn.k_img.weight",
            "blocks.0.cross_attn.v_img.weight", "blocks.0.cross_attn.norm_k_img.weight"} <= keys
    x, t, ctx = example_inputs(model)
    clip = torch.randn(1, 5, 64)
    assert not torch.allclose(model(x, t, ctx, clip_fea=clip), model(x, t, ctx))


def test_real_a14b_size_builds_on_meta_device_with_14b_parameters():
    with torch.device("meta"):
        model = WanModel(WanConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40))
    n = sum(p.numel() for p in model.parameters())
    assert 14.0e9 < n < 14.5e9
    assert model.blocks[0].self_attn.q.weight.is_meta


@pytest.mark.skipif(not os.environ.get("COMFY_HARNESS_MODELS"), reason="COMFY_HARNESS_MODELS not set")
@pytest.mark.parametrize("variant,expert,fname", [
    ("t2v", "high_noise", "tiny_wan2.2_t2v_high_noise"),
    ("i2v", "low_noise", "tiny_wan2.2_i2v_low_noise"),
    ("ti2v", "single", "tiny_wan2.2_ti2v_5b"),
])
def test_default_models_equal_the_harness_files(variant, expert, fname):
    """The harness writes the same recipe with seed 0 at these sizes, cast to fp16."""
    from safetensors.torch import load_file

    path = os.path.join(os.environ["COMFY_HARNESS_MODELS"], "diffusion_models", fname + ".safetensors")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing")
    ref = load_file(path)
    ours = make_tiny_wan(variant, expert=expert, dtype=torch.float16).state_dict()
    assert set(ref) == set(ours)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_parameter_count_of_the_default_tiny_model_is_small(t2v):
    assert sum(p.numel() for p in t2v.parameters()) < 5e6
