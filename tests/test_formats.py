"""The reference 4-bit formats HiF4 is compared against (hifloat4/tools/eval/formats.py),
specified from their public definitions: E2M1 and E4M3 element grids, the MXFP4 E8M0
power-of-two scale, the NVFP4 E4M3 block scale, symmetric INT4 with a bf16 scale."""
from __future__ import annotations

import pytest
import torch

from hifloat4 import quantize_dequantize
from hifloat4.tools.eval import formats as F

E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --- element types ---------------------------------------------------------------------

def test_e2m1_grid_is_the_eight_magnitudes_0_05_1_15_2_3_4_6():
    sweep = torch.linspace(-7, 7, 20001, dtype=torch.float64)
    values = sorted(set(F.e2m1(sweep).abs().tolist()))
    assert values == E2M1_GRID


def test_e2m1_keeps_every_grid_value_and_its_sign():
    grid = t(E2M1_GRID + [-v for v in E2M1_GRID])
    assert torch.equal(F.e2m1(grid), grid)


@pytest.mark.parametrize("x, expected", [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0),
                                         (2.5, 2.0), (3.5, 4.0), (5.0, 4.0), (-5.0, -4.0)])
def test_e2m1_ties_round_to_the_even_mantissa(x, expected):
    assert F.e2m1(t([x])).item() == expected


def test_e2m1_rounds_to_nearest_off_ties():
    assert F.e2m1(t([0.26, 0.74, 2.4, 2.6, 4.9, 5.1])).tolist() == [0.5, 0.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_saturates_at_six():
    assert F.e2m1(t([6.9, 7.0, 1e6, float("inf"), -1e6])).tolist() == [6.0, 6.0, 6.0, 6.0, -6.0]


def test_e4m3_matches_torch_float8_e4m3fn_inside_its_range():
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 40
    x = x[x.abs() <= 448]
    assert torch.equal(F.e4m3(x), x.to(torch.float8_e4m3fn).double())


def test_e4m3_has_3_mantissa_bits_max_448_and_subnormals_down_to_2_pow_minus_9():
    assert F.e4m3(t([1.0625, 1.1875, 500.0, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10])).tolist() == [
        1.0, 1.25, 448.0, 2.0**-9, 0.0, 2.0**-9]  # 1.0625 and 1.1875 are ties: to even


def test_bf16_rounding_is_single_and_half_to_even():
    x = t([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-30])  # tie, tie, just above a tie
    assert F.bf16(x).tolist() == [1.0, 1 + 2.0**-6, 1 + 2.0**-7]


@pytest.mark.parametrize("amax, scale", [(6.0, 1.0), (7.99, 1.0), (8.0, 2.0), (0.75, 2.0**-3),
                                         (2.0**-140, 2.0**-127), (2.0**130, 2.0**127)])
def test_e8m0_scale_is_two_to_floor_log2_max_minus_2_clamped(amax, scale):
    assert F.e8m0_scale(t([amax]), emax_elem=2).item() == scale


# --- block formats ---------------------------------------------------------------------

def test_mxfp4_values_are_e2m1_times_the_blocks_power_of_two_scale():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(2)) * 3
    blocks, q = x.view(-1, 32).double(), F.mxfp4(x).view(-1, 32).double()
    scale = F.e8m0_scale(blocks.abs().amax(dim=1, keepdim=True), emax_elem=2)
    assert set((q / scale).abs().flatten().tolist()) <= set(E2M1_GRID)
    assert torch.equal(q / scale, F.e2m1(blocks / scale))


def test_mxfp4_clips_a_block_max_between_6_and_8_times_the_scale_to_6():
    x = torch.zeros(32)
    x[0], x[1] = 7.0, 1.0  # floor(log2 7) - 2 = 0: X = 1, so 7 -> E2M1 6
    assert F.mxfp4(x)[:2].tolist() == [6.0, 1.0]


def test_mxfp4_blocks_are_32_values_and_independent():
    x = torch.full((64,), 0.5)
    x[0] = 1000.0  # a huge value in block 0 only
    q = F.mxfp4(x)
    assert torch.all(q[32:] == 0.5)
    assert torch.all(q[1:32] == 0.0)  # 0.5 underflows next to 1000 in the same block


def test_nvfp4_block_scale_is_amax_over_6_rounded_to_e4m3():
    # amax 6.375: s = E4M3(1.0625) = 1.0 (tie, to even), so 6.375 / 1 saturates to E2M1 6
    x = torch.zeros(16)
    x[0], x[1] = 6.375, 3.0
    assert F.nvfp4(x, tensor_scale=False)[:2].tolist() == [6.0, 3.0]


def test_nvfp4_blocks_are_16_values():
    x = torch.full((32,), 0.75)  # alone, a block of 0.75 is exact: s = 0.75 / 6 = 2^-3
    x[0] = 1000.0
    q = F.nvfp4(x, tensor_scale=False)
    assert torch.all(q[16:] == 0.75) and torch.all(q[1:16] == 0.0)


def test_nvfp4_per_tensor_scale_makes_it_independent_of_the_tensor_scale():
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    base = F.nvfp4(x)
    for k in (-20, -8, 12, 15):
        assert torch.equal(F.nvfp4(x * 2.0**k), base * 2.0**k)


def test_nvfp4_without_tensor_scale_flushes_tiny_blocks_and_clips_huge_ones():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    assert torch.all(F.nvfp4(x * 2.0**-20, tensor_scale=False) == 0)
    assert F.nvfp4(x * 2.0**15, tensor_scale=False).abs().max().item() == 6 * 448


def test_int4_codes_are_symmetric_minus7_to_7_with_scale_amax_over_7():
    x = torch.zeros(32)
    x[:4] = torch.tensor([7.0, -7.0, 3.4, -3.6])  # amax 7: s = 1
    q = F.int4_group(x)
    assert q[:4].tolist() == [7.0, -7.0, 3.0, -4.0]


def test_int4_never_uses_code_minus_8():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    q = F.int4_group(x).view(-1, 32)
    scale = F.bf16(x.view(-1, 32).abs().amax(dim=1, keepdim=True).double() / 7)
    codes = q.double() / scale
    assert torch.equal(codes, codes.round()) and codes.abs().max().item() <= 7


def test_int4_scale_is_rounded_to_bf16():
    x = torch.zeros(32, dtype=torch.float64)
    x[0], x[1] = 7 * (1 + 2.0**-9), 1.0 + 2.0**-9  # amax / 7 = 1 + 2^-9 -> bf16 1.0
    assert F.int4_group(x)[:2].tolist() == [7.0, 1.0]


def test_int4_groups_are_32_values():
    x = torch.full((64,), 0.875)  # alone, a group of 0.875 is exact: s = 0.875 / 7 = 2^-3
    x[0] = 100.0
    q = F.int4_group(x)
    assert torch.all(q[32:] == 0.875) and torch.all(q[1:32] == 0.0)


# --- common contract --------------------------------------------------------------------

def test_bits_per_value_are_as_stated():
    bits = {f.name: f.bits_per_value for f in F.FORMATS}
    assert bits["HiF4"] == 4.5 and bits["NVFP4"] == 4.5 and bits["MXFP4"] == 4.25 and bits["INT4 g32 bf16"] == 4.5


@pytest.mark.parametrize("fmt", F.FORMATS, ids=lambda f: f.name)
def test_every_format_keeps_shape_pads_partial_blocks_and_maps_zero_to_zero(fmt):
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(6))
    q = fmt.quantize(x)
    assert q.shape == x.shape and q.dtype == torch.float32
    assert torch.equal(fmt.quantize(torch.zeros(2, 100)), torch.zeros(2, 100))
    assert F.sqnr_db(x, q) > 15  # 4-bit quantization of a Gaussian: roughly 19-22 dB


@pytest.mark.parametrize("fmt", [F.mxfp4, F.nvfp4, F.int4_group], ids=["mxfp4", "nvfp4", "int4"])
def test_block_formats_quantize_along_dim(fmt):
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(fmt(x, dim=0), fmt(x.t().contiguous()).t())


def test_hif4_entry_is_the_projects_quantizer():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    assert torch.equal(F.hif4(x), quantize_dequantize(x))


def test_sqnr_is_infinite_for_an_exact_result_and_20db_for_a_tenth_rms_error():
    x = torch.ones(100, dtype=torch.float64)
    assert F.sqnr_db(x, x) == float("inf")
    assert F.sqnr_db(x, x * 1.1) == pytest.approx(20.0)
