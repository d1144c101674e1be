"""Packed W4A4 linear: 4.5-bit weights in memory, outputs bit-identical to fake quantization."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hifloat4 import HiF4Linear, LayerQuant, LayersConfig, backend, cpu_kernels, pack, prepare_weight, quantize_
from hifloat4.calibrate import CalibConfig, calibrate
from hifloat4.layout import to_planar
from hifloat4.packed_linear import PackedHiF4Linear, decode_weight, pack_weight, planar_weight, resident_bytes
from hifloat4.packing import PackedHiF4, unpack
from hifloat4.plan import W4A4Config
from hifloat4.rotation import Rotation
from hifloat4.spec import BYTES_PER_GROUP
from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan
from hifloat4.torch_kernels import unpack_groups


def weight(out_f=96, in_f=256, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    w[:, 3] *= 40.0  # a heavy column, as in DiT weights
    return w.to(dtype)


def mask_for(in_f, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.exp(torch.randn(in_f, generator=g))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit patterns: equality here also tells -0.0 from +0.0."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


# --------------------------------------------------------------------------- packing and decoding a weight

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rotation", [None, Rotation(block=64, seed=5)])
def test_pack_weight_decodes_to_prepare_weight_bit_for_bit(implementation, dtype, rotation):
    w, m = weight(dtype=dtype), mask_for(256)
    packed = pack_weight(w, m, rotation)
    assert packed.data.dtype == torch.uint8 and tuple(packed.data.shape) == (96, 4, BYTES_PER_GROUP)
    assert torch.equal(bits(decode_weight(to_planar(packed.data), 256, torch.float32)),
                       bits(prepare_weight(w, m, rotation)))
    assert torch.equal(bits(unpack(packed)), bits(prepare_weight(w, m, rotation)))


@pytest.mark.parametrize("scale", [None, torch.tensor([0.031])])
def test_planar_weight_of_fp8_with_its_scale_is_prepare_weight(implementation, scale):
    w8, m = (weight() * 20).to(torch.float8_e4m3fn), mask_for(256)
    planar = planar_weight(w8, m, scale=scale)
    assert torch.equal(bits(decode_weight(planar, 256, torch.bfloat16)),
                       bits(prepare_weight(w8, m, scale=scale, dtype=torch.bfloat16)))


def test_planar_weight_refuses_nan(implementation):
    w = weight()
    w[3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        planar_weight(w, mask_for(256))


def test_pack_weight_handles_in_features_that_are_not_a_multiple_of_64(implementation):
    w, m = weight(in_f=200), mask_for(200)
    packed = pack_weight(w, m)
    assert tuple(packed.data.shape) == (96, 4, BYTES_PER_GROUP)
    assert torch.equal(decode_weight(to_planar(packed.data), 200, torch.float32), prepare_weight(w, m))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_weight_in_any_dtype_equals_unpack(implementation, out_dtype):
    packed = pack_weight(weight(out_f=37), mask_for(256))
    want = unpack(PackedHiF4(packed.data, packed.shape, packed.dim, out_dtype))
    got = decode_weight(to_planar(packed.data), 256, out_dtype)
    assert got.dtype == out_dtype and torch.equal(bits(got), bits(want))


def test_pack_weight_refuses_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        pack_weight(torch.randn(4, 4, 4), torch.ones(4))
    with pytest.raises(ValueError, match="mask has shape"):
        pack_weight(torch.randn(4, 8), torch.ones(7))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_table_decoder_matches_the_cpp_decoder_on_every_byte_pattern(out_dtype):
    """The sync-free torch decoder (GPUs without Triton, MPS) against the C++ one: random
    codes and level bits, every valid scale byte (0..254), signed zeros, fp16 saturation."""
    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("C++ CPU kernels could not be built here")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (255 * 8, BYTES_PER_GROUP), generator=g, dtype=torch.uint8)
    data[:, 32] = torch.arange(255, dtype=torch.uint8).repeat_interleave(8)
    data[:8, :32] = 0x88  # -0.0 everywhere in those groups
    out, ref = (torch.empty(data.shape[0], 64, dtype=out_dtype) for _ in range(2))
    unpack_groups(data, out)
    kernels.unpack_groups(data, ref)
    assert torch.equal(bits(out), bits(ref))


def test_packed_weight_is_36_bytes_per_64_values():
    packed = pack_weight(weight(out_f=128, in_f=512), mask_for(512))
    assert packed.nbytes == 128 * 512 * 36 // 64
    assert packed.nbytes / (128 * 512 * 2) == pytest.approx(0.28125)


# --------------------------------------------------------------------------- the layer

def _layers(in_f=256, out_f=96, bias=True, rotation=None):
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    lin.weight.data = weight(out_f, in_f)
    quant = LayerQuant(mask_for(in_f), rotation)
    return HiF4Linear(lin, quant), PackedHiF4Linear.from_linear(lin, quant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_outputs_are_bit_identical_to_fake_quant(implementation, dtype, bias):
    fake, packed = _layers(bias=bias)
    x = (torch.randn(2, 9, 256) * 3).to(dtype)
    x[..., 5] *= 30.0
    with torch.no_grad():
        a, b = fake(x), packed(x)
    assert b.dtype == dtype and torch.equal(bits(a), bits(b))


def test_packed_linear_with_rotation_is_bit_identical_to_fake_quant():
    fake, packed = _layers(rotation=Rotation(block=128, seed=2))
    x = torch.randn(17, 256)
    with torch.no_grad():
        assert torch.equal(fake(x), packed(x))


def test_packed_linear_keeps_only_codes_mask_and_bias():
    _, packed = _layers(in_f=512, out_f=128)
    assert {n: t.dtype for n, t in packed.named_buffers()} == {
        "weight": torch.uint8, "hif4_mask": torch.float32, "bias": torch.float32}
    assert list(packed.parameters()) == []
    assert resident_bytes(packed) == 128 * 8 * 36 + 512 * 4 + 128 * 4
    assert "packed=hif4" in repr(packed)


def test_packed_linear_gives_its_codes_back_in_the_file_layout():
    w, m = weight(), mask_for(256)
    layer = PackedHiF4Linear.from_packed(pack_weight(w, m), m)
    assert torch.equal(layer.packed.data, pack_weight(w, m).data)


def test_packed_linear_state_dict_is_the_file_layout_and_loads_back():
    w, m = weight(), mask_for(256)
    layer = PackedHiF4Linear.from_packed(pack_weight(w, m), m)
    sd = layer.state_dict()
    assert torch.equal(sd["weight"], pack_weight(w, m).data)
    other = PackedHiF4Linear.from_packed(pack_weight(weight(seed=9), m), m)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, layer.weight)


def test_packed_linear_refuses_mismatched_parts():
    p = pack_weight(weight(), mask_for(256))
    with pytest.raises(ValueError, match="mask"):
        PackedHiF4Linear.from_packed(p, torch.ones(255))
    with pytest.raises(ValueError, match="bias"):
        PackedHiF4Linear.from_packed(p, torch.ones(256), torch.zeros(95))
    with pytest.raises(ValueError, match="rotation block"):
        PackedHiF4Linear.from_packed(p, torch.ones(256), rotation=Rotation(block=512))
    with pytest.raises(ValueError, match="2-D"):
        PackedHiF4Linear.from_packed(pack(torch.randn(2, 3, 64)), torch.ones(64))
    with pytest.raises(ValueError, match="compute"):
        PackedHiF4Linear.from_packed(p, torch.ones(256), compute="fp8")


needs_interpreted_triton = pytest.mark.skipif(
    "triton" not in backend.available("cpu"), reason="Triton runs on CPU tensors only in its interpreter "
    "(TRITON_INTERPRET=1, set without CUDA); on a GPU machine test_triton_kernels covers the compiled kernels")


def test_int8_compute_needs_a_backend_with_the_int8_gemm(monkeypatch):
    monkeypatch.setenv("HIFLOAT4_BACKEND", "torch")
    _, packed = _layers()
    packed.compute = "int8"
    with pytest.raises(RuntimeError, match="int8"):
        packed(torch.randn(3, 256))


@needs_interpreted_triton
def test_int8_compute_refuses_rotated_layers(monkeypatch):
    monkeypatch.setenv("HIFLOAT4_BACKEND", "triton")
    _, packed = _layers(rotation=Rotation(block=128, seed=2))
    packed.compute = "int8"
    with pytest.raises(ValueError, match="rotat"):
        packed(torch.randn(3, 256))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@needs_interpreted_triton
def test_int8_compute_matches_the_simulated_layer(monkeypatch, dtype):
    monkeypatch.setenv("HIFLOAT4_BACKEND", "triton")  # the interpreter on a CPU
    fake, packed = _layers(in_f=200, out_f=70)
    packed.compute = "int8"
    x = (torch.randn(2, 33, 200) * 3).to(dtype)
    with torch.no_grad():
        want, got = fake(x).float(), packed(x).float()
    assert got.shape == want.shape and float((got - want).norm() / want.norm()) <= 1e-3


@needs_interpreted_triton
def test_auto_compute_simulates_on_a_cpu(monkeypatch):
    monkeypatch.setenv("HIFLOAT4_BACKEND", "triton")
    from hifloat4.linear import resolve_compute
    assert resolve_compute("auto", torch.device("cpu")) == "simulate"
    assert resolve_compute("int8", torch.device("cpu")) == "int8"


def test_packed_quantize_gives_the_fake_quant_model_bit_for_bit_in_less_memory():
    model = make_tiny_wan("t2v", dim=128, ffn_dim=256, layers=2, text_dim=64)
    x, t, ctx = example_inputs(model, text_len=8)
    state = calibrate({"high_noise": model}, lambda: model(x, t, ctx), CalibConfig())
    fake = quantize_(copy.deepcopy(model), W4A4Config(state))
    packed = quantize_(copy.deepcopy(model), W4A4Config(state), packed=True)
    with torch.no_grad():
        assert torch.equal(fake(x, t, ctx), packed(x, t, ctx))
    assert resident_bytes(packed) < 0.45 * resident_bytes(model)  # fp32 model; main weights at 4.5 bits


def test_packed_quantize_refuses_names_that_are_not_linear_layers():
    with pytest.raises(ValueError, match="not nn.Linear"):
        quantize_(nn.Sequential(nn.ReLU()), LayersConfig({"0": LayerQuant(torch.ones(4))}), packed=True)


def test_real_wan_shapes_pack_to_28_percent_main_and_under_32_percent_whole():
    from hifloat4.tools.bench import REAL_MODELS, shape_bytes
    a14b = shape_bytes(REAL_MODELS["Wan2.2-T2V-A14B expert"])
    main_values = 40 * (8 * 5120 * 5120 + 2 * 5120 * 13824)  # per block: 8 attention + 2 ffn projections
    assert a14b["main_layers"] == 400 and a14b["main_bf16_bytes"] == 2 * main_values
    assert a14b["main_packed_bytes"] == main_values * 36 // 64 and a14b["main_pct"] == 28.125
    assert a14b["whole_pct"] < 32.0
    ti2v = shape_bytes(REAL_MODELS["Wan2.2-TI2V-5B"])
    assert ti2v["main_layers"] == 300 and ti2v["main_pct"] == 28.125 and ti2v["whole_pct"] < 32.0


def test_peak_forward_bytes_sees_a_temporary_allocation():
    from hifloat4.tools.bench import peak_forward_bytes

    def fn():
        t = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB, freed on return
        return t.sum()

    assert peak_forward_bytes(fn, torch.device("cpu")) >= 4 << 20
