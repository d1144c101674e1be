"""How much W4A4 hurts one layer: its relative output error on a small, fixed sample
of the calibration tokens it saw.

The error needs the layer's real inputs, and keeping them all is out of the question
(an A14B ffn.2 call alone is up to ~75k tokens x 13824 channels). So `TokenSample`
keeps a few evenly spaced tokens of each call in a bounded number of slots; once
they are full, a new call replaces a random earlier one (reservoir sampling over
calls, so every call is equally likely to be represented however many there are).
Nothing depends on tensor values: which rows are taken follows from the shape, and
the reservoir draws come from a host-side seeded `random.Random`, so an update is a
queue of device copies and never a host sync, and the same run gives the same sample.

`layer_errors` then measures ||Q(x m) Q(W/m)^T - x W^T||_F / ||x W^T||_F on the
sample for the calibrated mask and for each candidate statistic of an "adaptive"
choice (hifloat4.state.ERROR_KEYS), in float32 on the sample's device.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .linear import LayerQuant, prepare_activation, prepare_weight
from .masks import candidate_mask
from .rotation import Rotation, for_layer
from .state import CANDIDATES, LayerState

# An undefined or overflowing error (x W^T == 0 with a non-zero quantized output, or
# inf norms) counts as the largest float32: such a layer is as sensitive as it gets.
ERROR_CEILING = torch.finfo(torch.float32).max


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _evenly_spaced(rows: Tensor, m: int) -> Tensor:
    """m rows of rows[n, C] spread evenly over it (all of them when n <= m): a view."""
    n = rows.shape[0]
    if n <= m:
        return rows
    step = n // m
    start = step // 2
    return rows[start : start + step * m : step]


class TokenSample:
    """A bounded, deterministic sample of one Linear's input tokens over many calls.

    Each call contributes `per_call` evenly spaced tokens (all of them if it has fewer)
    to one of capacity // per_call slots, in the first input's dtype, on `device` (default:
    the input's). Slot choice is call-level reservoir sampling with `random.Random(seed)`.
    A slot holds its call's rows as a tensor of their own, so samples of layers that
    read the same input can hold the same rows tensor (hifloat4.calibrate passes it
    in): memory is spent once per distinct kept input (`held_bytes`). `tokens()` gives
    the kept tokens.
    """

    def __init__(self, channels: int, capacity: int = 64, per_call: int = 16,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        self.channels = _positive_int("channels", channels)
        self.per_call = min(_positive_int("per_call", per_call), _positive_int("capacity", capacity))
        self.slots = capacity // self.per_call  # capacity rounded down to whole calls
        self.device = torch.device(device) if device is not None else None
        self.dtype: torch.dtype | None = None  # the first input's
        self.calls = 0
        self._kept: list[Tensor | None] = [None] * self.slots
        self._rng = random.Random(seed)

    def _slot(self) -> int | None:
        """The slot this call goes to (None: not kept); counts the call."""
        t, self.calls = self.calls, self.calls + 1
        if t < self.slots:
            return t
        j = self._rng.randrange(t + 1)
        return j if j < self.slots else None

    def rows_key(self, x: Tensor) -> tuple:
        """What `rows(x)` depends on besides x: equal keys, equal rows."""
        return self.per_call, self.dtype or x.dtype, self.device or x.device

    def rows(self, x: Tensor) -> Tensor:
        """The rows a kept call of x[..., channels] stores: evenly spaced, copied."""
        per_call, dtype, device = self.rows_key(x)
        rows = _evenly_spaced(x.detach().reshape(-1, self.channels), per_call)
        return rows.to(device=device, dtype=dtype, copy=True)

    def update(self, x: Tensor, rows: Callable[[], Tensor] | None = None) -> None:
        """Offer one call's input x[..., channels]. `rows`, if given, returns `self.rows(x)`
        (e.g. from a cache shared with samples of layers reading the same x); it is
        called only when the call is kept."""
        if x.dim() == 0 or x.shape[-1] != self.channels:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {self.channels}]")
        if x.numel() == 0:
            return
        slot = self._slot()
        if slot is None:
            return
        kept = self.rows(x) if rows is None else rows()
        self.dtype = kept.dtype
        if self.device is None:  # follow the inputs, as ChannelStats does
            self._kept = [None if t is None else t.to(kept.device) for t in self._kept]
        self._kept[slot] = kept

    def tokens(self) -> Tensor:
        """The kept tokens, (k, channels), in slot order; raises if no call was seen."""
        kept = self.held()
        if not kept:
            raise ValueError("the token sample is empty: the layer never saw an input")
        return torch.cat(kept)

    def held(self) -> list[Tensor]:
        """The tensors this sample holds (to count memory once across shared samples)."""
        return [t for t in self._kept if t is not None]

    def __repr__(self) -> str:
        return (f"TokenSample(channels={self.channels}, slots={self.slots}, per_call={self.per_call}, "
                f"calls={self.calls})")


def held_bytes(samples: Iterable[TokenSample]) -> int:
    """Memory the samples hold, each shared rows tensor counted once."""
    seen = {id(t): t.numel() * t.element_size() for sample in samples for t in sample.held()}
    return sum(seen.values())


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """t on `device` without waiting for the device: non-blocking unless the copy goes to
    the host (where the data must have arrived before anyone reads it)."""
    return t.to(device, non_blocking=device.type != "cpu")


def _finite_float(x: Tensor) -> Tensor:
    """x in float32 with NaN/Inf as 0, as the statistics count them (hifloat4.stats)."""
    return x.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _relative(out: Tensor, ref: Tensor) -> Tensor:
    """||out - ref|| / ||ref|| as a 0-d float32 (0 where out == ref, else capped)."""
    diff, norm = (out - ref).norm(), ref.norm()
    err = torch.where(diff == 0, torch.zeros_like(diff), diff / norm)
    return err.nan_to_num(nan=ERROR_CEILING, posinf=ERROR_CEILING)


def _quantized_output(x: Tensor, weight: Tensor, quant: LayerQuant) -> Tensor:
    xq = prepare_activation(x, quant.mask, quant.rotation)
    return xq @ prepare_weight(weight, quant.mask, quant.rotation, dtype=torch.float32).T


def _float_layer(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (n, C) float32, the weight on their device, the float output x W^T)."""
    x = _finite_float(x.reshape(-1, x.shape[-1]))
    weight = to_device(weight, x.device)  # a no-op when it is there already
    return x, weight, x @ weight.float().T


@torch.no_grad()
def layer_errors(sample: TokenSample, weight: Tensor, ls: LayerState, alpha: float,
                 rotation: Rotation | None) -> Tensor:
    """Relative output errors (5,) float32 in ERROR_KEYS order on the sample's device:
    the layer's own mask, then each CANDIDATES statistic's mask at `alpha`.

    `ls` needs its mask, statistics and tails (not its errors); `rotation` is the
    model-wide setting (each layer gets `rotation.for_layer`). The masks go to the
    device in one non-blocking copy, and nothing is read back.
    """
    x, weight, ref = _float_layer(sample.tokens(), weight)
    masks = torch.stack([ls.mask] + [candidate_mask(ls, c, alpha) for c in CANDIDATES])
    masks = to_device(masks.float(), x.device)
    rot = for_layer(rotation, ls.channels)
    return torch.stack([_relative(_quantized_output(x, weight, LayerQuant(m, rot)), ref) for m in masks])
