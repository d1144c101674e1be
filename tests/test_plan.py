"""Specification of hifloat4.plan (the one decision Apply, Save, export and quantize_
share) and of quantize_'s typed configs."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from hifloat4 import LayersConfig, W4A4Config, quantize_, wan
from hifloat4.experts import HIGH, LOW, ExpertMismatch
from hifloat4.linear import HiF4Linear
from hifloat4.masks import remask
from hifloat4.packed_linear import PackedHiF4Linear
from hifloat4.plan import Plan, make_plan
from hifloat4.rotation import Rotation
from hifloat4.state import PTQStateError
from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan

SIZE = {"dim": 128, "ffn_dim": 384, "layers": 2, "text_dim": 64}  # ffn 384 = 3 x 128: blocks get fitted


@pytest.fixture(scope="module")
def models(tiny_calibrated):
    return tiny_calibrated(**SIZE)[0]


@pytest.fixture(scope="module")
def state(tiny_calibrated):
    return tiny_calibrated(**SIZE)[1]


def fp(model):
    return wan.fingerprint(model)


def test_the_plan_takes_the_expert_the_model_fingerprint_matches(state, models):
    assert make_plan(W4A4Config(state), fp(models[LOW])).expert == LOW


def test_the_plan_quantizes_every_main_layer_with_the_stored_mask(state, models):
    plan = make_plan(W4A4Config(state), fp(models[HIGH]))
    assert list(plan.layers) == list(state.experts[HIGH].layers) and plan.kept == ()
    assert all(torch.equal(q.mask, state.experts[HIGH].layers[n].mask) for n, q in plan.layers.items())
    assert set(plan.statistics.values()) == {"tail"}


def test_alpha_and_statistic_choices_give_the_masks_remask_gives(state, models):
    plan = make_plan(W4A4Config(state, alpha=0.3, statistic="max"), fp(models[HIGH]))
    expected = remask(state, alpha=0.3, statistic="max").state.experts[HIGH].layers
    assert all(torch.equal(q.mask, expected[n].mask) for n, q in plan.layers.items())
    assert set(plan.statistics.values()) == {"max"}


def test_a_calibrated_rotation_is_fitted_to_each_layer_and_keeps_its_seed(state, models):
    rotated = dataclasses.replace(state, rotation={"block": 512, "seed": 7})
    plan = make_plan(W4A4Config(rotated), fp(models[HIGH]))
    assert plan.layers["blocks.0.ffn.0"].rotation == Rotation(block=128, seed=7)  # 128 inputs
    assert plan.layers["blocks.0.ffn.2"].rotation == Rotation(block=128, seed=7)  # 384 = 3 x 128


def test_rotation_off_overrides_the_calibrated_rotation(state, models):
    rotated = dataclasses.replace(state, rotation={"block": 512, "seed": 7})
    plan = make_plan(W4A4Config(rotated, rotation="off"), fp(models[HIGH]))
    assert {q.rotation for q in plan.layers.values()} == {None}


def test_hadamard_rotation_rounds_the_block_down_to_a_power_of_two(state, models):
    plan = make_plan(W4A4Config(state, rotation="hadamard", rotation_block=100), fp(models[HIGH]))
    assert {q.rotation for q in plan.layers.values()} == {Rotation(block=64, seed=0)}


def test_another_model_type_is_refused_even_for_a_named_expert(state):
    with pytest.raises(ExpertMismatch, match="I2V"):
        make_plan(W4A4Config(state, expert=HIGH), fp(make_tiny_wan("i2v", dim=128, ffn_dim=384, layers=2,
                                                                  text_dim=64)))


def test_a_state_missing_main_layers_of_the_model_is_refused(state, models):
    partial = copy.deepcopy(state)
    del partial.experts[HIGH].layers["blocks.1.ffn.2"]
    with pytest.raises(PTQStateError, match="blocks.1.ffn.2"):
        make_plan(W4A4Config(partial, expert=HIGH), fp(models[HIGH]))


@pytest.mark.parametrize("field, value", [("expert", "middle"), ("alpha", 1.5), ("alpha", True),
                                          ("statistic", "p42"), ("rotation", "givens"), ("rotation_block", 0),
                                          ("keep_high_precision", -1), ("keep_high_precision", 1.0)])
def test_the_config_refuses_out_of_range_choices(state, field, value):
    with pytest.raises(ValueError, match=field):
        W4A4Config(state, **{field: value})


def test_keeping_layers_costs_their_bf16_size_minus_the_hif4_codes_in_a_packed_file():
    plan = Plan(expert=HIGH, layers={}, kept=("a",), shapes={"a": (10, 128), "b": (10, 64)}, statistics={})
    assert plan.kept_values() == 1280
    assert plan.kept_packed_extra_bytes() == 10 * (128 * 2 - 2 * 36) - 4 * 128  # codes + fp32 mask


def test_quantize_with_a_w4a4_config_runs_the_plan_on_the_model(state, models):
    model = models[HIGH]
    plan = make_plan(W4A4Config(state), fp(model))
    by_config = quantize_(copy.deepcopy(model), W4A4Config(state))
    by_layers = quantize_(copy.deepcopy(model), LayersConfig(plan.layers))
    x, t, ctx = example_inputs(model, frames=2, height=8, width=8, text_len=16, seed=3)
    with torch.no_grad():
        assert torch.equal(by_config(x, t, ctx), by_layers(x, t, ctx))
    assert sum(isinstance(m, HiF4Linear) for m in by_config.modules()) == len(plan.layers)


def test_quantize_finds_the_layers_under_a_key_prefix(state, models):
    wrapped = nn.Module()
    wrapped.diffusion_model = copy.deepcopy(models[HIGH])
    quantize_(wrapped, W4A4Config(state), packed=True)
    assert isinstance(wrapped.diffusion_model.blocks[0].ffn[0], PackedHiF4Linear)


def test_quantize_refuses_an_untyped_config():
    with pytest.raises(TypeError, match="W4A4Config or a LayersConfig"):
        quantize_(nn.Linear(4, 4), {"": None})


def test_keeping_n_layers_leaves_the_n_largest_calibration_errors_unquantized(state, models):
    from hifloat4.masks import sensitivity
    plan = make_plan(W4A4Config(state, keep_high_precision=3), fp(models[HIGH]))
    errors = {n: sensitivity(ls) for n, ls in state.experts[HIGH].layers.items()}
    assert set(plan.kept) == set(sorted(errors, key=errors.get, reverse=True)[:3])
    assert [errors[n] for n in plan.kept] == sorted((errors[n] for n in plan.kept), reverse=True)
    assert set(plan.layers) == set(errors) - set(plan.kept)


def test_kept_layers_stay_plain_linears_in_the_quantized_model(state, models):
    model = quantize_(copy.deepcopy(models[HIGH]), W4A4Config(state, keep_high_precision=2))
    plan = make_plan(W4A4Config(state, keep_high_precision=2), fp(models[HIGH]))
    kinds = {n: type(m) for n, m in model.named_modules()}
    assert all(kinds[n] is nn.Linear for n in plan.kept)
    assert sum(k is HiF4Linear for k in kinds.values()) == len(plan.layers)


def test_keeping_more_layers_than_the_expert_has_is_refused(state, models):
    with pytest.raises(ValueError, match="only 20 main layers"):
        make_plan(W4A4Config(state, keep_high_precision=21), fp(models[HIGH]))


def test_keeping_layers_of_a_version_1_state_says_what_is_missing(state, models):
    old = copy.deepcopy(state)
    for ex in old.experts.values():
        for ls in ex.layers.values():
            ls.tails = ls.errors = None
    with pytest.raises(PTQStateError, match="sensitivity.*Recalibrate"):
        make_plan(W4A4Config(old, keep_high_precision=1), fp(models[HIGH]))


def test_adaptive_statistic_takes_each_layers_lowest_error_candidate(state, models):
    from hifloat4.masks import adaptive_choice
    plan = make_plan(W4A4Config(state, statistic="adaptive"), fp(models[HIGH]))
    assert plan.statistics == {n: adaptive_choice(ls) for n, ls in state.experts[HIGH].layers.items()}
    expected = remask(state, statistic="adaptive").state.experts[HIGH].layers
    assert all(torch.equal(q.mask, expected[n].mask) for n, q in plan.layers.items())


def test_the_description_names_the_kept_layers_and_their_cost(state, models):
    plan = make_plan(W4A4Config(state, keep_high_precision=2), fp(models[HIGH]))
    text = plan.describe()
    assert all(n in text for n in plan.kept) and f"{plan.kept_packed_extra_bytes() / 1e6:.2f} MB" in text
