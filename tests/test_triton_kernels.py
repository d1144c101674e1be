"""The fused Triton kernels give the same bits as the torch/C++ implementations.

Without CUDA they run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
whose arithmetic differs from a GPU compile; the kernels are written so that both give
these bits (see hifloat4/triton_kernels.py). With CUDA the same tests run the GPU
compile. Sizes stay small: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch
import triton
from hif4_reference import vector, vector_cases

from hifloat4 import pack, triton_kernels
from hifloat4.layout import from_planar, to_planar
from hifloat4.format import quantize_dequantize
from hifloat4.spec import BYTES_PER_GROUP, scale_table
from hifloat4.torch_kernels import unpack_groups

FP16_MAX = 65504.0
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HALF_DTYPES = [torch.bfloat16, torch.float16]
_INT_VIEW = {4: torch.int32, 2: torch.int16, 1: torch.uint8}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


def quantize_rows(x, mask=None, *, scale=None, **kwargs) -> torch.Tensor:
    """triton_kernels.quantize_rows run on DEVICE, the result back on the CPU."""
    return triton_kernels.quantize_rows(_on_device(x), _on_device(mask), scale=_on_device(scale), **kwargs).cpu()


def decode_groups(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """triton_kernels.decode_groups run on DEVICE into a new (n, 64) tensor, back on the CPU."""
    out = torch.empty(data.shape[0], 64, dtype=dtype, device=DEVICE)
    triton_kernels.decode_groups(data.to(DEVICE), out)
    return out.cpu()


def to_out_dtype(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cast quantize_rows promises: fp16 saturates finite values, keeps NaN/Inf."""
    if dtype == torch.float16:
        q = torch.where(q.isfinite(), q.clamp(-FP16_MAX, FP16_MAX), q)
    return q.to(dtype)


def reference(x, mask=None, divide=False, scale=None, out_dtype=None) -> torch.Tensor:
    """The specification of quantize_rows, in torch."""
    v = x.float()
    if scale is not None:
        v = v * scale
    if mask is not None:
        v = v / mask if divide else v * mask
    return to_out_dtype(quantize_dequantize(v, dim=-1), out_dtype or x.dtype)


def assert_bits_equal(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, same bit pattern everywhere, NaN matching any NaN."""
    assert out.dtype == expected.dtype and out.shape == expected.shape
    ints = _INT_VIEW[out.element_size()]
    same = (out.contiguous().view(ints) == expected.contiguous().view(ints)) | (out.isnan() & expected.isnan())
    bad = (~same).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} mismatches, first at {bad[0].tolist()}: " \
        f"{out[tuple(bad[0])].item()!r} != {expected[tuple(bad[0])].item()!r}"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def wide_range(rows: int, k: int, seed: int, lo: int = -40, hi: int = 20) -> torch.Tensor:
    """float32 normals times 2^e, e uniform per 8 values in [lo, hi): every scale, mixed groups."""
    g = gen(seed)
    e = torch.randint(lo, hi, (rows, (k + 7) // 8), generator=g).repeat_interleave(8, dim=1)[:, :k]
    return torch.randn(rows, k, generator=g) * torch.exp2(e.float())


def tie_heavy(rows: int, k: int, seed: int) -> torch.Tensor:
    """Values exactly on code and level-bit thresholds, and one float32 ulp either side.

    Each group's max is 7 * 2^e, so S = 2^e and R = 2^-e exactly: (n + 1/2) * 2^(d-2) * 2^e
    is a code tie for d = 0, 1, 2; 2 * 2^e and 4 * 2^e are the level-bit thresholds.
    """
    g = gen(seed)
    e = torch.randint(-46, 12, (rows, (k + 63) // 64), generator=g).repeat_interleave(64, dim=1)[:, :k].float()
    n = torch.randint(0, 8, (rows, k), generator=g).float()
    d = torch.randint(0, 3, (rows, k), generator=g).float()
    ties = (n + 0.5) * torch.exp2(d - 2)
    levels = torch.tensor([2.0, 4.0])[torch.randint(0, 2, (rows, k), generator=g)]
    v = torch.where(torch.rand(rows, k, generator=g) < 0.25, levels, ties) * torch.exp2(e)
    ulp = torch.randint(-1, 2, (rows, k), generator=g, dtype=torch.int32)  # -1, 0, +1 ulp
    v = (v.view(torch.int32) + ulp).view(torch.float32)
    v[:, ::64] = 7.0 * torch.exp2(e[:, ::64])  # each group's max
    sign = torch.where(torch.rand(rows, k, generator=g) < 0.5, -1.0, 1.0)
    return v * sign


def scale_thresholds(rows: int, k: int, seed: int) -> torch.Tensor:
    """Each group's max exactly on an E6M2 scale threshold or one ulp below/above it."""
    g = gen(seed)
    thresholds = scale_table()[0][1:]
    picks = thresholds[torch.randint(0, len(thresholds), (rows, k), generator=g)]
    ulp = torch.randint(-1, 2, (rows, k), generator=g, dtype=torch.int32)
    v = (picks.view(torch.int32) + ulp).view(torch.float32)
    v = v * torch.exp2(-torch.randint(1, 8, (rows, k), generator=g).float())  # below the max...
    v[:, ::64] = (picks[:, ::64].view(torch.int32) + ulp[:, ::64]).view(torch.float32)  # ...but the first
    return v


def with_nonfinite(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = gen(seed)
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    pick = torch.rand(x.shape, generator=g)
    return torch.where(pick < 0.03, special[torch.randint(0, 3, x.shape, generator=g)], x)


# --- conformance -------------------------------------------------------------------

def _vector(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, expected = vector(case)
    k = x.shape[-1]
    return torch.from_numpy(x).reshape(-1, k), torch.from_numpy(expected).reshape(-1, k)


@pytest.mark.parametrize("case", vector_cases())
def test_reference_vector_matches_bit_for_bit(case):
    x, expected = _vector(case)
    assert_bits_equal(quantize_rows(x), expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_reference_vector_rows_match_in_half_precision_where_representable(dtype):
    rows = 0
    for case in vector_cases():
        x, expected = _vector(case)
        keep = ((x.to(dtype).float() == x) | x.isnan()).all(dim=1)  # rows are quantized independently
        if keep.any():
            assert_bits_equal(quantize_rows(x[keep].to(dtype)), to_out_dtype(expected[keep], dtype))
            rows += int(keep.sum())
    assert rows >= 4


# --- against the torch implementation ----------------------------------------------

@pytest.mark.parametrize("k", [64, 100, 4128])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_random_rows_match_torch(dtype, k):
    x = wide_range(3, k, seed=k).to(dtype)
    assert_bits_equal(quantize_rows(x), reference(x))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_float32_rows_written_in_any_out_dtype_match_torch(out_dtype):
    x = wide_range(4, 256, seed=1)
    assert_bits_equal(quantize_rows(x, out_dtype=out_dtype), reference(x, out_dtype=out_dtype))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_values_on_code_and_level_thresholds_match_torch(dtype):
    x = tie_heavy(8, 512, seed=2).to(dtype)
    assert_bits_equal(quantize_rows(x), reference(x))


def test_group_maxima_on_scale_thresholds_match_torch():
    x = scale_thresholds(8, 256, seed=3)
    assert_bits_equal(quantize_rows(x), reference(x))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES])
def test_nan_and_inf_are_kept_and_their_groups_match_torch(dtype, out_dtype):
    x = with_nonfinite(wide_range(4, 192, seed=4, lo=-10, hi=10), seed=5).to(dtype)
    assert_bits_equal(quantize_rows(x, out_dtype=out_dtype), reference(x, out_dtype=out_dtype))


def test_float32_subnormal_inputs_match_torch():
    x = wide_range(4, 256, seed=6, lo=-149, hi=-120)
    x[:, 64:128] *= 2.0**100  # a group mixing subnormal and normal values
    assert torch.count_nonzero((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)) > 100
    assert_bits_equal(quantize_rows(x), reference(x))


def test_float16_subnormal_inputs_match_torch():
    x = wide_range(4, 256, seed=7, lo=-26, hi=-12).half()
    assert torch.count_nonzero((x != 0) & (x.abs() < torch.finfo(torch.float16).tiny)) > 100
    assert_bits_equal(quantize_rows(x), reference(x))


def test_float16_output_rounds_subnormal_results_half_even():
    # float32 values whose HiF4 values fall below fp16's normal range: the store rounds
    x = torch.cat([wide_range(4, 256, seed=8, lo=-32, hi=-12), tie_heavy(4, 256, seed=9).abs() * 2.0**-28])
    out = quantize_rows(x, out_dtype=torch.float16)
    q = quantize_dequantize(x)
    assert bool(((q != 0) & (q.abs() < 2.0**-14) & (q.half().float() != q)).any())  # rounding happens
    assert_bits_equal(out, reference(x, out_dtype=torch.float16))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_values_beyond_the_largest_hif4_value_saturate_like_torch(out_dtype):
    x = wide_range(4, 128, seed=10, lo=14, hi=24)
    x[0, :64] = torch.linspace(-1e6, 1e6, 64)  # one group beyond 7 * 49152 = 344064
    out = quantize_rows(x, out_dtype=out_dtype)
    assert out.float().abs().max() == (FP16_MAX if out_dtype == torch.float16 else 344064.0)
    assert_bits_equal(out, reference(x, out_dtype=out_dtype))


# --- mask, scale, fp8 and layout ---------------------------------------------------

@pytest.mark.parametrize("divide", [False, True], ids=["multiply", "divide"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_mask_is_applied_before_quantizing(dtype, divide):
    # x = t * m (or t / m) for thresholds t: x / m (x * m) lands on or next to t, where
    # one ulp of error in the division or product changes the quantized value
    k = 100
    mask = torch.exp(torch.randn(k, generator=gen(13)) * 2)
    t = torch.cat([wide_range(3, k, seed=11, lo=-8, hi=8), tie_heavy(5, k, seed=12)]).double()
    x = (t * mask.double() if divide else t / mask.double()).to(dtype)
    out = quantize_rows(x, mask, divide=divide)
    assert_bits_equal(out, reference(x, mask, divide=divide))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns on x / 0
def test_division_by_a_zero_mask_gives_the_same_nonfinite_values():
    x = wide_range(2, 64, seed=14, lo=-4, hi=4)
    x[0, 0] = 0.0
    mask = torch.rand(64, generator=gen(15)) + 0.5
    mask[:2] = 0.0
    assert_bits_equal(quantize_rows(x, mask, divide=True), reference(x, mask, divide=True))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns on Inf/NaN arithmetic
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_input_with_scale_and_mask(fp8, out_dtype):
    x = torch.arange(256, dtype=torch.uint8).repeat(2)[torch.randperm(512, generator=gen(16))].view(fp8).view(4, 128)
    scale = torch.tensor([0.0123], dtype=torch.float32)
    mask = torch.exp(torch.randn(128, generator=gen(17)))
    out = quantize_rows(x, mask, divide=True, scale=scale, out_dtype=out_dtype)
    assert_bits_equal(out, reference(x, mask, divide=True, scale=scale, out_dtype=out_dtype))


def test_fp8_input_with_scale_only():
    x = torch.randn(2, 192, generator=gen(18)).mul(30).to(torch.float8_e4m3fn)
    scale = torch.tensor([3.0e-3])
    out = quantize_rows(x, scale=scale, out_dtype=torch.bfloat16)
    assert_bits_equal(out, reference(x, scale=scale, out_dtype=torch.bfloat16))


def test_fp8_input_needs_an_out_dtype():
    with pytest.raises(ValueError, match="out_dtype"):
        triton_kernels.quantize_rows(torch.zeros(1, 64, dtype=torch.float8_e4m3fn))


def test_strided_rows_are_read_and_written_in_place():
    big = wide_range(4, 300, seed=19).bfloat16().to(DEVICE)
    x = big[:, 20:120]  # row stride 300
    out_big = torch.full((4, 160), 7.0, dtype=torch.bfloat16, device=DEVICE)
    out = out_big[:, 30:130]
    assert triton_kernels.quantize_rows(x, out=out) is out
    assert_bits_equal(out.cpu(), reference(x.cpu()))
    assert bool((out_big[:, :30] == 7.0).all() & (out_big[:, 130:] == 7.0).all())  # nothing outside


# --- packed decode -----------------------------------------------------------------

def _unpack_torch(data: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(data.shape[0], 64, dtype=dtype)
    unpack_groups(data, out)
    return out


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_decode_of_packed_random_data_matches_unpack(dtype):
    x = torch.cat([wide_range(3, 640, seed=20), tie_heavy(1, 640, seed=21)])
    data = pack(x).data.reshape(-1, BYTES_PER_GROUP)
    assert_bits_equal(decode_groups(data, dtype), _unpack_torch(data, dtype))


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_decode_of_arbitrary_bytes_matches_unpack(dtype):
    # every scale byte (the reserved NaN code too), fp16 saturation and subnormals
    data = torch.randint(0, 256, (256, BYTES_PER_GROUP), dtype=torch.uint8, generator=gen(22))
    data[:, 32] = torch.arange(256, dtype=torch.uint8)
    assert_bits_equal(decode_groups(data, dtype), _unpack_torch(data, dtype))


def test_decode_reads_and_writes_strided_rows():
    data_big = torch.randint(0, 256, (40, 50), dtype=torch.uint8, generator=gen(23))
    data = data_big.to(DEVICE)[:, 3 : 3 + BYTES_PER_GROUP]
    out_big = torch.zeros(40, 80, dtype=torch.bfloat16, device=DEVICE)
    triton_kernels.decode_groups(data, out_big[:, 8:72])
    assert_bits_equal(out_big[:, 8:72].cpu(), _unpack_torch(data.cpu().contiguous(), torch.bfloat16))
    assert bool((out_big[:, :8] == 0).all() & (out_big[:, 72:] == 0).all())


# --- planar packed rows -------------------------------------------------------------

@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_decode_of_planar_rows_matches_unpack(dtype):
    w = torch.cat([wide_range(5, 200, seed=30), tie_heavy(3, 200, seed=31)])  # K = 200: a padded last group
    packed = pack(w).data
    out = torch.empty(8, 200, dtype=dtype, device=DEVICE)
    triton_kernels.decode_rows(to_planar(packed).to(DEVICE), out)
    want = _unpack_torch(packed.reshape(-1, BYTES_PER_GROUP), dtype).view(8, -1)[:, :200]
    assert_bits_equal(out.cpu(), want)


def test_decode_of_planar_rows_refuses_a_width_that_is_not_k():
    planar = torch.zeros(2, 2 * BYTES_PER_GROUP, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="planar"):
        triton_kernels.decode_rows(planar, torch.empty(2, 200, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_pack_rows_writes_the_planar_bytes_of_pack(dtype):
    w = torch.cat([wide_range(6, 200, seed=42, lo=-8, hi=4), tie_heavy(2, 200, seed=43)])
    w = w.clamp(-448, 448).to(dtype)  # within fp8 e4m3's range (beyond it the cast gives NaN in some torch versions)
    mask = torch.exp(torch.randn(200, generator=gen(44)))
    scale = torch.tensor([0.37])
    planar, flag = triton_kernels.pack_rows(w.to(DEVICE), mask.to(DEVICE), divide=True, scale=scale.to(DEVICE))
    want = to_planar(pack(w.float() * scale / mask).data)
    assert int(flag) == 0 and torch.equal(planar.cpu(), want)


def test_pack_rows_raises_its_flag_on_nan():
    w = wide_range(3, 128, seed=45)
    w[2, 5] = float("nan")
    _, flag = triton_kernels.pack_rows(w.to(DEVICE))
    assert int(flag) == 1


def test_planar_rows_round_trip_to_packed_rows():
    data = torch.randint(0, 256, (3, 5, BYTES_PER_GROUP), dtype=torch.uint8, generator=gen(32))
    assert torch.equal(from_planar(to_planar(data)), data)


# --- HiF4 x HiF4 on int8 tensor cores ----------------------------------------------

def encode_int8(x, mask=None, **kwargs):
    codes, quarter = triton_kernels.encode_int8_rows(x.to(DEVICE), _on_device(mask), **kwargs)
    return codes.cpu(), quarter.cpu()


def int8_values(codes: torch.Tensor, quarter: torch.Tensor, k: int) -> torch.Tensor:
    """The HiF4 values an int8 operand stands for: code * S/4 (exact in float32)."""
    return (codes.float().view(codes.shape[0], -1, 64) * quarter.T[:, :, None]).view(codes.shape[0], -1)[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_codes_times_quarter_scales_are_the_hif4_values(dtype):
    x = torch.cat([wide_range(6, 200, seed=33, lo=-20, hi=10), tie_heavy(4, 200, seed=34)]).to(dtype)
    mask = torch.exp(torch.randn(200, generator=gen(35)))
    codes, quarter = encode_int8(x, mask)
    assert codes.shape == (10, 256) and quarter.shape == (4, 10)
    assert int(codes.abs().max()) <= 28 and bool((codes[:, 200:] == 0).all())
    # equal values (an int8 code has no -0, the only bit pattern that differs)
    assert torch.equal(int8_values(codes, quarter, 200), reference(x, mask, out_dtype=torch.float32))


def test_int8_encoding_of_a_group_with_nan_gives_a_nan_scale_for_that_group_only():
    x = wide_range(2, 128, seed=36)
    x[1, 70] = float("nan")
    _, quarter = encode_int8(x)
    assert quarter[1, 1].isnan() and not quarter[0].isnan().any() and not quarter[1, 0].isnan()


def test_int8_weight_operand_from_planar_rows_equals_the_encoder_output():
    w = wide_range(7, 200, seed=37, lo=-12, hi=0)
    codes, quarter = triton_kernels.int8_rows(to_planar(pack(w).data).to(DEVICE), 200)
    want_codes, want_quarter = encode_int8(w)
    assert torch.equal(codes.cpu(), want_codes) and torch.equal(quarter.cpu(), want_quarter)


@pytest.fixture(scope="module")
def int8_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """(x, w) bf16 with K = 200 (padded last group), M and N not tile multiples."""
    x = torch.cat([wide_range(40, 200, seed=38, lo=-6, hi=6), tie_heavy(30, 200, seed=39)]).bfloat16()
    w = wide_range(90, 200, seed=40, lo=-12, hi=0).bfloat16()
    return x, w


def int8_gemm(x, w, bias=None, out_dtype=torch.float32) -> torch.Tensor:
    a, qa = triton_kernels.encode_int8_rows(x.to(DEVICE))
    b, qb = triton_kernels.encode_int8_rows(w.to(DEVICE))
    return triton_kernels.int8_gemm(a, qa, b, qb, _on_device(bias), out_dtype).cpu()


def _group_terms(x, w) -> torch.Tensor:
    """(G, M, N) float64: each group's exact dot of the HiF4 values."""
    k = x.shape[1]
    qx = torch.nn.functional.pad(quantize_dequantize(x.float()).double(), (0, (-k) % 64)).view(x.shape[0], -1, 64)
    qw = torch.nn.functional.pad(quantize_dequantize(w.float()).double(), (0, (-k) % 64)).view(w.shape[0], -1, 64)
    return torch.einsum("mgk,ngk->gmn", qx, qw)


def test_int8_gemm_sums_exact_group_dots_in_group_order_in_float32(int8_pair):
    x, w = int8_pair
    acc = torch.zeros(x.shape[0], w.shape[0])
    for term in _group_terms(x, w):  # each term is exact in float32: one rounding per group
        assert torch.equal(term.float().double(), term)
        acc = acc + term.float()
    assert_bits_equal(int8_gemm(x, w), acc)


def test_int8_gemm_is_within_float32_summation_error_of_the_float64_product(int8_pair):
    x, w = int8_pair
    terms = _group_terms(x, w)
    out = int8_gemm(x, w).double()
    rel = (out - terms.sum(0)).abs() / terms.abs().sum(0).clamp_min(1e-300)
    assert float(rel.max()) <= 1e-5


def test_int8_gemm_matches_the_simulated_w4a4_product(int8_pair):
    x, w = int8_pair
    simulated = torch.nn.functional.linear(quantize_dequantize(x), quantize_dequantize(w)).float()  # bf16, as w4a4_linear
    out = int8_gemm(x, w, out_dtype=torch.bfloat16).float()
    assert float((out - simulated).norm() / simulated.norm()) <= 1e-3


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_int8_gemm_adds_the_bias_and_rounds_once_to_the_output_dtype(int8_pair, out_dtype):
    x, w = int8_pair
    bias = torch.randn(w.shape[0], generator=gen(41)).bfloat16()
    want = (int8_gemm(x, w) + bias.float())
    want = torch.where(want.isfinite(), want.clamp(-FP16_MAX, FP16_MAX), want) if out_dtype == torch.float16 else want
    assert_bits_equal(int8_gemm(x, w, bias, out_dtype), want.to(out_dtype))


@pytest.mark.parametrize("tile", [(16, 64, 2), (64, 16, 4), (64, 64, 4)])
def test_the_int8_gemm_gives_the_same_bits_with_every_tile(int8_pair, tile):
    """The autotuner picks tiles per GPU and shape: the bits must not depend on them."""
    x, w = int8_pair
    a, qa = triton_kernels.encode_int8_rows(x.to(DEVICE))
    b, qb = triton_kernels.encode_int8_rows(w.to(DEVICE))
    config = triton.Config({"BM": tile[0], "BN": tile[1], "GROUP_M": 2}, num_warps=tile[2], num_stages=1)
    got = triton_kernels.int8_gemm(a, qa, b, qb, None, torch.float32, config=config).cpu()
    assert_bits_equal(got, int8_gemm(x, w))


def test_int8_gemm_refuses_operands_of_different_k(int8_pair):
    x, w = int8_pair
    a, qa = triton_kernels.encode_int8_rows(x.to(DEVICE))
    b, qb = triton_kernels.encode_int8_rows(w[:, :100].to(DEVICE))
    with pytest.raises(ValueError, match="same G"):
        triton_kernels.int8_gemm(a, qa, b, qb)
