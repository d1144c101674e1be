"""LoRA math on packed HiF4 layers (hifloat4.lora): the bypass term and the merge's
dequantize -> add -> re-pack, against direct computations."""
import pytest
import torch
import torch.nn.functional as F

from hifloat4.linear import LayerQuant, prepare_weight, w4a4_linear, w4a4_linear_packed
from hifloat4.format import quantize_dequantize
from hifloat4.lora import LowRank, check_mode, dequantize_packed, lowrank_term
from hifloat4.packed_linear import PackedHiF4Linear, decode_weight, planar_weight
from hifloat4.rotation import Rotation, rotate, unrotate

OUT, IN, RANK = 48, 256, 4


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g) * 0.05
    mask = torch.rand(IN, generator=g) * 3 + 0.25
    return w, mask


def lora(seed=1, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(RANK, IN, generator=g) * 0.1, torch.randn(OUT, RANK, generator=g) * 0.1, scale)


def dense(t: LowRank) -> torch.Tensor:
    return t.scale * (t.up.double() @ t.down.double())


def test_unrotate_inverts_rotate():
    rot = Rotation(block=64, seed=7)
    x = torch.randn(5, IN, dtype=torch.float64)
    assert torch.allclose(unrotate(rotate(x, rot), rot), x, atol=1e-12)
    assert torch.allclose(rotate(unrotate(x, rot), rot), x, atol=1e-12)


def test_lowrank_term_is_x_times_the_scaled_delta():
    t = lora()
    x = torch.randn(3, 7, IN, dtype=torch.float64)
    assert torch.allclose(lowrank_term(x, [t]), x @ dense(t).T, atol=1e-12)


def test_lowrank_terms_stack_as_their_sum():
    a, b = lora(1, 0.5), lora(2, -1.25)
    x = torch.randn(9, IN, dtype=torch.float64)
    assert torch.allclose(lowrank_term(x, [a, b]), x @ (dense(a) + dense(b)).T, atol=1e-12)
    assert lowrank_term(x, []) is None


def test_lowrank_term_runs_in_the_compute_dtype():
    x = torch.randn(4, IN, dtype=torch.float32)
    assert lowrank_term(x, [lora()], torch.bfloat16).dtype == torch.bfloat16


def test_bypass_adds_the_exact_lora_term_to_the_w4a4_output():
    w, mask = weights()
    quant = LayerQuant(mask)
    t = lora()
    x = torch.randn(6, IN)
    planar = planar_weight(w, mask)
    y = w4a4_linear_packed(x, planar, IN, None, quant, "simulate") + lowrank_term(x, [t])
    expected = w4a4_linear(x, prepare_weight(w, mask), None, quant) + F.linear(x, dense(t).float())
    assert torch.allclose(y, expected, atol=1e-5)


def test_dequantize_packed_is_the_quantized_weight_in_real_units():
    w, mask = weights()
    planar = planar_weight(w, mask)
    assert torch.equal(dequantize_packed(planar, IN, mask), prepare_weight(w, mask) * mask)


def test_dequantize_packed_undoes_the_rotation():
    w, mask = weights()
    rot = Rotation(block=64, seed=3)
    planar = planar_weight(w, mask, rot)
    v = decode_weight(planar, IN, torch.float64)
    r = rotate(torch.eye(IN, dtype=torch.float64), rot).T  # rotate(x) = x @ r.T for row vectors
    expected = (v @ r) * mask.double()  # R orthonormal: R^-1(v) = v @ r
    assert torch.allclose(dequantize_packed(planar, IN, mask, rot).double(), expected, atol=1e-6)
    # ... and it is W up to HiF4's error (a mismatched transform would be far off)
    assert (dequantize_packed(planar, IN, mask, rot) - w).norm() < 0.3 * w.norm()
    assert (dequantize_packed(planar, IN, mask) - w).norm() > w.norm()


ROTATIONS = pytest.mark.parametrize("rot", [None, Rotation(block=64, seed=3)], ids=["plain", "rotated"])


@ROTATIONS
def test_merge_packs_the_merged_weight_as_export_packs_a_linear(rot):
    """dequantize -> + dW -> planar_weight holds the codes of packing an nn.Linear whose
    weight is the merged one (what Save HiF4 Model / export write)."""
    w, mask = weights()
    planar = planar_weight(w, mask, rot)
    merged_w = dequantize_packed(planar, IN, mask, rot) + dense(lora()).float()
    linear = torch.nn.Linear(IN, OUT, bias=False)
    linear.weight.data.copy_(merged_w)
    exported = PackedHiF4Linear.from_linear(linear, LayerQuant(mask, rot)).weight
    assert torch.equal(planar_weight(merged_w, mask, rot), exported)
    assert not torch.equal(exported, planar)


def test_re_quantizing_decoded_hif4_values_moves_some_of_them():
    """Why a merge costs one more rounding (documented): HiF4 is not idempotent."""
    w, _ = weights()
    ones = torch.ones(IN)
    v = decode_weight(planar_weight(w, ones), IN, torch.float32)
    assert not torch.equal(quantize_dequantize(v, dim=-1), v)


def test_lora_mode_is_checked():
    assert check_mode("merge") == "merge"
    with pytest.raises(ValueError, match="bypass, merge"):
        check_mode("fuse")
