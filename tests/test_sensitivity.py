"""Specification of hifloat4.sensitivity: the token sample and the per-layer W4A4 output error."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hifloat4 import masks
from hifloat4 import state as st
from hifloat4.linear import LayerQuant, prepare_activation, prepare_weight
from hifloat4.rotation import Rotation, for_layer
from hifloat4.sensitivity import ERROR_CEILING, TokenSample, _relative, held_bytes, layer_errors
from hifloat4.stats import ChannelStats


def _calls(n: int, tokens: int = 40, channels: int = 4):
    """Call i holds the value i everywhere, so a kept token tells which call it came from."""
    return [torch.full((tokens, channels), float(i)) for i in range(n)]


def _kept_calls(sample: TokenSample) -> list[int]:
    return sample.tokens()[:, 0].reshape(sample.slots, -1)[:, 0].int().tolist()


# --------------------------------------------------------------------------- TokenSample

def test_a_call_contributes_evenly_spaced_tokens():
    x = torch.arange(100.0).reshape(100, 1)
    sample = TokenSample(1, capacity=10, per_call=10)
    sample.update(x)
    assert sample.tokens()[:, 0].tolist() == [5.0, 15.0, 25.0, 35.0, 45.0, 55.0, 65.0, 75.0, 85.0, 95.0]


def test_a_call_with_fewer_tokens_than_per_call_contributes_all_of_them():
    x = torch.randn(2, 3, 5)
    sample = TokenSample(5, capacity=32, per_call=16)
    sample.update(x)
    assert torch.equal(sample.tokens(), x.reshape(6, 5))


def test_the_sample_never_holds_more_than_its_capacity():
    sample = TokenSample(4, capacity=48, per_call=16)
    for x in _calls(50):
        sample.update(x)
    assert sample.tokens().shape == (48, 4) and sample.calls == 50


def test_the_sample_is_deterministic():
    a, b = TokenSample(4, capacity=32, per_call=8), TokenSample(4, capacity=32, per_call=8)
    for x in _calls(30):
        a.update(x)
        b.update(x)
    assert torch.equal(a.tokens(), b.tokens())


def test_the_first_calls_fill_the_sample_in_order():
    sample = TokenSample(4, capacity=32, per_call=8)
    for x in _calls(4):
        sample.update(x)
    assert _kept_calls(sample) == [0, 1, 2, 3]


def test_later_calls_are_kept_about_as_often_as_early_ones():
    """Reservoir sampling: each of 40 calls ends up kept with probability 4/40."""
    kept = torch.zeros(40)
    for seed in range(300):
        sample = TokenSample(4, capacity=8, per_call=2, seed=seed)
        for x in _calls(40, tokens=4):
            sample.update(x)
        kept[_kept_calls(sample)] += 1
    first, last = kept[:20].sum() / 20, kept[20:].sum() / 20
    assert abs(first - last) < 0.2 * (first + last) / 2 and float(kept.sum()) == 300 * 4


def test_the_sample_keeps_the_input_dtype():
    sample = TokenSample(8)
    sample.update(torch.randn(20, 8, dtype=torch.bfloat16))
    assert sample.tokens().dtype == torch.bfloat16


def test_an_empty_sample_refuses_to_give_tokens():
    with pytest.raises(ValueError, match="never saw an input"):
        TokenSample(4).tokens()


def test_a_wrong_channel_count_is_refused():
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 4\]"):
        TokenSample(4).update(torch.randn(3, 5))


def test_given_rows_are_kept_as_they_are_and_asked_for_only_when_the_call_is_kept():
    sample, given = TokenSample(4, capacity=16, per_call=16), []
    for x in _calls(20):
        sample.update(x, rows=lambda x=x: given.append(sample.rows(x)) or given[-1])
    assert 1 < len(given) < 20  # the reservoir keeps the first call and replaces it a few times
    assert len(sample.held()) == 1 and sample.held()[0] is given[-1]


def test_held_bytes_counts_a_rows_tensor_shared_by_two_samples_once():
    x = torch.randn(40, 4)
    a, b = TokenSample(4, capacity=32, per_call=16), TokenSample(4, capacity=32, per_call=16)
    rows = a.rows(x)
    a.update(x, rows=lambda: rows)
    b.update(x, rows=lambda: rows)
    b.update(torch.randn(40, 4))
    assert held_bytes([a, b]) == 2 * 16 * 4 * 4


def test_rows_are_taken_in_the_first_inputs_dtype():
    sample = TokenSample(8)
    sample.update(torch.randn(20, 8, dtype=torch.bfloat16))
    sample.update(torch.randn(20, 8))
    assert sample.tokens().dtype == torch.bfloat16


# --------------------------------------------------------------------------- the error

def _outlier_layer(outliers: bool, channels: int = 64, seed: int = 0):
    """x (128, C), W (32, C); with outliers, 4 activation channels 200x larger and their
    weight columns 200x smaller (the output stays balanced, HiF4's shared scales do not)."""
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(128, channels, generator=gen), torch.randn(32, channels, generator=gen)
    if outliers:
        x[:, :4] *= 200.0
        w[:, :4] /= 200.0
    return x, w


def _error_by_definition(x: torch.Tensor, w: torch.Tensor, quant: LayerQuant) -> float:
    """||Q(x m) Q(W/m)^T - x W^T|| / ||x W^T|| in float32, written out."""
    yq = prepare_activation(x, quant.mask, quant.rotation) @ prepare_weight(w, quant.mask, quant.rotation,
                                                                            dtype=torch.float32).T
    ref = x @ w.T
    return float((yq - ref).norm() / ref.norm())


def test_an_undefined_or_overflowing_error_counts_as_the_largest():
    zero, one = torch.zeros(3), torch.ones(3)
    assert float(_relative(one, zero)) == ERROR_CEILING  # x W^T == 0, quantized output not
    assert float(_relative(one * 1e30, one * 1e-30)) == ERROR_CEILING
    assert float(_relative(zero, zero)) == 0.0


# --------------------------------------------------------------------------- layer_errors

def _layer_state(x: torch.Tensor, w: torch.Tensor, alpha: float = 0.5) -> st.LayerState:
    stats = ChannelStats(x.shape[-1])
    stats.update(x)
    return masks.make_layer_state(w.abs().amax(0), stats.absmax, stats.tail, alpha=alpha, statistic="tail",
                               tails=stats.tails)


def _sample(x: torch.Tensor) -> TokenSample:
    sample = TokenSample(x.shape[-1], capacity=x.shape[0], per_call=x.shape[0])
    sample.update(x)
    return sample


@pytest.mark.parametrize("rotation", [None, Rotation(64, 2)])
def test_layer_errors_are_the_relative_errors_of_the_stored_mask_then_each_candidate(rotation):
    x, w = _outlier_layer(True)
    ls = _layer_state(x, w)
    errors = layer_errors(_sample(x), w, ls, 0.5, rotation)
    rot = for_layer(rotation, 64)
    candidates = [ls.mask] + [masks.candidate_mask(ls, c, 0.5) for c in st.CANDIDATES]
    assert errors.dtype == torch.float32 and errors.shape == (len(st.ERROR_KEYS),)
    assert errors.tolist() == [_error_by_definition(x, w, LayerQuant(m.float(), rot)) for m in candidates]


def test_layer_errors_count_non_finite_tokens_as_zero():
    x, w = _outlier_layer(False)
    bad = x.clone()
    bad[3, 5] = float("inf")
    clean = x.clone()
    clean[3, 5] = 0.0
    ls = _layer_state(clean, w)
    assert torch.equal(layer_errors(_sample(bad), w, ls, 0.5, None), layer_errors(_sample(clean), w, ls, 0.5, None))


def test_layer_errors_use_the_layers_rotation_block():
    x, w = _outlier_layer(True)
    ls = _layer_state(x, w)
    assert torch.equal(layer_errors(_sample(x), w, ls, 0.5, Rotation(512, 2)),
                       layer_errors(_sample(x), w, ls, 0.5, Rotation(64, 2)))  # 64 inputs: block 64 either way


def test_the_calibrated_error_equals_the_p999_candidate_for_a_p999_tail_state():
    x, w = _outlier_layer(True)
    errors = layer_errors(_sample(x), w, _layer_state(x, w), 0.5, None)
    assert errors[0] == errors[st.ERROR_KEYS.index("p99.9")]


def test_candidate_masks_need_the_tails():
    x, w = _outlier_layer(False)
    ls = dataclasses.replace(_layer_state(x, w), tails=None)
    with pytest.raises(st.PTQStateError, match="tails"):
        layer_errors(_sample(x), w, ls, 0.5, None)
