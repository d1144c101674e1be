"""Video comparison metrics (hifloat4/metrics.py) on inputs whose answers are known by hand.

Videos are ComfyUI IMAGE batches [frames, H, W, 3] in 0..1."""
from __future__ import annotations

import math

import pytest
import torch

from hifloat4 import metrics as M


def video(frames: int = 4, h: int = 24, w: int = 32, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(frames, h, w, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- identical videos ------------------------------------------------------------------

def test_identical_videos_have_infinite_psnr_per_frame_and_overall():
    a = video()
    assert torch.all(torch.isinf(M.psnr(a, a.clone())))
    assert M.video_psnr(a, a.clone()) == math.inf


def test_identical_videos_have_ssim_exactly_one():
    a = video()
    assert torch.allclose(M.ssim(a, a.clone()), torch.ones(4, dtype=torch.float64), atol=1e-12)


def test_identical_videos_have_zero_flicker():
    a = video()
    assert torch.equal(M.flicker(a, a.clone()), torch.zeros(3, dtype=torch.float64))


# --- PSNR --------------------------------------------------------------------------------

def test_constant_offset_of_a_tenth_gives_20_db():
    a = video() * 0.9
    assert M.psnr(a, a + 0.1) == pytest.approx(torch.full((4,), 20.0, dtype=torch.float64), abs=1e-9)
    assert M.video_psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-9)


def test_half_the_pixels_off_by_0_2_gives_10_log10_50_db():
    a = video() * 0.5
    b = a.clone()
    b[:, :, ::2] += 0.2  # every other column (w = 32): half the values, MSE = 0.5 * 0.04 = 0.02
    assert M.video_psnr(a, b) == pytest.approx(10 * math.log10(50), abs=1e-9)


def test_video_psnr_comes_from_the_whole_video_mse_not_the_mean_of_frame_psnrs():
    a = video(frames=2) * 0.5
    b = a.clone()
    b[1] += 0.1  # frame 0 exact (inf dB), frame 1 20 dB, video MSE 0.005 -> 23.01 dB
    assert M.psnr(a, b).tolist() == [math.inf, pytest.approx(20.0, abs=1e-9)]
    assert M.video_psnr(a, b) == pytest.approx(10 * math.log10(200), abs=1e-9)


def test_data_range_scales_psnr_like_255_images():
    a = video() * 0.9
    assert M.video_psnr(a * 255, (a + 0.1) * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)


# --- SSIM --------------------------------------------------------------------------------

def test_ssim_is_symmetric_and_below_one_for_noise():
    a = video()
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=a.dtype)).clamp(0, 1)
    s_ab, s_ba = M.ssim(a, b), M.ssim(b, a)
    assert torch.allclose(s_ab, s_ba, atol=1e-12)
    assert torch.all(s_ab < 0.999) and torch.all(s_ab > 0)


def test_ssim_falls_as_noise_grows():
    a = video()
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(2), dtype=a.dtype)
    s = [float(M.ssim(a, a + sigma * noise).mean()) for sigma in (0.01, 0.05, 0.2)]
    assert s[0] > s[1] > s[2]


def test_ssim_sees_only_luma_so_a_luma_preserving_colour_change_scores_one():
    a = video() * 0.5 + 0.25
    d = torch.tensor([0.587, -0.299, 0.0], dtype=torch.float64)  # 0.299*0.587 - 0.587*0.299 = 0
    b = a + 0.1 * d
    assert torch.allclose(M.ssim(a, b), torch.ones(4, dtype=torch.float64), atol=1e-12)
    assert torch.all(M.psnr(a, b) < 100)  # while PSNR (RGB) sees the change


def test_ssim_of_a_contrast_change_matches_the_closed_form_on_flat_regions():
    # two constant frames: sigma = 0, so SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)
    a, b = torch.full((1, 16, 16, 3), 0.5, dtype=torch.float64), torch.full((1, 16, 16, 3), 0.4, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.4 + c1) / (0.25 + 0.16 + c1)
    assert M.ssim(a, b).item() == pytest.approx(expected, abs=1e-12)


def test_ssim_works_on_frames_smaller_than_the_11_pixel_window():
    a = video(h=5, w=6)
    assert torch.allclose(M.ssim(a, a), torch.ones(4, dtype=torch.float64), atol=1e-12)


# --- flicker -----------------------------------------------------------------------------

def test_a_static_error_is_not_flicker():
    a = video() * 0.8
    b = a + 0.1 * torch.rand(a.shape[1:], generator=torch.Generator().manual_seed(3), dtype=a.dtype)
    assert torch.allclose(M.flicker(a, b), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_an_error_alternating_plus_minus_a_tenth_flickers_by_0_2_per_transition():
    a = video() * 0.8 + 0.1
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(4, 1, 1, 1)
    b = a + 0.1 * sign  # luma of an equal RGB offset is the offset (weights sum to 1)
    assert torch.allclose(M.flicker(a, b), torch.full((3,), 0.2, dtype=torch.float64), atol=1e-12)
    assert M.video_flicker(a, b) == pytest.approx(0.2, abs=1e-12)


def test_flicker_has_one_value_per_transition_and_is_zero_for_a_single_frame():
    a = video(frames=5)
    assert M.flicker(a, a * 0.9).shape == (4,)
    one = video(frames=1)
    assert M.flicker(one, one * 0.9).numel() == 0 and M.video_flicker(one, one * 0.9) == 0.0


# --- inputs and the summary ---------------------------------------------------------------

def test_videos_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(video(frames=4), video(frames=3))


def test_a_single_hwc_frame_is_a_one_frame_video():
    a = video(frames=1)[0]
    assert M.psnr(a, a * 0.9).shape == (1,)


def test_non_float_or_wrong_layout_inputs_are_refused():
    with pytest.raises(TypeError):
        M.psnr(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError):
        M.psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))  # channels-first is not an IMAGE


def test_compare_videos_agrees_with_the_single_metrics():
    a = video(dtype=torch.float32)
    b = (a + 0.03 * torch.randn(a.shape, generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    r = M.compare_videos(a, b)
    assert r["frames"] == 4
    assert r["psnr"] == pytest.approx(M.psnr(a, b).tolist())
    assert r["ssim"] == pytest.approx(M.ssim(a, b).tolist())
    assert r["flicker"] == pytest.approx(M.flicker(a, b).tolist())
    assert r["psnr_db"] == pytest.approx(M.video_psnr(a, b))
    assert r["ssim_min"] == min(r["ssim"]) and r["flicker_mean"] == pytest.approx(sum(r["flicker"]) / 3)
