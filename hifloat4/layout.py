"""The byte layouts of packed HiF4 (the project's choice; docs/hif4_spec.md "Storage layout").

One group:
  bytes 0..31  codes, two per byte (value 2i in the low nibble, 2i+1 in the high);
               code = sign << 3 | m * 4, m in {0, 0.25, ..., 1.75}
  byte  32     E6M2 scale: (e + 48) << 2 | mantissa, S = (1 + mantissa/4) * 2^e
  byte  33     the 8 level-1 bits, bit k for values 8k..8k+7
  bytes 34..35 the 16 level-2 bits, little-endian, bit j for values 4j..4j+3
A packed tensor keeps the grouped axis last: a weight W[N, K] packed along
dim=-1 is data (N, ceil(K/64), 36), so rows can be expanded a slice at a time.

Planar rows (`to_planar`) hold the same bytes per row in another order: what GPU kernels
read with wide loads, and what packed layers keep in memory. Files keep the group layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import BYTES_PER_GROUP


def to_planar(data: Tensor) -> Tensor:
    """Packed rows (N, G, 36) -> the same bytes per row in planar order (N, 36 G): the G*32
    code bytes, then G little-endian words `scale | level-1 bits << 8 | level-2 bits << 16`.

    Still 4.5 bits per value, but each row's codes are contiguous and 16-byte aligned (for
    G % 4 == 0, as in every Wan2.2 layer) and each group's metadata is one aligned 32-bit
    word: what a GPU kernel reads with wide loads. Packed files keep the (N, G, 36) layout;
    layers convert on load. A single group's bytes are already planar (G = 1)."""
    if data.dtype != torch.uint8 or data.ndim != 3 or data.shape[2] != BYTES_PER_GROUP:
        raise ValueError(f"packed rows must be uint8 (N, G, {BYTES_PER_GROUP}), got {data.dtype} {tuple(data.shape)}")
    n = data.shape[0]
    return torch.cat((data[:, :, :32].reshape(n, -1), data[:, :, 32:].reshape(n, -1)), dim=1)


def from_planar(planar: Tensor) -> Tensor:
    """Inverse of `to_planar`: (N, 36 G) -> (N, G, 36)."""
    if planar.dtype != torch.uint8 or planar.ndim != 2 or planar.shape[1] % BYTES_PER_GROUP:
        raise ValueError(f"planar rows must be uint8 (N, 36 G), got {planar.dtype} {tuple(planar.shape)}")
    n, g = planar.shape[0], planar.shape[1] // BYTES_PER_GROUP
    return torch.cat((planar[:, : 32 * g].reshape(n, g, 32), planar[:, 32 * g :].reshape(n, g, 4)), dim=2)
