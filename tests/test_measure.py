"""Specification of hifloat4.tools.measure: the workload's prompts, the shipped rotation
rule on record, and the three orders of keeping layers and the sweep."""
import pytest
import torch

from hifloat4.tools import measure
from hifloat4.tools.measure import ORDERS, keep_sweep, kept_layers

LAYERS = [f"blocks.{b}.ffn.{i}" for b in range(3) for i in (0, 2)]
SENS = {name: float(i % 4) for i, name in enumerate(LAYERS)}  # 0 1 2 3 0 1


def test_sensitive_order_keeps_the_largest_errors_with_ties_in_block_order():
    assert kept_layers(LAYERS, SENS, "sensitive", 3) == {"blocks.1.ffn.2", "blocks.1.ffn.0", "blocks.0.ffn.2"}


def test_position_order_keeps_the_first_layers():
    assert kept_layers(LAYERS, SENS, "position", 2) == {"blocks.0.ffn.0", "blocks.0.ffn.2"}


def test_random_order_is_fixed_by_its_seed_and_differs_between_seeds():
    draws = {kept_layers(LAYERS, SENS, "random", 3, seed) for seed in range(6)}
    assert kept_layers(LAYERS, SENS, "random", 3, 4) == kept_layers(LAYERS, SENS, "random", 3, 4)
    assert len(draws) > 1 and all(len(d) == 3 for d in draws)


@pytest.mark.parametrize("n", [-1, 7])
def test_keeping_more_layers_than_exist_is_refused(n):
    with pytest.raises(ValueError, match="cannot keep"):
        kept_layers(LAYERS, SENS, "position", n)


def test_sweep_measures_each_kept_set_once_and_averages_random_seeds():
    calls = []

    def error(kept):
        calls.append(kept)
        return float(len(kept["g"]) + sum(SENS[n] for n in kept["g"]))

    out = keep_sweep({"g": (LAYERS, SENS)}, error, ns=[0, 2], seeds=(0, 1))
    assert set(ORDERS) <= set(out) and out["n"] == [0, 2]
    assert out["sensitive"] == [0.0, 2.0 + 3.0 + 2.0] and out["position"] == [0.0, 2.0 + 0.0 + 1.0]
    assert out["random"][1] == sum(out["random_runs"][1]) / 2
    assert sum(1 for k in calls if not k["g"]) == 1  # n = 0 shared by every order


def test_held_out_prompts_are_not_calibration_prompts():
    cfg = measure.PairConfig(**measure.QUICK)
    calib, held_out = measure.synthetic_contexts(cfg, "calib", 8), measure.synthetic_contexts(cfg, "eval", 3)
    assert not any(torch.equal(c, h) for c in calib for h in held_out)


def test_synthetic_prompts_are_padded_with_zeros_after_the_active_tokens():
    cfg = measure.PairConfig(**measure.QUICK)
    ctx = measure.synthetic_contexts(cfg, "eval", 1)[0]
    assert ctx.shape == (1, cfg.context_len, cfg.text_dim)
    assert ctx[0, :cfg.active_tokens].abs().sum(-1).gt(0).all() and ctx[0, cfg.active_tokens:].eq(0).all()


def test_rotation_blocks_are_the_shipped_rule_for_each_layer_width():
    assert measure.rotation_blocks([1536, 384, 384]) == {384: 128, 1536: 512}
    assert measure.rotation_blocks([256, 512]) == {256: 256, 512: 512}
