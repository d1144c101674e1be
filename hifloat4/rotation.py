"""Optional rotation path: block-diagonal randomized Hadamard along the in-feature axis.

rotate(v) = blockdiag(H_b / sqrt(b)) @ diag(s) @ v for every row v[..., K], with H_b
the Sylvester Hadamard matrix and s random +-1 signs. The transform R is orthonormal,
so rotate(x * m) @ rotate(W / m)^T == x @ W^T exactly in real arithmetic: applied
after the channel mask, it spreads each block's outliers over the block before
HiF4 quantization. b must be a power of two dividing K; DEFAULT_BLOCK (512) divides
every Wan2.2 in-feature size (3072, 4096, 5120, 13824, 14336).

The signs come from torch.Generator(cpu).manual_seed(seed) (the first K draws of
randint(0, 2)), then move to the device, so the same Rotation(block, seed) gives the
same R on every device; the PTQ state need only store (block, seed).

Implementation: the fast Walsh-Hadamard transform (log2 b butterfly stages, each
one add and one sub into a ping-pong buffer), over row chunks that fit in cache on
CPU: O(K log b) work instead of a dense (b x b) matmul's O(K b), and no
multiplications, so no TF32 matmul setting can touch it.
Arithmetic is fp32 (fp64 for fp64 inputs, which keeps exactness checkable);
the result has the input's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

# Values per row chunk: CPU keeps both fp32 buffers in L2; elsewhere few launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 26}
# The block setting's default and limit, for every caller (nodes, CLI, W4A4Config, state files).
DEFAULT_BLOCK = 512  # divides every Wan2.2 in-feature size
MAX_BLOCK = 8192  # Wan2.2's in-features take blocks up to 2048; larger only costs time


@dataclass(frozen=True)
class Rotation:
    """A block-diagonal randomized Hadamard rotation; (block, seed) define it fully."""

    block: int = DEFAULT_BLOCK
    seed: int = 0

    def __post_init__(self) -> None:
        b = self.block
        if isinstance(b, bool) or not isinstance(b, int) or b < 1 or b & (b - 1):
            raise ValueError(f"Rotation.block must be a power of two >= 1, got {b!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"Rotation.seed must be an int in [0, 2**63), got {s!r}")

    def check(self, k: int) -> None:
        """Raise a ValueError unless K in-features split into whole blocks."""
        if k < 1 or k % self.block:
            raise ValueError(f"in-features K={k} is not a multiple of the rotation block {self.block}")

    def signs(self, k: int, device: torch.device | str | None = None) -> Tensor:
        """(K,) fp32 +-1 signs, a fresh tensor (the same values for every call and device)."""
        self.check(k)
        return _cpu_signs(self.seed, k).to(device or "cpu", copy=True)


def fit_block(in_features: int, block: int) -> int:
    """Largest power of two <= block dividing in_features: the block a layer actually
    gets from a model-wide setting (512 for every Wan2.2 size; smaller for tiny models)."""
    b = 1
    while b * 2 <= block and in_features % (b * 2) == 0:
        b *= 2
    return b


def for_layer(rotation: Rotation | None, in_features: int) -> Rotation | None:
    """The Rotation of one layer under a model-wide `rotation` (its block fitted to the
    layer's in-features, the seed kept). The one rule Apply, Save, export and the library use."""
    if rotation is None:
        return None
    return Rotation(block=fit_block(in_features, rotation.block), seed=rotation.seed)


def hadamard(block: int) -> Rotation:
    """The model-wide rotation a user's block setting asks for: the largest power of two
    <= block, seed 0 (each layer then gets `for_layer` of it)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"rotation block must be an int >= 1, got {block!r}")
    return Rotation(block=1 << (block.bit_length() - 1))


SETTINGS = ("off", "hadamard")  # what a user picks (nodes, CLI, W4A4Config)


def from_setting(setting: str, block: int) -> Rotation | None:
    """The model-wide rotation of a user setting: "off" -> None, "hadamard" -> hadamard(block)."""
    if setting not in SETTINGS:
        raise ValueError(f"rotation must be one of {SETTINGS}, got {setting!r}")
    return None if setting == "off" else hadamard(block)


def to_meta(rotation: Rotation | None) -> dict | None:
    """The JSON form stored in PTQ states and checkpoints: {"block", "seed"} or null."""
    return None if rotation is None else {"block": rotation.block, "seed": rotation.seed}


def from_meta(meta: dict | None) -> Rotation | None:
    """Inverse of to_meta (validated by Rotation's own checks)."""
    return None if meta is None else Rotation(block=int(meta["block"]), seed=int(meta["seed"]))


@lru_cache(maxsize=64)
def _cpu_signs(seed: int, k: int) -> Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (k,), generator=gen).mul_(2).sub_(1).to(torch.float32)


@lru_cache(maxsize=64)
def _scaled_signs(rot: Rotation, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """s / sqrt(b): the diagonal with the Hadamard normalization folded in (shared, read-only)."""
    return (_cpu_signs(rot.seed, k).to(torch.float64) / rot.block**0.5).to(device, dtype)


def _fwht_(y: Tensor, tmp: Tensor) -> Tensor:
    """Unnormalized Walsh-Hadamard transform of each length-b row of y (rows, b).

    Returns whichever of the two buffers holds the result (both are clobbered).
    Stage h maps (u, v) -> (u + v, u - v) for elements h apart: H_2b = [[H, H], [H, -H]].
    """
    rows, b = y.shape
    h = 1
    while h < b:
        src, dst = y.view(rows, b // (2 * h), 2, h), tmp.view(rows, b // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, tmp = tmp, y
        h *= 2
    return y


def rotate(x: Tensor, rot: Rotation) -> Tensor:
    """Apply R along the last dim of x[..., K]; same shape and dtype as x."""
    return _transform(x, rot, inverse=False)


def unrotate(y: Tensor, rot: Rotation) -> Tensor:
    """Apply R^-1 = R^T = diag(s) blockdiag(H_b / sqrt(b)) along the last dim of y[..., K]
    (H is symmetric): what takes a rotated weight back to real units (LoRA merge)."""
    return _transform(y, rot, inverse=True)


def _transform(x: Tensor, rot: Rotation, inverse: bool) -> Tensor:
    """R (signs, then the transform) or R^-1 (the transform, then the signs) of each row."""
    if x.dim() == 0:
        raise ValueError("x must have an in-feature dimension, got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    k = x.shape[-1]
    rot.check(k)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scaled = _scaled_signs(rot, k, x.device, dtype)
    flat = x.reshape(-1, k)
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    budget = _CHUNK_ELEMENTS["cpu" if x.device.type == "cpu" else "other"]
    step = max(1, budget // k)
    for r0 in range(0, flat.shape[0], step):
        rows = flat[r0 : r0 + step]
        if inverse:
            y = torch.empty(rows.shape, dtype=dtype, device=x.device).copy_(rows).view(-1, rot.block)
            result = _fwht_(y, torch.empty_like(y)).view(rows.shape).mul_(scaled)
        else:
            y = torch.mul(rows, scaled).view(-1, rot.block)  # new tensor in `dtype`: x is never touched
            result = _fwht_(y, torch.empty_like(y)).view(rows.shape)
        out[r0 : r0 + step] = result
    return out.view(x.shape)
