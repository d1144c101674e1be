"""The torch path never synchronises with the host: it runs on the meta device.

A meta tensor has shapes and dtypes but no data, so any `.item()`, `bool(tensor)`,
data-dependent Python branch or host copy of values raises there. Running the GPU
entry points on meta tensors of real Wan2.2 sizes is the proof the issue asks for.
"""
from __future__ import annotations

import pytest
import torch

import hifloat4
from hifloat4 import backend
from hifloat4.calibrate import CalibConfig, LayerObservation
from hifloat4.linear import LayerQuant, prepare_activation, prepare_weight, w4a4_linear
from hifloat4.masks import make_layer_state
from hifloat4.rotation import Rotation
from hifloat4.sensitivity import TokenSample, layer_errors
from hifloat4.state import ERROR_KEYS
from hifloat4.stats import ChannelStats
from hifloat4.torch_kernels import unpack_groups

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS, DIM, FFN = 4096, 5120, 13824  # an A14B ffn.2 input chunk and the ffn.2 weight


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV, "torch")


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_dequantize_runs_on_meta_tensors(dtype):
    out = hifloat4.quantize_dequantize(meta(TOKENS, FFN, dtype=dtype))
    assert (out.device.type, out.shape, out.dtype) == ("meta", (TOKENS, FFN), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_activation_runs_on_meta_tensors(dtype):
    out = prepare_activation(meta(TOKENS, FFN, dtype=dtype), meta(FFN))
    assert (out.device.type, out.shape, out.dtype) == ("meta", (TOKENS, FFN), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_weight_runs_on_meta_tensors(dtype):
    out = prepare_weight(meta(DIM, FFN, dtype=dtype), meta(FFN), dtype=dtype)
    assert (out.device.type, out.shape, out.dtype) == ("meta", (DIM, FFN), dtype)


def test_prepare_weight_from_fp8_with_its_scale_runs_on_meta_tensors():
    w = meta(DIM, FFN, dtype=torch.float8_e4m3fn)
    out = prepare_weight(w, meta(FFN), scale=meta(1), dtype=torch.bfloat16)
    assert (out.device.type, out.shape, out.dtype) == ("meta", (DIM, FFN), torch.bfloat16)


def test_rotated_activation_runs_on_meta_tensors():
    out = prepare_activation(meta(256, DIM, dtype=torch.bfloat16), meta(DIM), Rotation(512, 0))
    assert (out.shape, out.dtype) == ((256, DIM), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a4_linear_runs_on_meta_tensors(dtype):
    y = w4a4_linear(meta(TOKENS, DIM, dtype=dtype), meta(FFN, DIM, dtype=torch.bfloat16), meta(FFN, dtype=dtype),
                    LayerQuant(meta(DIM)))
    assert (y.shape, y.dtype) == ((TOKENS, FFN), dtype)


def test_packed_decode_runs_on_meta_tensors():
    out = torch.empty(DIM * FFN // 64, 64, dtype=torch.bfloat16, device="meta")
    unpack_groups(torch.empty(DIM * FFN // 64, 36, dtype=torch.uint8, device="meta"), out)
    assert out.shape == (DIM * FFN // 64, 64)


@pytest.mark.parametrize("tokens", [4096, 75000])
def test_channel_stats_update_with_the_adaptive_tails_runs_on_meta_tensors(tokens):
    stats = ChannelStats(FFN, device="meta")
    stats.update(meta(tokens, FFN, dtype=torch.bfloat16))
    assert (stats.tails.device.type, stats.tails.shape) == ("meta", (3, FFN))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_observations_sharing_an_input_run_on_meta_tensors(dtype):
    """q/k/v reading one 480p call, stats measured once."""
    x = meta(2, 32760, DIM, dtype=dtype)
    observations = [LayerObservation(DIM, CalibConfig(), device="meta") for _ in range(3)]
    for obs in observations:
        obs.update(x)
    assert all(o.stats.tails.device.type == "meta" and o.sample.tokens().shape == (16, DIM) for o in observations)


def test_token_sample_update_runs_on_meta_tensors_past_its_capacity():
    sample = TokenSample(DIM, capacity=128, per_call=16)
    for _ in range(20):  # 8 slots: the reservoir replaces calls from the 9th on
        sample.update(meta(2, TOKENS // 2, DIM, dtype=torch.bfloat16))
    assert (sample.tokens().device.type, sample.tokens().shape) == ("meta", (128, DIM))


@pytest.mark.parametrize("rotation", [None, Rotation(512, 0)])
def test_layer_errors_run_on_meta_tensors(rotation):
    sample = TokenSample(FFN, capacity=128)
    sample.update(meta(TOKENS, FFN, dtype=torch.bfloat16))
    ones = torch.ones(FFN)
    ls = make_layer_state(ones, ones, ones, alpha=0.5, statistic="tail", tails=torch.ones(3, FFN))
    errors = layer_errors(sample, meta(DIM, FFN, dtype=torch.bfloat16), ls, 0.5, rotation)
    assert (errors.device.type, errors.shape) == ("meta", (len(ERROR_KEYS),))


def test_the_meta_device_does_refuse_a_host_sync():
    """The premise of this file: were a sync left in the path, meta would raise."""
    with pytest.raises(Exception):
        bool(meta(3).sum() > 0)
