"""HiF4CompareVideos: PSNR, SSIM and temporal flicker between two IMAGE batches.

The metric math lives in the core (hifloat4.metrics); this module only formats the
report and draws the plot (PIL, which ComfyUI always ships). It imports nothing from
ComfyUI, so it also loads outside it.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from hifloat4 import metrics

CATEGORY = "hifloat4"
PLOT_WIDTH, PLOT_HEIGHT = 768, 576
PSNR_CAP_DB = 100.0  # identical frames have infinite PSNR; drawn at the cap


def _fmt_db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.2f}"


def format_report(result: dict, label_a: str = "reference", label_b: str = "test") -> str:
    """Plain-text table of compare_videos' result: per frame and overall."""
    lines = [f"Compare videos: {label_b} against {label_a} ({result['frames']} frames)",
             f"{'frame':>5} {'PSNR dB':>9} {'SSIM':>8} {'flicker':>9}"]
    for t in range(result["frames"]):
        fl = "" if t == 0 else f"{result['flicker'][t - 1]:.5f}"
        lines.append(f"{t:>5} {_fmt_db(result['psnr'][t]):>9} {result['ssim'][t]:>8.5f} {fl:>9}")
    lines += [
        (f"overall: PSNR {_fmt_db(result['psnr_db'])} dB (worst frame {_fmt_db(result['psnr_min_db'])} dB), "
        f"SSIM {result['ssim_mean']:.5f} (worst {result['ssim_min']:.5f}), "
        f"flicker {result['flicker_mean']:.5f}"),
        ("PSNR over RGB in 0..1; SSIM: Gaussian 11x11 sigma 1.5 on BT.601 luma; flicker at frame t: mean "
        "|change of the luma error from frame t-1 to t| (0 = the error is static), units of 0..1."),
    ]
    return "\n".join(lines)


def _series_panel(draw, font, box: tuple[int, int, int, int], title: str, values: list[float],
                  first_frame: int, color: tuple[int, int, int]) -> None:
    """One line chart in `box` (x0, y0, x1, y1): axes, min/max labels, frame ticks."""
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill=(20, 20, 20), font=font)
    left, top, right, bottom = x0 + 58, y0 + 16, x1 - 10, y1 - 16
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if not values:
        draw.text((left + 8, (top + bottom) // 2 - 6), "no data (one frame)", fill=(90, 90, 90), font=font)
        return
    vmin, vmax = min(values), max(values)
    lo, hi = (vmin, vmax) if vmax - vmin > 1e-12 else (vmin - 0.5 * (abs(vmin) or 1), vmax + 0.5 * (abs(vmax) or 1))
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = len(values)
    last = first_frame + n - 1

    def px(i: int) -> float:
        return left + (right - left) * (0.5 if n == 1 else i / (n - 1))

    def py(v: float) -> float:
        return bottom - (bottom - top) * (v - lo) / (hi - lo)

    points = [(px(i), py(v)) for i, v in enumerate(values)]
    draw.text((x0, py(vmax) - 6), f"{vmax:.4g}", fill=(60, 60, 60), font=font)  # data max and min, at their height
    if vmax != vmin:
        draw.text((x0, py(vmin) - 6), f"{vmin:.4g}", fill=(60, 60, 60), font=font)
    if n > 1:
        draw.line(points, fill=color, width=2)
    for x, y in points if n <= 64 else []:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
    if n == 1:
        x, y = points[0]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
    draw.text((left, bottom + 2), f"frame {first_frame}", fill=(60, 60, 60), font=font)
    end_label = f"frame {last}"
    draw.text((right - 6 * len(end_label), bottom + 2), end_label, fill=(60, 60, 60), font=font)


def render_plot(result: dict, label_a: str = "reference", label_b: str = "test",
                width: int = PLOT_WIDTH, height: int = PLOT_HEIGHT) -> torch.Tensor:
    """IMAGE [1, height, width, 3] float32 in 0..1: PSNR, SSIM and flicker per frame."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    header = (f"{label_b} vs {label_a}: PSNR {_fmt_db(result['psnr_db'])} dB, SSIM {result['ssim_mean']:.4f}, "
              f"flicker {result['flicker_mean']:.5f}")
    draw.text((8, 6), header, fill=(0, 0, 0), font=font)
    psnr = [PSNR_CAP_DB if math.isinf(v) else v for v in result["psnr"]]
    panel_h = (height - 26) // 3
    panels = [
        ("PSNR (dB, higher is better" + (f"; identical frames drawn at {PSNR_CAP_DB:g}" if
                                         any(math.isinf(v) for v in result["psnr"]) else "") + ")",
         psnr, 0, (31, 119, 180)),
        ("SSIM (luma, 1 = identical)", result["ssim"], 0, (44, 160, 44)),
        ("flicker (mean |change of the luma error| from frame t-1 to t; 0 = static error)",
         result["flicker"], 1, (214, 39, 40)),
    ]
    for k, (title, values, first, color) in enumerate(panels):
        y0 = 26 + k * panel_h
        _series_panel(draw, font, (8, y0, width - 8, y0 + panel_h - 4), title, values, first, color)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).unsqueeze(0)


class HiF4CompareVideos:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images_a": ("IMAGE", {"tooltip": "Reference frames, e.g. decoded from the bf16 model's latent."}),
                "images_b": ("IMAGE", {"tooltip": "Frames to test, e.g. from the HiFloat4 W4A4 model "
                                                  "(same seed, same size and frame count)."}),
            },
            "optional": {
                "label_a": ("STRING", {"default": "bf16", "tooltip": "Name of images_a in the report and plot."}),
                "label_b": ("STRING", {"default": "W4A4", "tooltip": "Name of images_b in the report and plot."}),
            },
        }

    RETURN_TYPES = ("STRING", "IMAGE")
    RETURN_NAMES = ("report", "plot")
    FUNCTION = "compare"
    CATEGORY = CATEGORY
    DESCRIPTION = ("PSNR, SSIM and temporal flicker of two videos (IMAGE batches), per frame and overall: "
                   "a text report and a plot image.")

    def compare(self, images_a, images_b, label_a="bf16", label_b="W4A4"):
        result = metrics.compare_videos(images_a, images_b)
        return format_report(result, label_a, label_b), render_plot(result, label_a, label_b)
