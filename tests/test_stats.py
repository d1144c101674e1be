"""Specification of hifloat4.stats: per-channel absmax and exact tail percentile."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hifloat4.stats import (
    ADAPTIVE_PERCENTILES,
    ChannelStats,
    _block_size,
    _Ranks,
    call_stats,
    channel_absmax,
    channel_percentile,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def numpy_percentile(x: torch.Tensor, q: float) -> np.ndarray:
    """The reference: numpy's default ('linear') percentile of |x| in float64, rounded to fp32."""
    flat = np.abs(x.reshape(-1, x.shape[-1]).double().numpy())
    return np.percentile(flat, q, axis=0).astype(np.float32)


def numpy_absmax(x: torch.Tensor) -> np.ndarray:
    return np.abs(x.reshape(-1, x.shape[-1]).double().numpy()).max(axis=0).astype(np.float32)


def outlier_activations(tokens: int, channels: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """Gaussian tokens with per-channel scales and a few 100x outliers, like a DiT activation."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=gen) * (0.1 + 10 * torch.rand(channels, generator=gen))
    outliers = torch.rand(tokens, channels, generator=gen) < 0.002
    return torch.where(outliers, x * 100, x).to(dtype)


def test_percentile_matches_numpy_exactly_for_a_bf16_activation():
    x = outlier_activations(4096, 96)
    np.testing.assert_array_equal(channel_percentile(x, 99.9).numpy(), numpy_percentile(x, 99.9))


def test_absmax_matches_numpy_exactly():
    x = outlier_activations(1000, 40)
    np.testing.assert_array_equal(channel_absmax(x).numpy(), numpy_absmax(x))


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 3000),
    channels=st.integers(1, 6),
    q=st.one_of(st.floats(0, 100), st.sampled_from([0.0, 50.0, 99.0, 99.9, 99.99, 100.0])),
    dtype=st.sampled_from(DTYPES),
    ties=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_percentile_matches_numpy_for_any_size_percentile_and_dtype(tokens, channels, q, dtype, ties, seed):
    x = outlier_activations(tokens, channels, dtype, seed)
    if ties:  # few distinct values: equal order statistics on both sides of the rank
        x = x.float().clamp(-3, 3).round().to(dtype)
    np.testing.assert_array_equal(channel_percentile(x, q).numpy(), numpy_percentile(x, q))


def test_block_prefilter_is_exact_when_most_values_tie():
    tokens, q = 4096, 99.9
    ranks = _Ranks.of(tokens, q)
    assert _block_size(tokens, tokens - ranks.lo) > 0  # this test exercises the prefilter
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-2, 3, (tokens, 64), generator=gen).to(torch.bfloat16)  # |x| in {0, 1, 2}
    np.testing.assert_array_equal(channel_percentile(x, q).numpy(), numpy_percentile(x, q))


def test_interpolates_between_neighbouring_order_statistics():
    # |x| sorted = 0..10 (11 tokens); 95th percentile: index 10 * 0.95 = 9.5 -> 9 + 0.5 * (10 - 9)
    x = torch.arange(11, dtype=torch.float32).unsqueeze(1)
    assert channel_percentile(x, 95.0).tolist() == [9.5]


def test_interpolation_at_or_above_half_uses_numpys_formula():
    # numpy computes b - (b - a) * (1 - t) for t >= 0.5, a + (b - a) * t below. For |x| = {0, 7}
    # and this q (found by search) the two differ even after rounding to fp32.
    x = torch.tensor([[0.0], [7.0]], dtype=torch.bfloat16)
    q = 68.86958735329763  # t = q / 100 since n - 1 = 1
    assert np.float32(7.0 * (q / 100)) != numpy_percentile(x, q)[0]  # the case discriminates
    np.testing.assert_array_equal(channel_percentile(x, q).numpy(), numpy_percentile(x, q))


def test_leading_dims_are_flattened_into_tokens():
    x = outlier_activations(2 * 3 * 50, 8).reshape(2, 3, 50, 8)
    assert torch.equal(channel_percentile(x, 99.0), channel_percentile(x.reshape(-1, 8), 99.0))


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_channel_chunk_size_does_not_change_results(chunk):
    x = outlier_activations(2048, 20)
    stats = ChannelStats(20, channel_chunk=chunk)
    stats.update(x)
    np.testing.assert_array_equal(stats.tail.numpy(), numpy_percentile(x, 99.9))
    np.testing.assert_array_equal(stats.absmax.numpy(), numpy_absmax(x))


def test_non_contiguous_input_gives_the_same_statistics():
    x = outlier_activations(12, 500).t()  # (500 tokens, 12 channels), channel stride != 1
    assert not x.is_contiguous()
    np.testing.assert_array_equal(channel_percentile(x, 99.9).numpy(), numpy_percentile(x, 99.9))


@pytest.mark.parametrize("q", [99.9, 10.0])  # selection from the top and from the bottom
def test_non_finite_values_count_as_zero(q):
    x = outlier_activations(3000, 4, torch.float32)
    x[5, 0], x[6, 1], x[7, 2] = float("nan"), float("inf"), float("-inf")
    as_zero = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    np.testing.assert_array_equal(channel_percentile(x, q).numpy(), numpy_percentile(as_zero, q))
    np.testing.assert_array_equal(channel_absmax(x).numpy(), numpy_absmax(as_zero))


@pytest.mark.parametrize("tokens", [10, 4096])  # plain top-k and block-prefilter paths
def test_nonfinite_counts_the_calls_with_nan_or_inf_per_channel(tokens):
    stats = ChannelStats(3)
    x = torch.ones(tokens, 3)
    x[0, 0] = x[1, 0] = float("nan")  # two bad values, one call
    x[0, 2] = float("inf")
    stats.update(x)
    stats.update(torch.ones(tokens, 3))
    assert stats.nonfinite.tolist() == [1, 0, 1]


def test_tail_and_absmax_aggregate_over_calls_by_max():
    a, b = outlier_activations(1000, 16, seed=1), outlier_activations(1500, 16, seed=2) * 2
    stats = ChannelStats(16, percentile=99.0)
    stats.update(a)
    stats.update(b)
    expected_tail = np.maximum(numpy_percentile(a, 99.0), numpy_percentile(b, 99.0))
    np.testing.assert_array_equal(stats.tail.numpy(), expected_tail)
    np.testing.assert_array_equal(stats.absmax.numpy(), np.maximum(numpy_absmax(a), numpy_absmax(b)))


def test_counts_calls_and_tokens():
    stats = ChannelStats(4)
    stats.update(torch.randn(2, 5, 4))
    stats.update(torch.randn(7, 4))
    assert (stats.calls, stats.tokens) == (2, 17)


def test_a_call_without_tokens_is_a_no_op():
    stats = ChannelStats(4)
    stats.update(torch.randn(3, 4))
    before = stats.state_dict()
    stats.update(torch.empty(0, 4))
    after = stats.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_accumulators_are_fp32_and_start_at_zero():
    stats = ChannelStats(5)
    assert stats.absmax.dtype == stats.tail.dtype == torch.float32
    assert stats.absmax.tolist() == stats.tail.tolist() == [0.0] * 5


def test_update_runs_on_meta_tensors_so_it_never_reads_values_on_the_host():
    # .item(), .cpu(), bool(tensor) all raise on meta tensors: passing proves no host sync.
    stats = ChannelStats(64)
    stats.update(torch.empty(2, 4096, 64, device="meta", dtype=torch.bfloat16))
    assert stats.tail.device.type == "meta" and stats.tail.dtype == torch.float32


def test_update_leaves_the_input_untouched():
    x = outlier_activations(500, 8)
    x[0, 0] = float("nan")
    copy = x.clone()
    ChannelStats(8).update(x)
    assert torch.equal(x.isnan(), copy.isnan()) and torch.equal(x.nan_to_num(), copy.nan_to_num())


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match="7 channels.*expected 8"):
        ChannelStats(8).update(torch.randn(3, 7))


@pytest.mark.parametrize("q", [-0.1, 100.5, float("nan")])
def test_percentile_outside_0_100_is_rejected(q):
    with pytest.raises(ValueError, match="percentile"):
        ChannelStats(4, percentile=q)


def test_pure_functions_reject_inputs_without_tokens():
    with pytest.raises(ValueError, match="no tokens"):
        channel_percentile(torch.empty(0, 4), 99.9)


def test_integer_inputs_are_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        channel_absmax(torch.ones(3, 4, dtype=torch.int32))


def test_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    stats = ChannelStats(6, percentile=99.5)
    stats.update(outlier_activations(300, 6))
    save_file(stats.state_dict(), tmp_path / "stats.safetensors")
    loaded = ChannelStats.from_state_dict(load_file(tmp_path / "stats.safetensors"))
    assert (loaded.percentile, loaded.calls, loaded.tokens) == (99.5, 1, 300)
    assert torch.equal(loaded.tail, stats.tail) and torch.equal(loaded.absmax, stats.absmax)
    assert torch.equal(loaded.tails, stats.tails)


def test_load_state_dict_rejects_another_percentile():
    saved = ChannelStats(6, percentile=99.0).state_dict()
    with pytest.raises(ValueError, match="percentile mismatch"):
        ChannelStats(6, percentile=99.9).load_state_dict(saved)


def test_merge_equals_observing_both_streams():
    a, b = outlier_activations(400, 10, seed=3), outlier_activations(600, 10, seed=4)
    together, first, second = ChannelStats(10), ChannelStats(10), ChannelStats(10)
    together.update(a)
    together.update(b)
    first.update(a)
    second.update(b)
    first.merge(second)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in together.state_dict().items())


def test_merge_rejects_another_channel_count():
    with pytest.raises(ValueError, match="channel count"):
        ChannelStats(4).merge(ChannelStats(5))


def test_update_accepts_inputs_that_require_grad():
    x = torch.randn(32, 8, requires_grad=True)
    stats = ChannelStats(8, percentile=99.0)
    stats.update(x)
    assert torch.equal(stats.absmax, x.detach().abs().amax(0))


# --------------------------------------------------------------------------- adaptive tails

def test_the_adaptive_percentiles_are_p99_p999_p9999():
    assert ADAPTIVE_PERCENTILES == (99.0, 99.9, 99.99)


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(1, 20000), channels=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       percentile=st.sampled_from([10.0, 50.0, 99.5, 99.9, 100.0]), seed=st.integers(0, 2**31))
def test_each_call_tails_equal_numpy_percentiles_exactly(tokens, channels, dtype, percentile, seed):
    x = outlier_activations(tokens, channels, dtype, seed)
    stats = ChannelStats(channels, percentile=percentile)
    stats.update(x)
    for row, q in enumerate(ADAPTIVE_PERCENTILES):
        np.testing.assert_array_equal(stats.tails[row].numpy(), numpy_percentile(x, q), err_msg=f"p{q}")
    np.testing.assert_array_equal(stats.tail.numpy(), numpy_percentile(x, percentile))
    np.testing.assert_array_equal(stats.absmax.numpy(), numpy_absmax(x))


def test_tails_of_a_75k_token_call_equal_numpy_percentiles_exactly():
    """A bf16 A14B 720p call (75k tokens): the top-k takes k = 751 for p99."""
    x = outlier_activations(75000, 8, seed=5)
    stats = ChannelStats(8)
    stats.update(x)
    want = np.stack([numpy_percentile(x, q) for q in ADAPTIVE_PERCENTILES])
    np.testing.assert_array_equal(stats.tails.numpy(), want)


def test_tails_are_the_max_over_calls_of_each_calls_percentiles():
    a, b = outlier_activations(500, 6, seed=1), outlier_activations(900, 6, seed=2) * 3
    stats = ChannelStats(6)
    stats.update(a)
    stats.update(b)
    per_call = [torch.stack([channel_percentile(x, q) for q in ADAPTIVE_PERCENTILES]) for x in (a, b)]
    assert torch.equal(stats.tails, torch.maximum(*per_call))


def test_tails_are_ordered_and_below_absmax():
    stats = ChannelStats(64)
    for seed in range(3):
        stats.update(outlier_activations(2000, 64, seed=seed))
    chain = torch.cat([stats.tails, stats.absmax[None]])
    assert bool((chain[1:] >= chain[:-1]).all())


def test_load_state_dict_rejects_tails_of_the_wrong_shape():
    saved = ChannelStats(6).state_dict()
    saved["tails"] = torch.zeros(6)
    with pytest.raises(ValueError, match="tails has shape"):
        ChannelStats(6).load_state_dict(saved)


# --------------------------------------------------------------------------- hard columns

HALF_DTYPES = [torch.bfloat16, torch.float16]
LONG = 16384  # a video call's token count


def hard_tokens(tokens: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """(tokens, 10) columns that stress an order-statistic selection: outlier-heavy random,
    few distinct values (ties), all equal, all zero with one -0.0, scattered NaN/+-Inf,
    mostly NaN (more bad values than the p99 rank), all NaN, subnormals, the largest
    finite magnitude, and random values with many NaNs among them."""
    g = torch.Generator().manual_seed(seed)
    big = torch.finfo(dtype).max
    cols = [outlier_activations(tokens, 1, torch.float32, seed)[:, 0],
            torch.randint(-2, 3, (tokens,), generator=g).float(),
            torch.full((tokens,), 3.0),
            torch.zeros(tokens),
            torch.where(torch.rand(tokens, generator=g) < 0.01, float("nan"), torch.randn(tokens, generator=g)),
            torch.where(torch.rand(tokens, generator=g) < 0.6, float("nan"), torch.randn(tokens, generator=g)),
            torch.full((tokens,), float("nan")),
            torch.randn(tokens, generator=g) * torch.finfo(dtype).smallest_normal / 4,
            torch.where(torch.rand(tokens, generator=g) < 0.02, big, 1.0) * torch.randn(tokens, generator=g).sign(),
            torch.where(torch.rand(tokens, generator=g) < 0.005, float("inf"), torch.randn(tokens, generator=g))]
    x = torch.stack(cols, dim=1).to(dtype)
    x[0, 3] = -0.0
    x[-1, 9] = -float("inf")
    return x


def numpy_reference(x: torch.Tensor, qs) -> np.ndarray:
    as_zero = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return np.stack([numpy_percentile(as_zero, q) for q in qs])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_the_selection_of_a_long_call_equals_numpy_on_hard_columns(dtype):
    x = hard_tokens(LONG + 3, dtype)
    qs = (99.9,) + ADAPTIVE_PERCENTILES + (0.0, 50.0, 100.0)
    np.testing.assert_array_equal(call_stats(x, qs).tails.numpy(), numpy_reference(x, qs))
    np.testing.assert_array_equal(channel_absmax(x).numpy(), numpy_reference(x, (100.0,))[0])
    stats = ChannelStats(10)
    stats.update(x)
    assert stats.nonfinite.tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1]


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 3000), q=st.one_of(st.floats(0, 100), st.sampled_from([99.0, 99.9, 99.99, 100.0])),
       dtype=st.sampled_from(HALF_DTYPES), seed=st.integers(0, 2**31))
def test_the_selection_equals_numpy_on_hard_columns_for_any_size_and_percentile(tokens, q, dtype, seed):
    x = hard_tokens(tokens, dtype, seed)
    np.testing.assert_array_equal(channel_percentile(x, q).numpy(), numpy_reference(x, (q,))[0])


# --------------------------------------------------------------------------- measure and fold

def test_update_is_fold_of_measure():
    x = outlier_activations(700, 6)
    direct, split = ChannelStats(6), ChannelStats(6)
    direct.update(x)
    split.fold(split.measure(x))
    assert all(torch.equal(v, split.state_dict()[k]) for k, v in direct.state_dict().items())


def test_one_measurement_folds_into_every_layer_reading_the_input():
    x = outlier_activations(700, 6)
    call = call_stats(x, ChannelStats(6).percentiles)
    a, b = ChannelStats(6), ChannelStats(6)
    a.fold(call)
    b.update(x)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_a_call_without_tokens_measures_as_none_and_folds_as_nothing():
    stats = ChannelStats(4)
    assert stats.measure(torch.empty(0, 4)) is None
    stats.fold(None)
    assert (stats.calls, stats.tokens) == (0, 0)


def test_fold_refuses_statistics_at_other_percentiles():
    call = ChannelStats(4, percentile=99.0).measure(torch.randn(10, 4))
    with pytest.raises(ValueError, match="do not fit"):
        ChannelStats(4, percentile=99.9).fold(call)
