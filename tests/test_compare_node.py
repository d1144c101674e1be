"""The "Compare Videos (HiF4)" node (nodes/compare.py): report text and plot image.
The plot needs PIL, which ComfyUI always ships."""
from __future__ import annotations

import pytest
import torch
from nodes_by_path import load_node_module

compare = load_node_module("compare")


def frames(n=3, h=20, w=28, seed=0):
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


def test_node_declares_two_image_inputs_and_string_plus_image_outputs():
    spec = compare.HiF4CompareVideos.INPUT_TYPES()
    assert spec["required"]["images_a"][0] == "IMAGE" and spec["required"]["images_b"][0] == "IMAGE"
    assert compare.HiF4CompareVideos.RETURN_TYPES == ("STRING", "IMAGE")


def test_report_lists_every_frame_and_the_overall_numbers():
    a = frames()
    text = compare.format_report(compare.metrics.compare_videos(a, a), "bf16", "W4A4")
    assert "W4A4 against bf16 (3 frames)" in text
    assert text.count("inf") >= 4  # three frames and the overall PSNR
    assert "overall: PSNR inf dB" in text and "SSIM 1.00000" in text and "flicker 0.00000" in text


def test_compare_returns_the_report_and_a_plot_image_in_comfy_layout():
    pytest.importorskip("PIL")
    a = frames()
    b = (a + 0.05 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    text, plot = compare.HiF4CompareVideos().compare(a, b)
    assert "PSNR" in text and "flicker" in text
    assert plot.shape == (1, compare.PLOT_HEIGHT, compare.PLOT_WIDTH, 3) and plot.dtype == torch.float32
    assert 0.0 <= plot.min() and plot.max() <= 1.0
    assert (plot < 0.5).any()  # something was drawn on the white canvas


def test_plot_handles_identical_and_single_frame_videos():
    pytest.importorskip("PIL")
    one = frames(n=1)
    plot = compare.render_plot(compare.metrics.compare_videos(one, one))
    assert plot.shape == (1, compare.PLOT_HEIGHT, compare.PLOT_WIDTH, 3)


def test_mismatched_videos_raise_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        compare.HiF4CompareVideos().compare(frames(n=3), frames(n=2))
