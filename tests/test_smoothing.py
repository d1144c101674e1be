"""Specification of hifloat4.smoothing: channel masks m_c = w_c^alpha / a_c^(1-alpha)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hifloat4.smoothing as smoothing
from hifloat4.smoothing import MaskConfig, activation_statistic, channel_mask, weight_absmax
from hifloat4.stats import ChannelStats

NO_CLAMP = (1e-30, 1e30)


def stats_of(absmax: list[float], tail: list[float]) -> ChannelStats:
    stats = ChannelStats(len(absmax))
    stats.absmax, stats.tail = torch.tensor(absmax), torch.tensor(tail)
    return stats


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 16),
    out_features=st.integers(1, 16),
    in_features=st.integers(1, 32),
    alpha=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_mask_cancels_in_the_product(tokens, out_features, in_features, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen, dtype=torch.float64)
    w = torch.randn(out_features, in_features, generator=gen, dtype=torch.float64)
    act = x.abs().amax(0) * torch.rand(in_features, generator=gen, dtype=torch.float64)  # some zeros possible
    m = channel_mask(weight_absmax(w), act.float(), MaskConfig(alpha=alpha)).double()
    torch.testing.assert_close((x * m) @ (w / m).T, x @ w.T)


def test_alpha_half_is_the_geometric_balance():
    # w = 4, a = 1 -> sqrt(4) / sqrt(1) = 2 ;  w = 1, a = 16 -> 1 / sqrt(16) = 0.25
    m = channel_mask(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 16.0]), MaskConfig(alpha=0.5))
    assert m.tolist() == [2.0, 0.25]


def test_alpha_one_gives_the_weight_statistic():
    w = torch.tensor([0.3, 7.0, 2.5e-3])
    m = channel_mask(w, torch.tensor([5.0, 0.01, 100.0]), MaskConfig(alpha=1.0, clamp=NO_CLAMP))
    assert torch.equal(m, w)


def test_alpha_zero_gives_the_reciprocal_activation_statistic():
    a = torch.tensor([0.3, 7.0, 2.5e-3])
    m = channel_mask(torch.tensor([5.0, 0.01, 100.0]), a, MaskConfig(alpha=0.0, clamp=NO_CLAMP))
    torch.testing.assert_close(m, 1 / a)


@pytest.mark.parametrize("bad_act", [0.0, float("nan"), float("inf")])
def test_unusable_activation_statistic_gives_mask_one(bad_act):
    m = channel_mask(torch.tensor([4.0, 4.0]), torch.tensor([bad_act, 1.0]), MaskConfig())
    assert m.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("bad_weight", [0.0, float("nan")])
def test_dead_or_broken_weight_column_gives_mask_one(bad_weight):
    m = channel_mask(torch.tensor([bad_weight, 4.0]), torch.tensor([1.0, 1.0]), MaskConfig())
    assert m.tolist() == [1.0, 2.0]


def test_masks_are_clamped_to_the_configured_range():
    # alpha 0.5: 1e6 / 1e-6 -> 1e6 > hi ; 1e-6 / 1e6 -> 1e-6 < lo
    config = MaskConfig(alpha=0.5, clamp=(1e-2, 1e2))
    m = channel_mask(torch.tensor([1e6, 1e-6]), torch.tensor([1e-6, 1e6]), config)
    torch.testing.assert_close(m, torch.tensor([1e2, 1e-2]))


def test_guarded_channels_stay_exactly_one_even_outside_the_clamp():
    config = MaskConfig(alpha=1.0, clamp=(2.0, 10.0))
    m = channel_mask(torch.tensor([0.0, 100.0]), torch.tensor([1.0, 1.0]), config)
    assert m.tolist() == [1.0, 10.0]


def test_statistic_none_gives_ones_without_an_activation_statistic():
    m = channel_mask(torch.tensor([4.0, 0.5, 0.0]), None, MaskConfig(statistic="none"))
    assert m.dtype == torch.float32 and m.tolist() == [1.0, 1.0, 1.0]


def test_missing_activation_statistic_is_an_error_unless_none():
    with pytest.raises(ValueError, match="needs an activation statistic"):
        channel_mask(torch.ones(3), None, MaskConfig(statistic="tail"))


def test_mismatched_statistic_shapes_are_an_error():
    with pytest.raises(ValueError, match="shape"):
        channel_mask(torch.ones(3), torch.ones(4), MaskConfig())


def test_mask_is_fp32_whatever_the_statistics_dtype():
    m = channel_mask(torch.ones(3, dtype=torch.float64), torch.ones(3, dtype=torch.bfloat16), MaskConfig())
    assert m.dtype == torch.float32


@pytest.mark.parametrize(("statistic", "expected"), [("tail", [2.0]), ("max", [8.0]), ("none", None)])
def test_activation_statistic_follows_the_config(statistic, expected):
    picked = activation_statistic(stats_of(absmax=[8.0], tail=[2.0]), MaskConfig(statistic=statistic))
    assert (picked.tolist() if picked is not None else None) == expected


def test_tail_statistic_gives_larger_masks_than_max_when_outliers_exist():
    # tail <= absmax per channel, so for alpha < 1 dividing by a smaller a_c gives a larger m_c.
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=gen)
    x[::997] *= 50  # a few outlier tokens
    stats = ChannelStats(16)
    stats.update(x)
    w = torch.randn(8, 16, generator=gen)
    tail, mx = MaskConfig(statistic="tail", clamp=NO_CLAMP), MaskConfig(statistic="max", clamp=NO_CLAMP)
    tail_mask = channel_mask(weight_absmax(w), activation_statistic(stats, tail), tail)
    max_mask = channel_mask(weight_absmax(w), activation_statistic(stats, mx), mx)
    assert bool((tail_mask > max_mask).all())


def test_weight_absmax_is_the_max_over_output_rows():
    w = torch.tensor([[1.0, -4.0, 0.0], [-2.0, 0.5, 0.0]])
    assert weight_absmax(w).tolist() == [2.0, 4.0, 0.0]


def test_weight_absmax_chunking_over_rows_does_not_change_the_result(monkeypatch):
    w = torch.randn(37, 11, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    monkeypatch.setattr(smoothing, "_ROW_CHUNK_ELEMENTS", 11 * 3)  # 3 rows per chunk
    assert torch.equal(weight_absmax(w), w.float().abs().amax(0))


def test_weight_absmax_accepts_fp8_weights():
    w8 = torch.randn(5, 6, generator=torch.Generator().manual_seed(3)).to(torch.float8_e4m3fn)
    assert torch.equal(weight_absmax(w8), w8.float().abs().amax(0))


def test_weight_absmax_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        weight_absmax(torch.ones(2, 3, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": math.nan}, "alpha"),
        ({"statistic": "p99"}, "statistic"),
        ({"clamp": (0.0, 1.0)}, "clamp"),
        ({"clamp": (2.0, 1.0)}, "clamp"),
        ({"clamp": (1.0, 1.0)}, "clamp"),
        ({"clamp": (1e-4, math.inf)}, "clamp"),
        ({"clamp": (1.0,)}, "clamp"),
    ],
)
def test_invalid_config_is_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskConfig(**kwargs)


def test_clamp_given_as_a_list_is_stored_as_a_tuple():
    # metadata read back from JSON has lists; the config must stay hashable and comparable
    assert MaskConfig(clamp=[0.01, 100]) == MaskConfig(clamp=(0.01, 100.0))
