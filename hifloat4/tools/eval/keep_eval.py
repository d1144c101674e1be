"""Does keeping the most sensitive layers in high precision help, and more than luck?

For N kept layers per group (an expert of the tiny Wan pair, or the MiniLM encoder),
the error of the quantized model is measured for three orders of choosing them:
* "sensitive": the N largest W4A4 errors measured at calibration (what
  `keep_high_precision` does, hifloat4.plan.rank_by_sensitivity);
* "random": N layers drawn at random, averaged over fixed seeds;
* "position": the first N layers in block order (the usual "keep the first blocks" rule).
Everything is fixed before any result is seen; callers measure on held-out inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ...plan import rank_by_sensitivity

ORDERS = ("sensitive", "random", "position")
Kept = dict[str, frozenset[str]]  # group -> layers kept in high precision


def kept_layers(layers: Sequence[str], sensitivity: Mapping[str, float], order: str, n: int,
                seed: int = 0) -> frozenset[str]:
    """The n layers of one group (`layers` in block order) an order keeps."""
    if not 0 <= n <= len(layers):
        raise ValueError(f"cannot keep {n} of {len(layers)} layers")
    if order == "sensitive":
        return frozenset(rank_by_sensitivity({name: sensitivity[name] for name in layers})[:n])
    if order == "random":
        perm = torch.randperm(len(layers), generator=torch.Generator().manual_seed(seed)).tolist()
        return frozenset(layers[i] for i in perm[:n])
    if order == "position":
        return frozenset(layers[:n])
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def keep_sweep(groups: Mapping[str, tuple[Sequence[str], Mapping[str, float]]], error: Callable[[Kept], float],
               ns: Sequence[int], seeds: Sequence[int] = (0, 1, 2), orders: Sequence[str] = ORDERS,
               log: Callable[[str], None] = lambda _: None) -> dict:
    """{"n": ns, order: [error at each n]} (random: the mean over `seeds`, its runs under
    "random_runs"). `groups`: name -> (layers in block order, {layer: sensitivity});
    `error(kept)` quantizes every layer but the kept ones and measures. n = 0 is
    measured once and shared by every order."""
    out: dict = {"n": list(ns), "seeds": list(seeds)}
    cache: dict[frozenset, float] = {}

    def measure(order: str, n: int, seed: int = 0) -> float:
        kept = {g: kept_layers(layers, sens, order, n, seed) for g, (layers, sens) in groups.items()}
        key = frozenset((g, name) for g, names in kept.items() for name in names)
        if key not in cache:
            log(f"keep {n} per group ({order}{f', seed {seed}' if order == 'random' else ''})")
            cache[key] = error(kept)
        return cache[key]

    for order in orders:
        if order == "random":
            runs = [[measure(order, n, s) for s in seeds] for n in ns]
            out["random_runs"] = runs
            out["random"] = [sum(r) / len(r) for r in runs]
        else:
            out[order] = [measure(order, n) for n in ns]
    return out
