"""Specification of hifloat4.rotation: block-diagonal randomized Hadamard along in-features."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hifloat4.rotation as rotation
from hifloat4.rotation import Rotation, fit_block, for_layer, from_setting, hadamard, rotate

# In-features of Wan2.2 Linears (DESIGN.md): A14B dim 5120 and ffn 13824,
# TI2V-5B dim 3072 and ffn 14336, text_dim 4096.
WAN22_IN_FEATURES = [3072, 4096, 5120, 13824, 14336]


def hadamard_by_definition(b: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard from its closed form H[i, j] = (-1)^popcount(i & j) / sqrt(b)."""
    i = torch.arange(b)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1.0 - 2.0 * parity.double()) / b**0.5


def reference_rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """x @ R^T with R = blockdiag(H) diag(s), in float64."""
    k = x.shape[-1]
    y = (x.double() * rot.signs(k).double()).reshape(*x.shape[:-1], k // rot.block, rot.block)
    return (y @ hadamard_by_definition(rot.block).T).reshape(x.shape)


@pytest.mark.parametrize("k", WAN22_IN_FEATURES)
def test_default_block_divides_every_wan22_in_feature_size(k):
    assert Rotation().block == 512 and k % 512 == 0
    Rotation().check(k)  # does not raise


@settings(max_examples=30, deadline=None)
@given(
    log2_block=st.integers(0, 7),
    blocks=st.integers(1, 4),
    tokens=st.integers(1, 8),
    seed=st.integers(0, 2**63 - 1),
)
def test_rotation_cancels_in_the_linear_product(log2_block, blocks, tokens, seed):
    rot = Rotation(block=2**log2_block, seed=seed)
    k = rot.block * blocks
    gen = torch.Generator().manual_seed(seed % 2**32)
    x = torch.randn(tokens, k, generator=gen, dtype=torch.float64)
    w = torch.randn(5, k, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, rot) @ rotate(w, rot).T, x @ w.T)


def test_rotation_is_orthonormal():
    rot = Rotation(block=64, seed=3)
    r = rotate(torch.eye(256, dtype=torch.float64), rot)  # rows: images of the basis vectors
    torch.testing.assert_close(r @ r.T, torch.eye(256, dtype=torch.float64))


def test_rotation_is_signs_then_block_hadamard():
    rot = Rotation(block=128, seed=11)
    x = torch.randn(3, 5, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rotate(x, rot), reference_rotate(x, rot))


def test_fp32_arithmetic_is_accurate_at_the_default_block():
    rot = Rotation()
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rotate(x, rot), reference_rotate(x, rot).float(), rtol=1e-5, atol=1e-5)


def test_output_keeps_the_input_shape_and_dtype():
    x = torch.randn(2, 3, 1024).to(torch.bfloat16)
    y = rotate(x, Rotation())
    assert y.shape == x.shape and y.dtype == torch.bfloat16


def test_bf16_input_is_rotated_in_fp32_and_rounded_once():
    x = torch.randn(6, 1024, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    rot = Rotation(seed=5)
    assert torch.equal(rotate(x, rot), rotate(x.float(), rot).to(torch.bfloat16))


def test_an_outlier_is_spread_evenly_over_its_block_only():
    x = torch.zeros(1, 1024)
    x[0, 3] = 100.0
    y = rotate(x, Rotation(block=512)).abs()[0]
    torch.testing.assert_close(y[:512], torch.full((512,), 100.0 / 512**0.5))
    assert bool((y[512:] == 0).all())


def test_row_chunking_does_not_change_the_result(monkeypatch):
    x = torch.randn(9, 1024, generator=torch.Generator().manual_seed(3))
    whole = rotate(x, Rotation())
    monkeypatch.setattr(rotation, "_CHUNK_ELEMENTS", {"cpu": 2 * 1024, "other": 2 * 1024})
    assert torch.equal(rotate(x, Rotation()), whole)


def test_input_is_left_untouched():
    x = torch.randn(4, 512)
    copy = x.clone()
    rotate(x, Rotation())
    assert torch.equal(x, copy)


def test_signs_are_plus_minus_one_fp32():
    s = Rotation(seed=1).signs(1024)
    assert s.dtype == torch.float32 and set(s.unique().tolist()) == {-1.0, 1.0}


def test_same_rotation_gives_the_same_signs_every_time():
    assert torch.equal(Rotation(block=512, seed=7).signs(5120), Rotation(block=512, seed=7).signs(5120))


def test_different_seeds_give_different_signs():
    assert not torch.equal(Rotation(seed=1).signs(5120), Rotation(seed=2).signs(5120))


def test_signs_are_a_fresh_tensor_on_the_requested_device():
    rot = Rotation(seed=4)
    first = rot.signs(512)
    first.zero_()  # mutating a returned tensor must not corrupt later transforms
    assert not torch.equal(rot.signs(512), first)
    assert rot.signs(512, device="meta").device.type == "meta"


def test_in_features_not_a_multiple_of_the_block_is_a_clear_error():
    with pytest.raises(ValueError, match="K=1000.*block 512"):
        rotate(torch.zeros(2, 1000), Rotation(block=512))


@pytest.mark.parametrize("block", [0, -4, 384, 3, True, 2.0])
def test_block_must_be_a_power_of_two(block):
    with pytest.raises(ValueError, match="power of two"):
        Rotation(block=block)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_seed_must_be_a_non_negative_int(seed):
    with pytest.raises(ValueError, match="seed"):
        Rotation(seed=seed)


def test_rotation_is_a_frozen_value_for_state_metadata():
    rot = Rotation(block=256, seed=9)
    assert dataclasses.asdict(rot) == {"block": 256, "seed": 9}
    assert rot == Rotation(**dataclasses.asdict(rot)) and hash(rot) == hash(Rotation(256, 9))
    with pytest.raises(dataclasses.FrozenInstanceError):
        rot.block = 512  # type: ignore[misc]


def test_rotation_block_is_the_largest_power_of_two_dividing_k():
    assert fit_block(13824, 512) == 512
    assert fit_block(256, 512) == 256
    assert fit_block(100, 512) == 4


def test_for_layer_fits_the_block_to_each_layer_and_keeps_the_seed():
    assert for_layer(Rotation(block=512, seed=3), 384) == Rotation(block=128, seed=3)
    assert for_layer(None, 384) is None


def test_a_hadamard_setting_rounds_its_block_down_to_a_power_of_two():
    assert hadamard(500) == Rotation(block=256, seed=0) and hadamard(512) == Rotation(block=512)
    with pytest.raises(ValueError, match="block"):
        hadamard(0)


def test_a_rotation_setting_is_off_or_a_hadamard_of_the_given_block():
    assert from_setting("off", 512) is None and from_setting("hadamard", 300) == Rotation(block=256)
    with pytest.raises(ValueError, match="off"):
        from_setting("givens", 512)
