"""The GPU formulation of the Triton quantizer (round-toward-zero float decisions), proven on
the CPU through a numpy emulation of its operations (tests/rz_emulation.py), bit for bit
against the reference vectors and the torch implementation."""
from __future__ import annotations

import hif4_reference
import numpy as np
import pytest
import rz_emulation as rz
import torch

from hifloat4 import torch_kernels
from hifloat4.spec import scale_table


@pytest.fixture(scope="module")
def vector_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {n: hif4_reference.vector(n) for n in hif4_reference.vector_cases()}


def torch_groups(v: np.ndarray) -> np.ndarray:
    g = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).reshape(-1, 64)
    out = torch.empty_like(g)
    torch_kernels.quantize_groups(g, out)
    return out.numpy()


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    same = (got.view(np.int32) == want.view(np.int32)) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{bad.size} mismatches, first at {bad[0]}: {got.flat[bad[0]]!r} != {want.flat[bad[0]]!r}"


def test_the_scale_formula_is_the_scale_table_at_every_threshold():
    thresholds, scales, recips = scale_table()
    bits = thresholds.view(torch.int32).numpy().astype(np.int64)
    idx, s_bits, r_bits = rz.group_scale_bits(bits)
    assert np.array_equal(idx, np.arange(255))
    assert np.array_equal(s_bits, scales.view(torch.int32).numpy())
    assert np.array_equal(r_bits, recips.view(torch.int32).numpy())
    below, _, _ = rz.group_scale_bits(bits[1:] - 1)  # one float below each threshold: the scale before
    assert np.array_equal(below, np.arange(254))


def test_the_scale_formula_is_the_table_lookup_on_random_maxima():
    thresholds, _, _ = scale_table()
    bits = np.random.default_rng(0).integers(0, 0x7F800000, 1_000_000)
    want = torch.bucketize(torch.from_numpy(bits.astype(np.int32)).view(torch.float32), thresholds, right=True) - 1
    assert np.array_equal(rz.group_scale_bits(bits)[0], want.numpy())


def test_round_toward_zero_ops_round_toward_zero():
    up = np.nextafter(np.float32(1), np.float32(2))  # 1 + 2^-23: 1.5 * up = 1.5 + 1.5 ulp, nearest would give + 2 ulp
    assert rz.mul_rz(np.float32(1.5), up) == np.nextafter(np.float32(1.5), np.float32(2))
    assert rz.add_rz(np.float32(2.0**23), np.float32(0.75)) == np.float32(2.0**23)
    assert rz.fma_rz(np.float32(1.5), np.float32(1.0), np.float32(-2.0**-40)) == np.nextafter(np.float32(1.5), 0)
    assert rz.mul_rz(np.float32(2.0**-120), np.float32(2.0**-10)) == 0  # flushed


def test_emulated_gpu_formulation_matches_the_reference_vectors(vector_cases):
    for name, (x, expected) in vector_cases.items():
        k = x.shape[-1]
        v = np.pad(x, ((0, 0), (0, (-k) % 64))).reshape(-1, 64)
        got = rz.quantize_groups(v).reshape(x.shape[0], -1)[:, :k]
        assert_same_bits(got, expected), name


def _hard(n: int, seed: int) -> np.ndarray:
    """Every kind of value a decision can go wrong on, in float32 groups of 64."""
    rng = np.random.default_rng(seed)
    e = rng.integers(-140, 120, (n, 8)).repeat(8, axis=1)
    x = (rng.standard_normal((n, 64)) * np.exp2(e.astype(np.float64))).astype(np.float32)
    ties = n // 4  # half-integer multiples of a code step, and one ulp either side
    steps = np.exp2(rng.integers(-60, 12, (ties, 1)).astype(np.float64))
    half = (rng.integers(0, 16, (ties, 64)) + 0.5) * steps
    x[:ties] = half.astype(np.float32)
    x[ties : 2 * ties] = np.nextafter(half.astype(np.float32), np.float32(np.inf)) * rng.choice([-1, 1], (ties, 64))
    x[2 * ties : 2 * ties + ties // 2] = np.nextafter(half[: ties // 2].astype(np.float32), np.float32(0))
    x[-1, ::7] = np.nan
    x[-2, ::9] = np.inf
    x[-3, ::5] = -np.inf
    x[-4] *= np.float32(1e30)  # saturating
    x[-5] = np.float32(2.0**-149) * rng.integers(-50, 50, 64)  # subnormals
    return x


@pytest.mark.parametrize("seed", range(4))
def test_emulated_gpu_formulation_matches_the_torch_path_on_hard_inputs(seed):
    v = _hard(4096, seed)
    assert_same_bits(rz.quantize_groups(v), torch_groups(v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_gpu_formulation_matches_the_torch_path_on_half_inputs(dtype):
    v = torch.from_numpy(_hard(2048, 7)).to(dtype).float().numpy()
    assert_same_bits(rz.quantize_groups(v), torch_groups(v))
