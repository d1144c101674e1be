"""Part 3: HiF4 against the other 4-bit formats at (nearly) equal bits.

Quantization error (SQNR = signal power / error power, in dB; relative MSE = 10^(-SQNR/10))
of each format of `formats.FORMATS`, blocks along the last axis:
* Gaussian tensors N(0, sigma^2) for sigma = 2^-20 .. 2^15 (one fixed sample, scaled
  by powers of two, so only the format's range and scale handling change);
* real activations: the inputs of every quantized Linear (raw, no smoothing) of the
  tiny Wan pair at its probe steps and of all-MiniLM-L6-v2 on the held-out sentences.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .formats import FORMATS, sqnr_db

LOG2_SCALES = tuple(range(-20, 16))
QUICK_LOG2_SCALES = (-20, -10, 0, 10, 15)


def gaussian_sweep(log2_scales=LOG2_SCALES, rows: int = 256, cols: int = 64 * 16, seed: int = 0) -> dict:
    """{format: [{log2_scale, sqnr_db, rel_mse}]} on one N(0, 1) sample scaled by 2^k."""
    g = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    out: dict[str, list[dict]] = {f.name: [] for f in FORMATS}
    for k in log2_scales:
        x = g * 2.0**k  # exact: a power of two, far from float32's limits
        for f in FORMATS:
            db = sqnr_db(x, f.quantize(x))
            out[f.name].append({"log2_scale": k, "sqnr_db": db, "rel_mse": _rel_mse(db)})
    return out


def _rel_mse(db: float) -> float:
    return 0.0 if math.isinf(db) and db > 0 else (math.nan if math.isnan(db) else 10.0 ** (-db / 10.0))


def activation_sqnr(acts: Mapping[str, Tensor]) -> dict:
    """Per format: mean and min over layers of the per-layer SQNR, the pooled SQNR
    (all layers' signal over all layers' error) and how many layers it is best on."""
    per_layer: dict[str, dict[str, float]] = {f.name: {} for f in FORMATS}
    pooled = {f.name: [0.0, 0.0] for f in FORMATS}
    for name, x in acts.items():
        x = x.float()
        sig = float(x.double().square().sum())
        for f in FORMATS:
            err = float((f.quantize(x).double() - x.double()).square().sum())
            pooled[f.name][0] += sig
            pooled[f.name][1] += err
            per_layer[f.name][name] = math.inf if err == 0 else 10 * math.log10(max(sig, 1e-300) / err)
    best = {f.name: 0 for f in FORMATS}
    for name in acts:
        winner = max(FORMATS, key=lambda f: per_layer[f.name][name])
        best[winner.name] += 1
    out = {}
    for f in FORMATS:
        dbs = list(per_layer[f.name].values())
        s, e = pooled[f.name]
        out[f.name] = {"mean_layer_sqnr_db": sum(dbs) / len(dbs) if dbs else math.nan,
                       "min_layer_sqnr_db": min(dbs) if dbs else math.nan,
                       "pooled_sqnr_db": math.inf if e == 0 else 10 * math.log10(max(s, 1e-300) / e),
                       "layers_best": best[f.name], "layers": len(dbs)}
    return out


def run(activations: Mapping[str, Mapping[str, Tensor]], quick: bool = False) -> dict:
    rows, cols = (64 if quick else 256), 64 * 16
    return {
        "formats": {f.name: {"bits_per_value": f.bits_per_value, "layout": f.note} for f in FORMATS},
        "gaussian_shape": [rows, cols],
        "gaussian": gaussian_sweep(QUICK_LOG2_SCALES if quick else LOG2_SCALES, rows=rows, cols=cols),
        "activations": {src: activation_sqnr(a) for src, a in activations.items() if a},
    }
