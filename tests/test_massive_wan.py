"""The massive-activation proxy (hifloat4.tools.massive_wan, eval part 4): the premise holds
on the full evaluation workload, and the model stays a harness Wan model."""
from __future__ import annotations

import copy

import pytest
import torch

from hifloat4.calibrate import CalibConfig, observe
from hifloat4.experts import HIGH
from hifloat4.linear import LayerQuant
from hifloat4.quantize import LayersConfig, quantize_
from hifloat4.sampling import expert_call, initial_noise
from hifloat4.tools import measure
from hifloat4.tools.eval import massive
from hifloat4.tools.massive_wan import MassiveSpec, layout_of, sink_positions
from hifloat4.tools.tiny_wan import make_tiny_wan

FULL = massive.MassiveEvalConfig()


def _call(model, cfg: measure.PairConfig) -> None:
    """The high-noise expert's first call of the evaluation's held-out run (cfg batched)."""
    ctx = measure.synthetic_contexts(cfg, "eval", 1)[0]
    neg = measure.synthetic_contexts(cfg, "negative", 1)[0]
    with torch.no_grad():
        expert_call(model, initial_noise(cfg.latent_shape, measure.noise_seed(cfg, "eval", 0)), 1.0, ctx, neg, cfg.cfg)


@pytest.fixture(scope="module")
def full_model():
    return massive.build_models(FULL.model, FULL.spec)[HIGH]


@pytest.fixture(scope="module")
def premise_rows(full_model):
    """Premise rows of one call at the full evaluation's size (8192 tokens, 2 blocks)."""
    with massive.premise(full_model, massive.sinks(FULL.model)) as rows:
        _call(full_model, FULL.model)
    return rows


def test_full_workload_has_at_least_8k_tokens_per_call_and_fewer_sinks_than_p99_9_drops():
    tokens = 2 * massive.tokens_per_sample(FULL.model)
    assert tokens >= 8192
    assert 2 * len(massive.sinks(FULL.model)) < tokens * 0.001


def test_sinks_are_at_least_100x_the_median_token_of_their_channels_in_residual_and_ffn2_inputs(premise_rows):
    massive_rows = {k: r for k, r in premise_rows.items() if "residual" in k or "ffn.2" in k}
    assert len(massive_rows) == 2 * FULL.model.layers
    assert all(r["sink_over_channel_median"] >= 100 for r in massive_rows.values()), massive_rows
    assert all(r["sink_over_all_median"] >= 100 for r in massive_rows.values()), massive_rows


def test_p99_9_of_a_call_excludes_the_sinks_and_p99_99_keeps_them(premise_rows):
    assert all(r["p99.9_over_sink"] < 0.1 for r in premise_rows.values()), premise_rows
    assert all(r["p99.99_over_sink"] > 0.5 for r in premise_rows.values()), premise_rows


def test_calibration_tail_of_the_massive_unit_is_far_below_its_max(full_model):
    """The product's own statistics (calibrate.observe): the sinks set the max, not the p99.9."""
    unit = layout_of(full_model).units[0]
    with observe(full_model, ["blocks.0.ffn.2", "blocks.0.self_attn.q"], CalibConfig(percentile=99.9)) as obs:
        _call(full_model, FULL.model)
    ffn2, q = obs["blocks.0.ffn.2"].stats, obs["blocks.0.self_attn.q"].stats
    assert ffn2.tail[unit] < 0.1 * ffn2.absmax[unit]
    channels = list(layout_of(full_model).channels)
    assert (q.tail[channels] < 0.1 * q.absmax[channels]).all()


def test_massive_model_keeps_the_harness_keys_and_bf16_exact_weights():
    cfg = massive.quick_config().model
    plain = measure.build_models(cfg)[HIGH]
    model = massive.build_models(cfg, MassiveSpec())[HIGH]
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(p, p.bfloat16().float()) for p in model.parameters())


def test_sink_positions_are_the_first_token_and_the_centre_of_the_first_frame():
    assert sink_positions((4, 32, 32)) == [0, 16 * 32 + 16]


def test_layout_survives_a_deep_copy_and_a_plain_model_has_none():
    model = massive.build_models(massive.quick_config().model, MassiveSpec())[HIGH]
    assert layout_of(copy.deepcopy(model)) == layout_of(model)
    with pytest.raises(ValueError, match="massive"):
        layout_of(make_tiny_wan("t2v", dim=128, ffn_dim=256, layers=1, text_dim=256))


def test_population_meter_splits_sink_rows_and_skips_text_token_layers():
    cfg = massive.quick_config().model
    ref = massive.build_models(cfg, MassiveSpec())[HIGH]
    names = ["blocks.0.ffn.2", "blocks.0.cross_attn.k"]
    q = quantize_(copy.deepcopy(ref), LayersConfig({n: LayerQuant(mask=torch.ones(ref.get_submodule(n).in_features))
                                                   for n in names}))
    meter = massive.PopulationMeter(q, ref, massive.sinks(cfg), massive.tokens_per_sample(cfg), "x/")
    try:
        _call(q, cfg)
    finally:
        meter.close()
    assert list(meter.sums) == ["x/blocks.0.ffn.2"]
    sig_sink, err_sink, sig_ord, err_ord = meter.sums["x/blocks.0.ffn.2"]
    assert 0 < err_sink < sig_sink and 0 < err_ord < sig_ord
    assert sig_sink > sig_ord / 100  # 4 sink rows carry a large share of the output energy: they are massive


def test_method_list_is_every_statistic_at_every_alpha_with_and_without_rotation():
    grid = massive.methods(FULL.percentiles, FULL.alphas)
    keys = [massive.key(m) for m in grid]
    assert len(keys) == len(set(keys)) == 2 * (1 + 3 * 5)
    assert {"none", "none +rot", "adaptive a0.3", "adaptive a0.7 +rot", "tail p99.99 a0.5 +rot"} <= set(keys)
