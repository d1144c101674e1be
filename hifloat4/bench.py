"""`python -m hifloat4 bench`: throughput of the HiF4 kernels on this machine.

Every figure is measured here, next to two references taken on the same tensor
in the same run: a plain tensor copy (the memory-bound limit) and the naive
torch transcription of the spec (`hifloat4.naive`), the baseline the fast
quantizer is judged against.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from .format import quantize_dequantize
from .naive import naive_quantize_dequantize
from .packing import pack, unpack


def best_seconds(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Best wall time of `repeat` calls after one warm-up (best-of filters noise from other processes)."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def kernel_rows(rows: int, cols: int, repeat: int, device: torch.device) -> list[dict]:
    """Melem/s and GB/s (bytes read + written) of each kernel on a (rows, cols) bf16 tensor."""
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)
    packed = pack(x)
    if not torch.equal(quantize_dequantize(x), naive_quantize_dequantize(x)) or not torch.equal(unpack(packed), quantize_dequantize(x)):
        raise AssertionError("fast, naive and packed paths disagree: refusing to report speeds")
    n, bf16_bytes = x.numel(), x.numel() * 2
    cases = [  # name, fn, bytes moved
        ("copy (memory-bound limit)", lambda: x.clone(), 2 * bf16_bytes),
        ("naive transcription (baseline)", lambda: naive_quantize_dequantize(x), 2 * bf16_bytes),
        ("quantize_dequantize", lambda: quantize_dequantize(x), 2 * bf16_bytes),
        ("pack", lambda: pack(x), bf16_bytes + packed.nbytes),
        ("unpack", lambda: unpack(packed), packed.nbytes + bf16_bytes),
    ]
    out = []
    for name, fn, nbytes in cases:
        s = best_seconds(fn, repeat, device)
        out.append({"kernel": name, "ms": s * 1e3, "melem_per_s": n / s / 1e6, "gb_per_s": nbytes / s / 1e9})
    naive = out[1]["melem_per_s"]
    for row in out:
        row["x_naive"] = row["melem_per_s"] / naive
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifloat4 bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cols", type=int, default=5120)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows = kernel_rows(a.rows, a.cols, a.repeat, device)
    env = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "shape": [a.rows, a.cols], "dtype": "bfloat16"}
    if a.json:
        print(json.dumps({"env": env, "kernels": rows}))
        return 0
    print(f"HiF4 kernels on a {a.rows}x{a.cols} bf16 tensor, {device}, {env['threads']} threads, "
          f"torch {torch.__version__}, best of {a.repeat}")
    print(f"{'kernel':34s} {'ms':>8s} {'Melem/s':>9s} {'GB/s':>7s} {'x naive':>8s}")
    for r in rows:
        print(f"{r['kernel']:34s} {r['ms']:8.2f} {r['melem_per_s']:9.0f} {r['gb_per_s']:7.2f} {r['x_naive']:8.1f}")
    return 0
