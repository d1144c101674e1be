"""The W4A4 linear: y = Q(x*m [R]) @ Q(W/m [R])^T + b, float32 math, caller's dtype out."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from hifloat4 import HiF4Linear, LayerQuant, LayersConfig, prepare_activation, prepare_weight, quantize_, quantize_dequantize
from hifloat4.linear import CHUNK_ELEMENTS, w4a4_linear
from hifloat4.rotation import Rotation, rotate


def layer(in_f=256, out_f=96, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


def mask_for(in_f, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(in_f, generator=g))


def test_prepare_weight_is_q_of_w_over_mask():
    lin, m = layer(), mask_for(256)
    expected = quantize_dequantize(lin.weight.detach() / m)
    assert torch.equal(prepare_weight(lin.weight.detach(), m), expected)


def test_prepare_activation_is_q_of_x_times_mask_in_the_input_dtype():
    x, m = torch.randn(3, 7, 256).bfloat16(), mask_for(256)
    out = prepare_activation(x, m)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out.float(), quantize_dequantize(x.float() * m))


def test_rotation_is_applied_after_the_mask_on_both_sides():
    lin, m, rot = layer(), mask_for(256), Rotation(block=128, seed=3)
    x = torch.randn(5, 256)
    assert torch.equal(prepare_activation(x, m, rot), quantize_dequantize(rotate(x * m, rot)))
    assert torch.equal(prepare_weight(lin.weight.detach(), m, rot), quantize_dequantize(rotate(lin.weight.detach() / m, rot)))


def test_activation_chunking_does_not_change_the_result(monkeypatch):
    x, m = torch.randn(50, 256), mask_for(256)
    whole = prepare_activation(x, m)
    monkeypatch.setattr("hifloat4.linear.CHUNK_ELEMENTS", 256 * 3)
    assert torch.equal(prepare_activation(x, m), whole)
    assert CHUNK_ELEMENTS > 256 * 3


def test_hif4_linear_equals_the_formula():
    lin, m = layer(), mask_for(256)
    x = torch.randn(4, 256)
    q = HiF4Linear(lin, LayerQuant(m))
    expected = quantize_dequantize(x * m) @ quantize_dequantize(lin.weight.detach() / m).T + lin.bias.detach()
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-6)


def test_hif4_linear_returns_the_input_dtype():
    lin = layer()
    q = HiF4Linear(lin, LayerQuant(torch.ones(256)))
    assert q(torch.randn(2, 256).bfloat16()).dtype == torch.bfloat16


def test_cached_weight_is_exact_in_bf16():
    lin, m = layer(), mask_for(256)
    q = HiF4Linear(lin, LayerQuant(m))
    assert torch.equal(q.weight_q.float(), prepare_weight(lin.weight.detach(), m))


def test_w4a4_error_is_small_but_nonzero():
    lin = layer()
    x = torch.randn(64, 256)
    y = lin(x)
    yq = HiF4Linear(lin, LayerQuant(torch.ones(256)))(x)
    rel = ((yq - y).norm() / y.norm()).item()
    assert 0 < rel < 0.2  # 4-bit weights and activations: a few percent on Gaussian data


def test_mask_of_wrong_length_is_refused():
    with pytest.raises(ValueError, match="mask"):
        HiF4Linear(layer(), LayerQuant(torch.ones(255)))


def test_quantize_replaces_only_the_named_linears():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize_(model, LayersConfig({"0": LayerQuant(torch.ones(64))}))
    assert isinstance(model[0], HiF4Linear) and isinstance(model[2], nn.Linear)


def test_quantize_refuses_unknown_or_non_linear_names_and_changes_nothing():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
    with pytest.raises(ValueError, match="not nn.Linear"):
        quantize_(model, LayersConfig({"0": LayerQuant(torch.ones(64)), "1": LayerQuant(torch.ones(64))}))
    assert isinstance(model[0], nn.Linear)


def test_functional_forward_matches_module():
    lin, m = layer(), mask_for(256)
    quant = LayerQuant(m)
    x = torch.randn(3, 256)
    w = prepare_weight(lin.weight.detach(), m)
    assert torch.equal(w4a4_linear(x, w, lin.bias, quant), HiF4Linear(lin, quant)(x))


def test_functional_forward_computes_in_the_compute_dtype_it_is_given():
    """bf16 activations computed in float32 give float32 x's result: Q runs on float32 values either way."""
    lin, m = layer(), mask_for(256)
    quant = LayerQuant(m)
    x = torch.randn(3, 256).bfloat16()
    w = prepare_weight(lin.weight.detach(), m, dtype=torch.bfloat16)
    y = w4a4_linear(x, w, lin.bias, quant, torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, w4a4_linear(x.float(), w, lin.bias, quant))


def test_prepare_activation_writes_the_dtype_it_is_asked_for():
    x, m = torch.randn(3, 256).bfloat16(), mask_for(256)
    out = prepare_activation(x, m, dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, prepare_activation(x.float(), m))


def test_fp16_activations_saturate_finite_values_but_keep_infinities():
    """HiF4 reaches 344064, fp16 stops at 65504: finite values saturate; an Inf input is
    kept as Inf (the spec's non-finite policy), not turned into 65504."""
    x = torch.zeros(1, 64, dtype=torch.float16)
    x[0, 0], x[0, 1], x[0, 2] = 60000.0, float("inf"), float("-inf")
    q = prepare_activation(x, torch.full((64,), 4.0))  # 60000 * 4 is beyond fp16 once quantized
    assert q[0, 0].item() == 65504.0
    assert q[0, 1].item() == float("inf") and q[0, 2].item() == float("-inf")
