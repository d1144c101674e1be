"""Which HiF4 implementation runs on a device: the one place that decides, and the one
dispatch table every caller goes through (format, packing and linear never branch on
devices or backends).

Three implementations compute the same bits (tests compare them element for element):
  cpp     the C++ kernel (csrc/hif4_cpu.cpp), CPU only, built on first use;
  triton  fused Triton kernels (triton_kernels.py): CUDA (and ROCm, which torch also
          calls "cuda"), or a CPU under Triton's interpreter (TRITON_INTERPRET=1, tests);
  torch   plain tensor ops on any device (torch_kernels.py: MPS, meta, or where the
          others are missing).

`HIFLOAT4_BACKEND=auto|cpp|triton|torch` (default auto) forces one. Auto picks cpp on
a CPU and triton on CUDA, and falls back to torch with one warning when those cannot
run; a forced backend that cannot run on a tensor's device raises BackendError
instead of quietly computing something slower.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu_kernels, torch_kernels
from .layout import from_planar
from .runtime import triton_interpreted
from .spec import BYTES_PER_GROUP, GROUP_SIZE

ENV = "HIFLOAT4_BACKEND"
CHOICES = ("auto", "cpp", "triton", "torch")


class BackendError(RuntimeError):
    """A forced backend cannot run here, or HIFLOAT4_BACKEND names no backend."""


@dataclass(frozen=True)
class Kernels:
    """One backend's implementations of the HiF4 primitives, all with the same bits.

    quantize_groups(groups (n, 64) fp32/bf16/fp16, out (n, 64)): HiF4 values in out.dtype.
    quantize_rows(rows (R, K), mask (K,) fp32 | None, divide, scale (1,) | None, out (R, K)):
        out = Q(float32(rows) [* scale] [* or / mask]) in one pass, or None where the
        backend has no fused transform (linear.py then composes it from quantize_groups).
    pack_groups(groups (n, 64), data (n, 36) uint8) -> False if NaN/Inf (refused).
    unpack_groups(data (n, 36) uint8, out (n, 64)): the values in out.dtype.
    pack_rows(rows (R, K), mask | None, divide, scale | None) -> (planar (R, 36 G), NaN/Inf flag):
        packing.to_planar(pack(transformed rows)) in one pass, or None (packed_linear composes it).
    unpack_rows(planar (R, 36 G), out (R, K)): decode planar packed rows (packing.to_planar).
    int8: the int8 GEMM path (Int8Kernels), or None where the backend has none.
    """

    name: str
    quantize_groups: Callable[[Tensor, Tensor], None]
    quantize_rows: Callable[[Tensor, Tensor | None, bool, Tensor | None, Tensor], None] | None
    pack_groups: Callable[[Tensor, Tensor], bool]
    unpack_groups: Callable[[Tensor, Tensor], None]
    pack_rows: Callable[[Tensor, Tensor | None, bool, Tensor | None], tuple[Tensor, Tensor]] | None
    unpack_rows: Callable[[Tensor, Tensor], None]
    int8: Int8Kernels | None


@dataclass(frozen=True)
class Int8Kernels:
    """HiF4 x HiF4 on int8 tensor cores (triton_kernels): operands as int8 codes +-(n << d)
    with S/4 per (group, row), and their product.

    encode_rows(rows (R, K), mask | None) -> (codes int8 (R, 64 G), quarter float32 (G, R)).
    weight_rows(planar (N, 36 G), K) -> the same from planar packed rows.
    gemm(a, a_quarter, w, w_quarter, bias | None, out_dtype) -> (R, N).
    tuning() -> what the GEMM's autotuner chose last (config, best ms per promotion).
    """

    encode_rows: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]
    weight_rows: Callable[[Tensor, int], tuple[Tensor, Tensor]]
    gemm: Callable[..., Tensor]
    tuning: Callable[[], dict]


def requested() -> str:
    """The backend asked for in the environment ("auto" when unset)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise BackendError(f"{ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


@functools.lru_cache(maxsize=None)
def _triton_missing() -> str | None:
    """Why Triton cannot be imported (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        from . import triton_kernels  # noqa: F401  (compiles nothing until first launch)
    except Exception as e:  # a broken install: say what broke
        return f"importing the Triton kernels failed ({type(e).__name__}: {e})"
    return None


def _why_not(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ kernel runs on CPU tensors only, this tensor is on {device.type}"
        return None if cpu_kernels.load() is not None else "the C++ kernel could not be built (see the warning)"
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return _triton_missing()
    return f"Triton runs on CUDA devices (or on CPU with TRITON_INTERPRET=1), this tensor is on {device.type}"


@functools.lru_cache(maxsize=None)
def _warn_fallback(device_type: str, wanted: str, reason: str) -> None:
    warnings.warn(f"hifloat4: {wanted} backend unavailable on {device_type} ({reason}); "
                  "using the torch implementation (same results, slower)", RuntimeWarning, stacklevel=3)


def available(device: torch.device | str) -> list[str]:
    """Every backend that can run on `device`, in preference order (for checks and benchmarks)."""
    device = torch.device(device)
    return [b for b in ("cpp", "triton", "torch") if _why_not(b, device) is None]


def for_device(device: torch.device | str) -> str:
    """The name of the backend that runs HiF4 on `device`: "cpp", "triton" or "torch"."""
    device = torch.device(device)
    choice = requested()
    if choice != "auto":
        reason = _why_not(choice, device)
        if reason is not None:
            raise BackendError(f"{ENV}={choice} cannot run here: {reason}")
        return choice
    preferred = {"cpu": "cpp", "cuda": "triton"}.get(device.type)
    if preferred is None:
        return "torch"
    reason = _why_not(preferred, device)
    if reason is None:
        return preferred
    if preferred == "triton":  # the C++ loader warns for itself
        _warn_fallback(device.type, preferred, reason)
    return "torch"


def _unpack_rows_by_groups(unpack_groups: Callable[[Tensor, Tensor], None]) -> Callable[[Tensor, Tensor], None]:
    """unpack_rows for backends that decode (n, 36) groups: back to group order, then decode."""
    def unpack_rows(planar: Tensor, out: Tensor) -> None:
        n, k = out.shape
        g = planar.shape[1] // BYTES_PER_GROUP
        groups = from_planar(planar)
        if k == g * GROUP_SIZE and out.is_contiguous():
            unpack_groups(groups.view(-1, BYTES_PER_GROUP), out.view(-1, GROUP_SIZE))
        else:
            full = torch.empty(n * g, GROUP_SIZE, dtype=out.dtype, device=out.device)
            unpack_groups(groups.view(-1, BYTES_PER_GROUP), full)
            out.copy_(full.view(n, -1)[:, :k])
    return unpack_rows


@functools.lru_cache(maxsize=None)
def _table(name: str) -> Kernels:
    if name == "torch":
        return Kernels("torch", torch_kernels.quantize_groups, None, torch_kernels.pack_groups,
                       torch_kernels.unpack_groups, None, _unpack_rows_by_groups(torch_kernels.unpack_groups), None)
    if name == "cpp":
        ext = cpu_kernels.load()

        def unpack_groups(data: Tensor, out: Tensor) -> None:
            ext.unpack_groups(data.contiguous(), out)
        return Kernels("cpp", lambda g, out: ext.quantize_dequantize_groups(g.contiguous(), out), None,
                       lambda g, data: ext.pack_groups(g.contiguous(), data), unpack_groups, None,
                       _unpack_rows_by_groups(unpack_groups), None)
    from . import triton_kernels as tk
    return Kernels("triton", lambda g, out: tk.quantize_rows(g, out=out), tk.fused_rows,
                   torch_kernels.pack_groups,  # (n, 64) groups to bytes: an export step, the torch path does it
                   lambda data, out: tk.decode_groups(data, out),
                   lambda rows, mask, divide, scale: tk.pack_rows(rows, mask, divide=divide, scale=scale),
                   tk.decode_rows,
                   Int8Kernels(lambda rows, mask: tk.encode_int8_rows(rows, mask), tk.int8_rows, tk.int8_gemm,
                               tk.gemm_tuning))


def kernels(device: torch.device | str) -> Kernels:
    """The dispatch table of the backend that runs HiF4 on `device` (see `for_device`)."""
    return _table(for_device(device))
