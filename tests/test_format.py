"""HiF4 fake quantization, specified behaviour by behaviour (docs/hif4_spec.md)."""
from __future__ import annotations

import pytest
import torch
from hif4_reference import quantize_dequantize_reference, round_half_even_to_bits, vector, vector_cases

from hifloat4 import quantize_dequantize
from hifloat4.spec import SCALE_MAX, SCALE_MIN, group_scales, scale_table
from hifloat4.torch_kernels import lookup_scales

# every behaviour holds for both implementations: the C++ CPU kernel and pure torch
pytestmark = pytest.mark.usefixtures("implementation")


def q(values, dtype=torch.float32) -> torch.Tensor:
    return quantize_dequantize(torch.tensor(values, dtype=torch.float64).to(dtype))


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality, NaN matching NaN (the conformance criterion)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def reference(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(quantize_dequantize_reference(x.double().numpy())).to(x.dtype)


# --- conformance -------------------------------------------------------------------

@pytest.mark.parametrize("case", vector_cases())
def test_reference_vector_matches_bit_for_bit(case):
    x, expected = vector(case)
    out = quantize_dequantize(torch.from_numpy(x))
    assert bits_equal(out, torch.from_numpy(expected)), case


def test_half_precision_reference_case_matches_in_its_own_dtype():
    # The case named "bf16_inputs" holds fp16-representable values (10 mantissa bits),
    # not bf16 ones: given as fp16 it is the same data and must match exactly.
    x, expected = (torch.from_numpy(a) for a in vector("bf16_inputs"))
    assert torch.equal(x.half().float(), x)
    out = quantize_dequantize(x.half())
    assert out.dtype == torch.float16
    assert torch.equal(out.float(), expected)


def test_reference_case_rounded_to_bf16_matches_the_spec_transcription():
    xb = torch.from_numpy(vector("bf16_inputs")[0]).bfloat16()
    out = quantize_dequantize(xb)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), reference(xb.float()))


# --- the scale ---------------------------------------------------------------------

def test_scale_is_bf16_of_max_times_bf16_one_seventh_then_e6m2():
    # Vmax = 7: s = bf16(7 * 0.142578125) = bf16(0.998046875) = 0.99609375 -> E6M2 1.0
    scale, recip = group_scales(torch.tensor([7.0]))
    assert scale.item() == 1.0 and recip.item() == 1.0


def test_scale_clamps_to_e6m2_range():
    scale, _ = group_scales(torch.tensor([0.0, 1e-30, 1e30]))
    assert scale.tolist() == [SCALE_MIN, SCALE_MIN, SCALE_MAX]


def test_reciprocal_is_bf16_rounded_not_exact():
    # S = 1.25 -> 1/S = 0.8, bf16(0.8) = 0.80078125
    scale, recip = group_scales(torch.tensor([1.25 * 7]))
    assert scale.item() == 1.25
    assert recip.item() == 0.80078125


def test_scale_table_lookup_equals_spec_arithmetic_at_every_threshold():
    thresholds = scale_table()[0]
    bits = thresholds.view(torch.int32)
    probes = torch.cat([bits - 1, bits, bits + 1]).clamp_min(0).view(torch.float32)
    for got, want in zip(lookup_scales(probes), group_scales(probes)):
        assert torch.equal(got, want)


def test_scale_table_lookup_equals_spec_arithmetic_on_random_maxima():
    g = torch.Generator().manual_seed(0)
    v = torch.exp2(torch.rand(100_000, generator=g) * 120 - 60) * torch.rand(100_000, generator=g)
    for got, want in zip(lookup_scales(v), group_scales(v)):
        assert torch.equal(got, want)


def test_bf16_rounding_helper_is_half_even():
    assert round_half_even_to_bits(1 + 2**-8, 7) == 1.0  # tie, rounds to even
    assert round_half_even_to_bits(1 + 3 * 2**-8, 7) == 1 + 2**-6


# --- group hierarchy ------------------------------------------------------------------

def test_group_max_decodes_within_its_scale_range():
    out = q([7.0] + [0.0] * 63)
    assert out[0].item() == 7.0  # 1.75 * 2^2 * S with S = 1


def test_small_block_keeps_fine_resolution_next_to_large_block():
    # value 0 pins S = 1 (b8 = 1 for values 0..7); values 8..11 are small (b8 = b16 = 0,
    # d = 0): their grid is S/4 = 0.25, not the coarse grid of the group maximum
    x = [7.0] + [0.0] * 7 + [0.25, 0.5, 0.75, 0.0] + [0.0] * 52
    out = q(x)
    assert out[8:12].tolist() == [0.25, 0.5, 0.75, 0.0]


def test_level2_bit_doubles_the_step_of_one_4_value_block_only():
    # S = 1 (value 0 is 7). Values 8..15 form one level-1 block with max 3 < 4 (b8 = 0);
    # its first 4-value block has max 3 >= 2 (b16 = 1, grid S/2), its second max 1 (grid S/4)
    x = [7.0] + [0.0] * 7 + [3.0, 0.3, 0.0, 0.0, 1.0, 0.3, 0.0, 0.0] + [0.0] * 48
    out = q(x)
    assert out[9].item() == 0.5  # 0.3 on a 0.5 grid
    assert out[13].item() == 0.25  # 0.3 on a 0.25 grid
    assert out[8].item() == 3.0


def test_values_round_half_up_not_half_even():
    # S = 1 (Vmax 7), block of small values with d = 0: grid 0.25; 0.375 is a tie
    x = [7.0] + [0.0] * 7 + [0.375, 0.125, 0.625, 0.0] + [0.0] * 52
    out = q(x)
    assert out[8:11].tolist() == [0.5, 0.25, 0.75]


def test_code_two_or_more_saturates_to_one_point_seven_five():
    # Vmax 7.4: s = bf16(1.0551) = 1.0546875 -> S = 1, R = 1; d = 2 and
    # 7.4 * 1 * 2^0 + 0.5 = 7.9 -> floor 7 -> m = 1.75. Vmax 7.6 gives S = 1 too but
    # floor(8.1) = 8 -> m = 2 -> saturates to 1.75: both decode to 7.
    assert group_scales(torch.tensor([7.6]))[0].item() == 1.0
    assert q([7.4] + [0.0] * 63)[0].item() == 7.0
    assert q([7.6] + [0.0] * 63)[0].item() == 7.0


def test_saturates_at_344064():
    out = q([1e30, -5e5, 3e5] + [0.0] * 61)
    assert out[0].item() == 7 * SCALE_MAX == 344064.0
    assert out[1].item() == -344064.0


def test_flushes_to_zero_below_two_to_minus_48():
    out = q([2.0**-52, -(2.0**-53)] + [0.0] * 62)
    assert out.abs().max().item() == 0.0


def test_all_zero_group_decodes_to_zero():
    assert torch.equal(q([0.0] * 128), torch.zeros(128))


def test_sign_is_kept():
    out = q([-7.0, 7.0, -1.0] + [0.0] * 61)
    assert out[:3].tolist() == [-7.0, 7.0, -1.0]


def test_groups_are_independent():
    a = torch.randn(64)
    alone = quantize_dequantize(a)
    together = quantize_dequantize(torch.cat([a, 1000 * torch.randn(64)]))
    assert torch.equal(alone, together[:64])


# --- non-finite policy -----------------------------------------------------------------

def test_nan_and_inf_stay_in_place_and_count_as_zero_for_their_group():
    x = torch.randn(3, 64)
    x[1, 5], x[1, 9], x[2, 0] = float("nan"), float("inf"), -float("inf")
    out = quantize_dequantize(x)
    assert out[1, 5].isnan() and out[1, 9] == float("inf") and out[2, 0] == -float("inf")
    zeroed = x.clone()
    zeroed[1, 5] = zeroed[1, 9] = zeroed[2, 0] = 0.0
    expected = quantize_dequantize(zeroed)
    finite = torch.isfinite(x)
    assert torch.equal(out[finite], expected[finite])


# --- shapes, axes, dtypes ----------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 63, 65, 100, 4128])
def test_ragged_k_is_zero_padded(k):
    x = torch.randn(3, k)
    padded = torch.nn.functional.pad(x, (0, (-k) % 64))
    assert torch.equal(quantize_dequantize(x), quantize_dequantize(padded)[:, :k])


@pytest.mark.parametrize("dim", [0, 1, 2, -2])
def test_any_dim_equals_moving_it_last(dim):
    x = torch.randn(70, 3, 66)
    expected = quantize_dequantize(x.movedim(dim, -1)).movedim(-1, dim)
    assert torch.equal(quantize_dequantize(x, dim=dim), expected)


def test_non_contiguous_input_gives_the_same_result():
    x = torch.randn(128, 256)
    assert torch.equal(quantize_dequantize(x.t()), quantize_dequantize(x.t().contiguous()))


def test_input_is_not_modified():
    x = torch.randn(4, 64)
    before = x.clone()
    quantize_dequantize(x)
    assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_and_dtype_are_preserved(dtype):
    x = torch.randn(2, 3, 100).to(dtype)
    out = quantize_dequantize(x)
    assert out.dtype == dtype and out.shape == x.shape


def test_scalar_and_empty_tensors():
    assert quantize_dequantize(torch.tensor(7.0)).item() == 7.0
    assert quantize_dequantize(torch.empty(0, 64)).shape == (0, 64)


def test_integer_tensors_are_refused():
    with pytest.raises(TypeError):
        quantize_dequantize(torch.arange(64))


def test_fp16_output_saturates_instead_of_overflowing():
    # 65504 quantizes to above the fp16 maximum in float32; the cast must not give inf
    x = torch.tensor([65504.0, 40000.0] + [0.0] * 62, dtype=torch.float16)
    out = quantize_dequantize(x)
    assert torch.isfinite(out).all()


def test_bf16_and_fp16_inputs_equal_the_float32_path_on_the_same_values():
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(64, 256) * 3).to(dtype)
        assert torch.equal(quantize_dequantize(x).float(), quantize_dequantize(x.float()))


def test_output_values_are_exact_in_bf16():
    x = torch.randn(256, 256) * torch.logspace(-10, 10, 256)
    out = quantize_dequantize(x)
    assert torch.equal(out.bfloat16().float(), out)


# --- property tests against the spec transcription -----------------------------------

def _random_rows(seed: int, rows: int = 24, k: int = 192) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp2(torch.randint(-45, 16, (rows, 1), generator=g).float())
    x = torch.randn(rows, k, generator=g) * scale
    heavy = torch.rand(rows, k, generator=g) < 0.02
    return torch.where(heavy, x * 50, x)


@pytest.mark.parametrize("seed", range(6))
def test_float32_random_data_matches_the_spec_transcription(seed):
    x = _random_rows(seed)
    assert bits_equal(quantize_dequantize(x), reference(x))


@pytest.mark.parametrize("seed", range(3))
def test_bf16_random_data_matches_the_spec_transcription(seed):
    x = _random_rows(100 + seed).bfloat16()
    assert torch.equal(quantize_dequantize(x).float(), reference(x.float()).float())


def test_float32_products_that_round_onto_a_tie_are_decided_exactly():
    # a * R lands within float32 rounding of k + 0.5, 2 or 4: the hard cases for a
    # float32 implementation. S = 1.25 gives R = 0.80078125 (8 significant bits).
    g = torch.Generator().manual_seed(7)
    recip = 0.80078125
    targets = torch.tensor([0.5, 1.5, 2.5, 3.5, 2.0, 4.0, 6.5])
    base = (targets / recip).repeat(40)
    ulps = torch.randint(-3, 4, base.shape, generator=g).to(torch.int32)
    near = (base.view(torch.int32) + ulps).view(torch.float32)
    rows = []
    for i in range(0, near.numel(), 7):
        row = torch.zeros(64)
        row[0] = 1.25 * 7  # pins S = 1.25
        row[8 : 8 + 7] = near[i : i + 7]
        rows.append(row)
    x = torch.stack(rows)
    assert bits_equal(quantize_dequantize(x), reference(x))


@pytest.mark.parametrize("scale", [1.25, 1.5, 1.75])
def test_float32_block_maxima_that_round_onto_a_level_threshold_are_decided_exactly(scale):
    # A block maximum V with fl(V * R) == 4 (level 1) or == 2 (level 2) while the exact
    # product is below: a float32 implementation that trusts the rounded product sets
    # the level bit wrongly. Scan +-8 ulps around 4/R and 2/R for each scale.
    recip = group_scales(torch.tensor([scale * 7]))[1].item()
    rows = []
    for target in (4.0, 2.0):
        centre = torch.tensor(target / recip, dtype=torch.float32).view(torch.int32)
        for ulp in range(-8, 9):
            row = torch.zeros(64)
            row[0] = scale * 7  # pins S
            row[8] = (centre + ulp).view(torch.float32)
            row[9] = row[8] * 0.3
            rows.append(row)
    x = torch.stack(rows)
    assert bits_equal(quantize_dequantize(x), reference(x))



def test_tensors_that_require_grad_are_quantized_without_error():
    # ComfyUI's weights are nn.Parameters; quantization is not differentiable
    w = torch.nn.Parameter(torch.randn(8, 64))
    assert torch.equal(quantize_dequantize(w), quantize_dequantize(w.detach()))
