"""Video comparison metrics: PSNR, SSIM and a temporal-flicker score, pure torch.

Videos are ComfyUI IMAGE batches: float tensors [frames, H, W, C] with values in
0..1 (C = 3, RGB; C = 1 is taken as luma already; a single frame [H, W, C] is a
one-frame video). `a` is the reference (e.g. the bf16 model's frames), `b` the
video under test (e.g. the W4A4 frames); all metrics are computed in float64, one frame at a time.

* `psnr(a, b)` per frame: 10 log10(data_range^2 / MSE) over all pixels and
  channels of the frame; +inf for identical frames. `video_psnr` uses the MSE of
  the whole video (not the mean of per-frame PSNRs).
* `ssim(a, b)` per frame: the mean SSIM of Wang, Bovik, Sheikh & Simoncelli
  (IEEE TIP 2004) on luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601), with an
  11 x 11 Gaussian window of sigma 1.5 (normalized), K1 = 0.01, K2 = 0.03,
  L = data_range, population (biased) local statistics, over the 'valid' window
  positions (no padding). Frames smaller than 11 pixels use the largest odd window
  that fits. Symmetric in a and b; 1 for identical frames.
* `flicker(a, b)` per frame transition t -> t+1: mean over pixels of
  |(Y_b[t+1] - Y_b[t]) - (Y_a[t+1] - Y_a[t])| on luma, in the units of the input
  (0..1); equivalently the mean absolute change of the error image Y_b - Y_a from
  one frame to the next. It is 0 when b changes from frame to frame exactly as a
  does - so a static error (a constant offset, a fixed pattern) is not flicker -
  and grows when the error itself changes over time, which is what a viewer sees
  as flicker. A video of F frames has F - 1 values; `video_flicker` is their mean
  (0 for F = 1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

LUMA_BT601 = (0.299, 0.587, 0.114)
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5


def as_video(x: Tensor, name: str = "video") -> Tensor:
    """Validate an IMAGE batch [F, H, W, C] (or one [H, W, C] frame, given a frame axis).

    Returned as is (any float dtype and device): metrics upcast one frame at a time,
    so an 81-frame 720p video never gets a float64 copy of its own.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name} must be [frames, H, W, C] with C in (1, 3, 4), got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor in 0..1, got {x.dtype}")
    return x.detach()


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    va, vb = as_video(a, "a"), as_video(b, "b")
    if va.shape != vb.shape:
        raise ValueError(f"videos differ in shape: a {tuple(va.shape)} vs b {tuple(vb.shape)} "
                         f"([frames, H, W, C]); resize or trim them to match")
    return va, vb


def _frame(v: Tensor, t: int) -> Tensor:
    return v[t].to("cpu", torch.float64)


def luma(frame: Tensor) -> Tensor:
    """[..., H, W] BT.601 luma of [..., H, W, C] (C = 1: the channel itself; alpha ignored)."""
    if frame.shape[-1] == 1:
        return frame[..., 0]
    w = torch.tensor(LUMA_BT601, dtype=frame.dtype, device=frame.device)
    return frame[..., :3] @ w


def psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-frame PSNR in dB, shape (F,) float64; +inf where the frames are identical."""
    va, vb = _pair(a, b)
    mse = torch.tensor([float((_frame(va, t) - _frame(vb, t)).square().mean()) for t in range(va.shape[0])],
                       dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse == 0 -> +inf


def video_psnr(a: Tensor, b: Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of the whole video (MSE over every pixel of every frame)."""
    va, vb = _pair(a, b)
    mse = sum(float((_frame(va, t) - _frame(vb, t)).square().mean()) for t in range(va.shape[0])) / va.shape[0]
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Normalized 1-D Gaussian (size,) float64; the 2-D window is its outer product."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _blur_valid(x: Tensor, taps: list[float], dim: int) -> Tensor:
    """'valid' 1-D correlation of x with `taps` along dim, as a sum of shifted slices
    (several times faster than conv2d with a thin kernel on CPU)."""
    n = x.shape[dim] - len(taps) + 1
    out = x.narrow(dim, 0, n) * taps[0]
    for i, w in enumerate(taps[1:], start=1):
        out.add_(x.narrow(dim, i, n), alpha=w)
    return out


def _ssim_frame(ya: Tensor, yb: Tensor, data_range: float) -> Tensor:
    """Local SSIM [H', W'] of two luma frames [H, W] (float64), 'valid' positions."""
    size = min(SSIM_WINDOW, ya.shape[-2], ya.shape[-1])
    size -= 1 - size % 2  # largest odd size that fits
    g = gaussian_window(size, SSIM_SIGMA).tolist()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    x = torch.stack([ya, yb, ya * ya, yb * yb, ya * yb])  # [5, H, W]
    mu_a, mu_b, e_aa, e_bb, e_ab = _blur_valid(_blur_valid(x, g, -2), g, -1)  # separable Gaussian
    var_a, var_b, cov = e_aa - mu_a**2, e_bb - mu_b**2, e_ab - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return num / den


def ssim(a: Tensor, b: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-frame mean SSIM of luma, shape (F,) float64 (1 for identical frames)."""
    va, vb = _pair(a, b)
    return torch.tensor([float(_ssim_frame(luma(_frame(va, t)), luma(_frame(vb, t)), data_range).mean())
                         for t in range(va.shape[0])], dtype=torch.float64)


def flicker(a: Tensor, b: Tensor) -> Tensor:
    """Per-transition flicker (F - 1,) float64: mean |Δ_t Y_b - Δ_t Y_a| (see the module doc)."""
    va, vb = _pair(a, b)
    out = []
    prev = luma(_frame(vb, 0)) - luma(_frame(va, 0))  # the error image; flicker = |change of the error|
    for t in range(1, va.shape[0]):
        err = luma(_frame(vb, t)) - luma(_frame(va, t))
        out.append(float((err - prev).abs().mean()))
        prev = err
    return torch.tensor(out, dtype=torch.float64)


def video_flicker(a: Tensor, b: Tensor) -> float:
    """Mean flicker over all transitions (0.0 for a one-frame video)."""
    f = flicker(a, b)
    return float(f.mean()) if f.numel() else 0.0


def compare_videos(a: Tensor, b: Tensor, data_range: float = 1.0) -> dict:
    """Every metric per frame and overall in one pass over the frames, as plain numbers.

    Keys: frames, psnr (list, dB), ssim (list), flicker (list of F - 1, transition
    t -> t+1 at index t), and overall: psnr_db (whole-video MSE), psnr_min_db and
    ssim_min (the worst frame), ssim_mean, flicker_mean. PSNR values may be inf.
    """
    va, vb = _pair(a, b)
    mses, ssims, flick = [], [], []
    prev = None
    for t in range(va.shape[0]):
        fa, fb = _frame(va, t), _frame(vb, t)
        mses.append(float((fa - fb).square().mean()))
        ya, yb = luma(fa), luma(fb)
        ssims.append(float(_ssim_frame(ya, yb, data_range).mean()))
        err = yb - ya
        if prev is not None:
            flick.append(float((err - prev).abs().mean()))
        prev = err
    psnrs = [math.inf if m == 0.0 else 10.0 * math.log10(data_range**2 / m) for m in mses]
    mse = sum(mses) / len(mses)
    return {
        "frames": len(mses),
        "psnr": psnrs,
        "ssim": ssims,
        "flicker": flick,
        "psnr_db": math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse),
        "psnr_min_db": min(psnrs),
        "ssim_mean": sum(ssims) / len(ssims),
        "ssim_min": min(ssims),
        "flicker_mean": sum(flick) / len(flick) if flick else 0.0,
    }
