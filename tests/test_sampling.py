"""Specification of hifloat4.sampling's expert handoff: when the low-noise expert
takes over (the Calibrate node, the demo and the evaluation all use it)."""
import pytest

from hifloat4 import sampling

# ComfyUI "simple" schedule, 4 steps, ModelSamplingSD3 shift 5 (values rounded)
SHIFT5_4STEPS = [1.0, 0.9375, 0.8333, 0.625, 0.0]


def test_boundary_sigma_is_0875_for_t2v_and_09_for_i2v():
    assert sampling.boundary_sigma("t2v") == 0.875
    assert sampling.boundary_sigma("i2v") == 0.9


def test_boundary_sigma_refuses_single_model_kinds():
    with pytest.raises(ValueError, match="ti2v"):
        sampling.boundary_sigma("ti2v")


def test_switch_step_counts_steps_starting_at_or_above_the_boundary():
    assert sampling.switch_step_from_sigmas(SHIFT5_4STEPS, 0.875) == 2
    assert sampling.switch_step_from_sigmas(SHIFT5_4STEPS, 0.9) == 2
    assert sampling.switch_step_from_sigmas(SHIFT5_4STEPS, 0.95) == 1


def test_switch_step_includes_a_step_exactly_at_the_boundary():
    assert sampling.switch_step_from_sigmas([1.0, 0.875, 0.5, 0.0], 0.875) == 2


def test_switch_step_ignores_the_final_sigma():
    assert sampling.switch_step_from_sigmas([1.0, 0.95, 0.9], 0.5) == 2


def test_resolve_minus_one_derives_the_step_from_the_boundary():
    assert sampling.resolve_switch_step(-1, SHIFT5_4STEPS, 0.875) == 2


def test_resolve_keeps_an_explicit_step():
    assert sampling.resolve_switch_step(3, SHIFT5_4STEPS, 0.875) == 3


@pytest.mark.parametrize("step", [0, 4, 9])
def test_resolve_refuses_a_step_that_leaves_one_expert_idle(step):
    with pytest.raises(ValueError, match="between 1 and 3"):
        sampling.resolve_switch_step(step, SHIFT5_4STEPS, 0.875)


def test_resolve_refuses_a_boundary_that_leaves_the_low_expert_idle():
    with pytest.raises(ValueError, match="boundary sigma"):
        sampling.resolve_switch_step(-1, [1.0, 0.99, 0.0], 0.9)


def test_resolve_refuses_negative_steps_other_than_minus_one():
    with pytest.raises(ValueError, match="-1"):
        sampling.resolve_switch_step(-2, SHIFT5_4STEPS, 0.875)
