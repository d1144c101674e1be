"""`python -m hifloat4 bench`: throughput of the HiF4 kernels and the memory of packed
HiF4 models on this machine.

Kernels: every figure is measured here, next to two references taken on the same
tensor in the same run: a plain tensor copy (the memory-bound limit) and the naive
torch transcription of the spec (`hifloat4.naive`), the baseline the fast
quantizer is judged against.

Memory: the tiny Wan2.2 model (dim 256, ffn 512, 4 blocks) exported bf16 and packed
(hifloat4.export): file sizes, resident weight bytes, peak tensor memory of one
forward (torch's allocator events on CPU, max_memory_allocated on CUDA) and time
per forward, fake-quant (HiF4Linear, bf16 cached weights) vs packed
(PackedHiF4Linear); the two outputs must be bit-identical or nothing is reported.
Then the same byte counts, exactly from layer shapes (meta-device models), for the
real Wan2.2-A14B experts and TI2V-5B.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from .. import wan
from ..calibrate import CalibConfig, calibrate
from ..checkpoint import install_checkpoint_, load_hif4_checkpoint
from ..export import SafetensorsSource, export_expert
from ..format import quantize_dequantize
from ..packed_linear import resident_bytes
from ..packing import pack, unpack
from ..plan import W4A4Config
from ..quantize import quantize_
from ..spec import BYTES_PER_GROUP, GROUP_SIZE
from ..wan_model import WanConfig, WanModel
from .naive import naive_quantize_dequantize
from .tiny_wan import example_inputs, make_tiny_wan

# Real shapes (WanModel naming); num_heads = dim // 128 as ComfyUI detects it.
REAL_MODELS = {
    "Wan2.2-T2V-A14B expert": WanConfig(in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_layers=40),
    "Wan2.2-I2V-A14B expert": WanConfig(in_dim=36, out_dim=16, dim=5120, ffn_dim=13824, num_layers=40),
    "Wan2.2-TI2V-5B": WanConfig(in_dim=48, out_dim=48, dim=3072, ffn_dim=14336, num_layers=30),
}


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


# --------------------------------------------------------------------------- memory

def shape_bytes(cfg: WanConfig) -> dict:
    """Weight bytes of a Wan model from its layer shapes alone (meta device): all bf16
    as shipped vs packed (main Linear weights as HiF4 codes + an fp32 mask per layer,
    everything else bf16)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    params = dict(model.named_parameters())
    main = wan.main_linear_names(model)
    main_values = sum(params[n + ".weight"].numel() for n in main)
    codes = sum(params[n + ".weight"].shape[0] * math.ceil(params[n + ".weight"].shape[1] / GROUP_SIZE)
                * BYTES_PER_GROUP for n in main)
    masks = sum(4 * params[n + ".weight"].shape[1] for n in main)
    bf16 = 2 * sum(p.numel() for p in params.values())
    packed = bf16 - 2 * main_values + codes + masks
    largest = max(params[n + ".weight"].numel() for n in main)
    return {"main_layers": len(main), "main_values": main_values, "bf16_bytes": bf16, "packed_bytes": packed,
            "main_bf16_bytes": 2 * main_values, "main_packed_bytes": codes, "mask_bytes": masks,
            "main_pct": 100.0 * codes / (2 * main_values), "whole_pct": 100.0 * packed / bf16,
            "expansion_buffer_bf16_bytes": 2 * largest}


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2: keep the report clean."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_forward_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated during fn() above what was allocated before.

    CUDA: max_memory_allocated. CPU: torch's allocator events (legacy profiler with
    profile_memory): each op's own allocations at its start, each free at its time,
    summed in time order; the maximum of that running sum is the peak.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with _quiet_stderr(), torch.autograd.profiler.profile(profile_memory=True, use_kineto=False) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.function_events
                    if e.self_cpu_memory_usage)
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def tiny_memory(repeat: int, device: torch.device) -> dict:
    """The tiny Wan2.2 T2V expert: bf16 file vs packed file and resident weights (bf16 as
    shipped); peak memory and time of a float32 forward (ComfyUI's compute dtype on
    CPU) of the unquantized, fake-quant and packed models."""
    shipped = make_tiny_wan("t2v").to(torch.bfloat16)
    model = copy.deepcopy(shipped).float()  # the bf16 weights, computed in float32
    x, t, ctx = example_inputs(model, frames=4, height=16, width=16, text_len=64)
    state = calibrate({"high_noise": model}, lambda: model(x, t, ctx), CalibConfig())
    config = W4A4Config(state, expert="high_noise")
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "bf16.safetensors"), os.path.join(d, "hif4.safetensors")
        save_file(shipped.state_dict(), src)
        export_expert(SafetensorsSource(src), config, out)
        files = {"bf16": os.path.getsize(src), "packed": os.path.getsize(out)}
        ckpt = load_hif4_checkpoint(out)
    with torch.device("meta"):
        packed_shipped = install_checkpoint_(WanModel(model.config), ckpt)  # tensors as stored in the file
    resident = {"bf16 (no quantization)": resident_bytes(shipped),
                "fake-quant W4A4": resident_bytes(quantize_(copy.deepcopy(shipped), config)),
                "packed W4A4": resident_bytes(packed_shipped)}
    runs = {"bf16 (no quantization)": model, "fake-quant W4A4": quantize_(copy.deepcopy(model), config),
            "packed W4A4": install_checkpoint_(WanModel(model.config), ckpt)}
    x, t, ctx = x.to(device), t.to(device), ctx.to(device)
    rows = {}
    with torch.no_grad():
        runs = {name: m.eval().to(device) for name, m in runs.items()}
        if not torch.equal(runs["fake-quant W4A4"](x, t, ctx), runs["packed W4A4"](x, t, ctx)):
            raise AssertionError("packed and fake-quant forwards differ: refusing to report")
        for name, m in runs.items():
            run = lambda m=m: m(x, t, ctx)
            rows[name] = {"resident_bytes": resident[name], "peak_forward_bytes": peak_forward_bytes(run, device),
                          "ms": 1e3 * best_seconds(run, min(repeat, 5), device)}
    return {"tokens": int(x.shape[2] * x.shape[3] * x.shape[4] // 4), "files": files, "forward": rows,
            "main_layers": len(ckpt.layers)}


def _mb(n: int) -> str:
    return f"{n / 2**20:9.2f} MiB"


def _gb(n: int) -> str:
    return f"{n / 1e9:7.2f} GB"


def print_memory(tiny: dict, real: dict, unpack_melem_per_s: float) -> None:
    f = tiny["files"]
    print(f"\nPacked HiF4 model memory: tiny Wan2.2 T2V expert (dim 256, ffn 512, 4 blocks, "
          f"{tiny['main_layers']} main layers), forward of {tiny['tokens']} tokens")
    print(f"  file: bf16 {_mb(f['bf16'])}  packed {_mb(f['packed'])}  ({100.0 * f['packed'] / f['bf16']:.1f}%)")
    print(f"  {'model':24s} {'resident weights':>16s} {'forward peak':>14s} {'ms/forward':>11s}   "
          "(resident: bf16 as shipped; forward: float32 compute)")
    for name, r in tiny["forward"].items():
        print(f"  {name:24s} {_mb(r['resident_bytes']):>16s} {_mb(r['peak_forward_bytes']):>14s} {r['ms']:11.1f}")
    print("  (the tiny model's text embedding, 4096x256, is a large share of its weights and stays bf16)")
    print("Real Wan2.2 shapes, exact from layer shapes (bf16 as shipped vs packed; files add a header):")
    print(f"  {'model':24s} {'bf16':>10s} {'packed':>10s} {'whole':>7s} {'main bf16':>10s} {'main HiF4':>10s} "
          f"{'main':>7s} {'expand buf':>10s} {'expand/fwd':>10s}")
    for name, r in real.items():
        print(f"  {name:24s} {_gb(r['bf16_bytes']):>10s} {_gb(r['packed_bytes']):>10s} {r['whole_pct']:6.1f}% "
              f"{_gb(r['main_bf16_bytes']):>10s} {_gb(r['main_packed_bytes']):>10s} {r['main_pct']:6.2f}% "
              f"{_gb(r['expansion_buffer_bf16_bytes']):>10s} {r['main_values'] / unpack_melem_per_s / 1e6:9.1f}s")
    print("  whole = resident weights of the packed model / bf16 (main layers packed, masks fp32, the rest bf16);\n"
          "  expand buf = the one transient bf16 weight a forward adds (largest main layer, ffn);\n"
          "  expand/fwd = unpacking every main weight once per forward at the 'unpack' rate measured above")


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
    tiny = tiny_memory(a.repeat, device)
    real = {name: shape_bytes(cfg) for name, cfg in REAL_MODELS.items()}
    if a.json:
        print(json.dumps({"env": env, "kernels": rows, "memory": {"tiny": tiny, "real": real}}))
        return 0
    print(f"HiF4 kernels on a {a.rows}x{a.cols} bf16 tensor, {device}, {env['threads']} threads, "
          f"torch {torch.__version__}, best of {a.repeat}")
    print(f"{'kernel':34s} {'ms':>8s} {'Melem/s':>9s} {'GB/s':>7s} {'x naive':>8s}")
    for r in rows:
        print(f"{r['kernel']:34s} {r['ms']:8.2f} {r['melem_per_s']:9.0f} {r['gb_per_s']:7.2f} {r['x_naive']:8.1f}")
    print_memory(tiny, real, next(r["melem_per_s"] for r in rows if r["kernel"] == "unpack"))
    return 0
