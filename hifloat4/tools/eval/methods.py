"""The W4A4 variants the evaluation compares, and how each one's layer map is built.

A method is (statistic, percentile, alpha, rotation). Masks come from the same core
functions the product uses (`masks.make_layer_state`: statistics rounded to their
storage dtypes, mask from `smoothing.channel_mask`, stored fp16), so the numbers
are those of a saved-and-loaded PTQ state; the rotation is the shipped rule
(`rotation.for_layer` of the default Hadamard setting).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ... import rotation as hrotation
from ...linear import LayerQuant
from ...masks import make_layer_state


@dataclass(frozen=True)
class Method:
    statistic: str  # "none", "max" or "tail"
    alpha: float | None = None  # None for "none"
    percentile: float | None = None  # only for "tail"
    rotation: bool = False

    @property
    def key(self) -> str:
        if self.statistic == "none":
            base = "none"
        elif self.statistic == "max":
            base = f"max a{self.alpha:g}"
        else:
            base = f"tail p{self.percentile:g} a{self.alpha:g}"
        return base + (" +rot" if self.rotation else "")

    @property
    def label(self) -> str:
        return {"none": "no smoothing", "max": "SmoothQuant (max)", "tail": "tail-aware"}[self.statistic]


def method_grid(percentiles: Iterable[float], alphas: Iterable[float],
                rotation_alphas: Iterable[float] | None = None) -> list[Method]:
    """none, max at every alpha, tail at every percentile x alpha, all without rotation;
    then the same with the Hadamard rotation for the alphas in `rotation_alphas`
    (default: every alpha; an empty list: no rotation rows). "none" always gets both."""
    percentiles, alphas = list(percentiles), list(alphas)
    rot_alphas = alphas if rotation_alphas is None else list(rotation_alphas)

    def base(alist):
        return [Method("max", a) for a in alist] + [Method("tail", a, p) for p in percentiles for a in alist]

    plain = [Method("none")] + base(alphas)
    if not rot_alphas:
        return plain
    return plain + [Method(m.statistic, m.alpha, m.percentile, True) for m in [Method("none")] + base(rot_alphas)]


@dataclass
class LayerStats:
    """What a mask needs for one Linear: weight column absmax, activation absmax, tails."""

    wmax: Tensor
    absmax: Tensor
    tails: dict[float, Tensor]  # percentile -> per-channel tail statistic


def layer_map(stats: Mapping[str, LayerStats], method: Method) -> dict[str, LayerQuant]:
    """{layer: LayerQuant} of one method, masks as a PTQ state stores them, the rotation
    as Apply's "hadamard" gives it to each layer."""
    rot = hrotation.hadamard(hrotation.DEFAULT_BLOCK) if method.rotation else None
    out = {}
    for name, st in stats.items():
        if method.statistic == "none":
            mask = torch.ones_like(st.wmax, dtype=torch.float32)
        else:
            tail = st.tails[method.percentile] if method.statistic == "tail" else st.absmax
            ls = make_layer_state(st.wmax, st.absmax, tail, alpha=float(method.alpha), statistic=method.statistic)
            mask = ls.mask.float()
        out[name] = LayerQuant(mask=mask, rotation=hrotation.for_layer(rot, st.wmax.numel()))
    return out


def tail_over_max(stats: Mapping[str, LayerStats], percentile: float) -> float:
    """Mean over all channels (of all layers) of tail / absmax: 1.0 means the tail is the max."""
    ratios = [st.tails[percentile] / st.absmax.clamp_min(1e-30) for st in stats.values()]
    return float(torch.cat(ratios).mean())
