"""How much W4A4 hurts one layer: its relative output error on a small, fixed sample
of the calibration tokens it saw.

The error needs the layer's real inputs, and keeping them all is out of the question
(an A14B ffn.2 call alone is up to ~75k tokens x 13824 channels). So `TokenSample`
keeps a few evenly spaced tokens of each call in a bounded device buffer; once the
buffer is full, a new call replaces a random earlier one (reservoir sampling over
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
    to one of capacity // per_call slots of a (slots, per_call, channels) buffer in
    the first input's dtype, on its device. Slot choice is call-level reservoir
    sampling with `random.Random(seed)`. `tokens()` gives the kept tokens.
    """

    def __init__(self, channels: int, capacity: int = 128, per_call: int = 16,
                 device: torch.device | str | None = None, seed: int = 0) -> None:
        self.channels = _positive_int("channels", channels)
        self.per_call = min(_positive_int("per_call", per_call), _positive_int("capacity", capacity))
        self.slots = capacity // self.per_call  # capacity rounded down to whole calls
        self.device = torch.device(device) if device is not None else None
        self.calls = 0
        self._rows = [0] * self.slots  # host: tokens held per slot
        self._buffer: Tensor | None = None
        self._rng = random.Random(seed)

    def _slot(self) -> int | None:
        """The slot this call goes to (None: not kept); counts the call."""
        t, self.calls = self.calls, self.calls + 1
        if t < self.slots:
            return t
        j = self._rng.randrange(t + 1)
        return j if j < self.slots else None

    def _buffer_for(self, x: Tensor) -> Tensor:
        if self._buffer is None:
            device = x.device if self.device is None else self.device
            self._buffer = torch.zeros((self.slots, self.per_call, self.channels), dtype=x.dtype, device=device)
        elif self._buffer.device != x.device and self.device is None:
            self._buffer = self._buffer.to(x.device)
        return self._buffer

    def update(self, x: Tensor) -> None:
        """Offer one call's input x[..., channels]."""
        if x.dim() == 0 or x.shape[-1] != self.channels:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected [..., {self.channels}]")
        if x.numel() == 0:
            return
        slot = self._slot()
        if slot is None:
            return
        rows = _evenly_spaced(x.detach().reshape(-1, self.channels), self.per_call)
        self._buffer_for(x)[slot, : rows.shape[0]].copy_(rows)
        self._rows[slot] = rows.shape[0]

    def tokens(self) -> Tensor:
        """The kept tokens, (k, channels), in slot order; raises if no call was seen."""
        if self._buffer is None:
            raise ValueError("the token sample is empty: the layer never saw an input")
        return torch.cat([self._buffer[i, :r] for i, r in enumerate(self._rows) if r])

    def __repr__(self) -> str:
        return (f"TokenSample(channels={self.channels}, slots={self.slots}, per_call={self.per_call}, "
                f"calls={self.calls})")


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
