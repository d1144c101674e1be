"""`python -m hifloat4 gpucheck`: the one GPU check, printing one `RESULT {json}` line.

On a CUDA device (at most ~3 minutes on one GPU) it measures what issue 9 asks of the
GPU path, on real Wan2.2-A14B shapes:
  exact       every backend that runs there against the shared HiF4 reference vectors
              (fp32, and bf16/fp16 where the inputs are representable), and the fused
              entry points (prepare_activation / prepare_weight incl. fp8 + scale /
              packed decode) against the CPU implementation, bit for bit, on random,
              tie-heavy, NaN/Inf, subnormal and saturating data;
  sync_free   the quantizers under torch.cuda.set_sync_debug_mode("error");
  act_quant   the activation quantizer's time against a plain copy of the same tensor;
  block       one A14B transformer block at the 480p token count (32,760 tokens x 2
              for cfg): bf16 vs W4A4 (fake-quant weights) vs packed, time and peak memory.
On a CPU the same checks run at small sizes with the CPU backends (and Triton when
TRITON_INTERPRET=1), so the command is known to work before a GPU is lent (CI runs it).
Exit status 1 if anything is not exact.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import backend
from ..format import quantize_dequantize
from ..linear import LayerQuant, prepare_activation, prepare_weight
from ..packed_linear import expand_weight, pack_weight
from ..quantize import LayersConfig, quantize_
from ..spec import saturate_
from ..wan_model import WanBlock, WanConfig, rope_angles
from .bench import best_seconds, peak_forward_bytes

DEFAULT_VECTORS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hif4_reference_vectors.npz"
MAIN_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Run with HIFLOAT4_BACKEND=name, restoring the caller's setting after."""
    old = os.environ.get(backend.ENV)
    os.environ[backend.ENV] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(backend.ENV, None)
        else:
            os.environ[backend.ENV] = old


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of values, NaN matching NaN (the conformance criterion)."""
    a, b = a.cpu(), b.cpu()
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


# --------------------------------------------------------------------------- exactness

def vector_cases(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    with np.load(path) as d:
        names = sorted({k.rsplit("/", 1)[0] for k in d.files})
        return {n: (torch.from_numpy(d[f"{n}/input"]), torch.from_numpy(d[f"{n}/expected"])) for n in names}


def check_vectors(cases: dict, device: torch.device) -> list[str]:
    """Names of failed (case, dtype) checks; [] when all match."""
    failed = []
    for name, (x, expected) in cases.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            if not same_bits(xd.float(), x):
                continue  # the input is not representable in this dtype
            want = saturate_(expected.clone(), dtype).to(dtype)  # fp16 saturates, Inf stays Inf
            if not same_bits(quantize_dequantize(xd.to(device)), want):
                failed.append(f"{name}/{str(dtype).removeprefix('torch.')}")
    return failed


def hard_inputs(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """float32 data with what breaks quantizers: heavy tails and outlier channels,
    values on rounding ties, NaN/Inf, subnormals, and magnitudes beyond HiF4's range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-6, 7, (1, cols), generator=g).float())
    x[:, :: max(1, cols // 7)] *= 64.0  # outlier channels
    q = rows // 8
    ties = torch.randint(0, 16, (q, cols), generator=g).float() + 0.5  # half-integers of a code step
    x[:q] = ties * torch.exp2(torch.randint(-8, 8, (q, 1), generator=g).float())
    x[q, ::5] = float("nan")
    x[q + 1, ::9] = float("inf")
    x[q + 2, ::11] = -float("inf")
    x[q + 3] *= 2.0**-130  # float32 subnormals
    x[q + 4] *= 1e6  # beyond 7 * 49152: saturates
    return x


def fused_cases(rows: int, cols: int) -> dict[str, Callable[[torch.device], torch.Tensor]]:
    """The fused entry points, each a function of the device it runs on."""
    g = torch.Generator().manual_seed(1)
    x32 = hard_inputs(rows, cols)
    mask = torch.exp2(torch.randn(cols, generator=g) * 2)
    w32 = hard_inputs(cols, cols, seed=2).nan_to_num(0.0, 1e3, -1e3)
    w8 = (w32 / 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.0123], dtype=torch.float32)
    with forced("torch"):
        packed = pack_weight(w32.bfloat16(), mask)
    cases: dict[str, Callable[[torch.device], torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        xd, wd = x32.to(dtype), w32.to(dtype)
        cases[f"activation/{name}"] = lambda d, xd=xd: prepare_activation(xd.to(d), mask.to(d))
        cases[f"weight/{name}"] = lambda d, wd=wd, dt=dtype: prepare_weight(wd.to(d), mask.to(d), dtype=dt)
    cases["weight/fp8_e4m3fn+scale"] = lambda d: prepare_weight(w8.to(d), mask.to(d), scale=scale.to(d),
                                                                dtype=torch.bfloat16)
    cases["packed_decode/bf16"] = lambda d: expand_weight(
        type(packed)(packed.data.to(d), packed.shape, packed.dim, packed.dtype), torch.bfloat16)
    return cases


def check_fused(cases: dict, refs: dict, device: torch.device) -> list[str]:
    """Names of the fused cases whose bits on `device` differ from the CPU reference."""
    return [name for name, fn in cases.items() if not same_bits(fn(device), refs[name])]


def sync_free(device: torch.device) -> bool | str:
    """True when the GPU quantizers run under sync debug mode "error" (CUDA only)."""
    x = torch.randn(512, 5120, device=device, dtype=torch.bfloat16)
    w = torch.randn(1024, 5120, device=device, dtype=torch.bfloat16)
    mask = torch.rand(5120, device=device) + 0.5
    scale = torch.full((1,), 0.5, device=device)
    packed = pack_weight(w, mask)
    steps = [lambda: prepare_activation(x, mask), lambda: prepare_weight(w, mask, dtype=torch.bfloat16),
             lambda: prepare_weight(w.to(torch.float8_e4m3fn), mask, scale=scale, dtype=torch.bfloat16),
             lambda: expand_weight(packed, torch.bfloat16)]
    for step in steps:
        step()  # warm-up: compiles kernels, caches tables
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for step in steps:
            step()
    except RuntimeError as e:
        return f"synchronised: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return True


# --------------------------------------------------------------------------- speed and memory

def act_quant(device: torch.device, backends: list[str], tokens: int, channels: int, repeat: int) -> dict:
    """prepare_activation (bf16 in and out) on each backend against a plain copy."""
    x = torch.randn(tokens, channels, device=device, dtype=torch.bfloat16)
    mask = torch.rand(channels, device=device) + 0.5
    copy_s = best_seconds(lambda: x.clone(), repeat, device)
    out = {"shape": [tokens, channels], "dtype": "bfloat16", "copy_ms": copy_s * 1e3,
           "input_bytes": x.numel() * x.element_size()}
    for name in backends:
        with forced(name):
            quant_s = best_seconds(lambda: prepare_activation(x, mask), repeat, device)
            peak = peak_forward_bytes(lambda: prepare_activation(x, mask), device)
        out[name] = {"quant_ms": quant_s * 1e3, "copy_fraction": copy_s / quant_s,
                     "extra_bytes_beyond_output": peak - x.numel() * x.element_size()}
    return out


def block_bench(device: torch.device, cfg: WanConfig, grid: tuple[int, int, int], batch: int, text_len: int,
                repeat: int) -> dict:
    """One Wan block: bf16 vs W4A4 (HiF4Linear: bf16 cached weights, activations quantized
    per call) vs packed (PackedHiF4Linear: weights decoded per call)."""
    torch.manual_seed(0)
    with torch.device(device):
        block = WanBlock(cfg).to(torch.bfloat16).eval()
        tokens = grid[0] * grid[1] * grid[2]
        x = torch.randn(batch, tokens, cfg.dim, dtype=torch.bfloat16)
        e0 = torch.randn(batch, 6, cfg.dim, dtype=torch.bfloat16) * 0.1
        context = torch.randn(batch, text_len, cfg.dim, dtype=torch.bfloat16)
        angles = rope_angles(grid, cfg.head_dim, device=device)
    masks = {n: torch.exp2(torch.randn(block.get_submodule(n).in_features, device=device) * 0.5)
             for n in MAIN_LINEARS}
    layers = {n: LayerQuant(m) for n, m in masks.items()}
    variants = {"bf16": block,
                "w4a4": quantize_(copy.deepcopy(block), LayersConfig(layers)),
                "packed": quantize_(copy.deepcopy(block), LayersConfig(layers), packed=True)}
    rows = {}
    with torch.no_grad():
        outs = {name: m(x, e0, angles, context, None) for name, m in variants.items()}
        if not same_bits(outs["w4a4"], outs["packed"]):
            raise AssertionError("packed and fake-quant W4A4 blocks disagree: refusing to report speeds")
        del outs
        for name, m in variants.items():
            fn = lambda m=m: m(x, e0, angles, context, None)  # noqa: E731
            rows[name] = {"ms": best_seconds(fn, repeat, device) * 1e3, "peak_bytes": peak_forward_bytes(fn, device)}
    largest_input = batch * tokens * cfg.ffn_dim * 2  # ffn.2's bf16 input
    return {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.heads, "tokens": tokens, "batch": batch,
            "variants": rows,
            "w4a4_over_bf16": rows["w4a4"]["ms"] / rows["bf16"]["ms"],
            "packed_over_bf16": rows["packed"]["ms"] / rows["bf16"]["ms"],
            "w4a4_extra_peak_over_largest_input":
                (rows["w4a4"]["peak_bytes"] - rows["bf16"]["peak_bytes"]) / largest_input,
            "packed_extra_peak_over_largest_input":
                (rows["packed"]["peak_bytes"] - rows["bf16"]["peak_bytes"]) / largest_input}


# --------------------------------------------------------------------------- driver

def run(device: torch.device, vectors: Path | None, small: bool, only: list[str] | None = None) -> dict:
    cuda = device.type == "cuda"
    backends = [b for b in backend.available(device) if only is None or b in only]
    result: dict = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                    "torch": torch.__version__, "backends": backends}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    cases = vector_cases(vectors) if vectors is not None and vectors.exists() else None
    result["vectors"] = str(vectors) if cases is not None else "missing"
    fused = fused_cases(*((64, 256) if small else (1024, 5120)))
    with forced("torch"):  # the CPU reference: the torch path, which CI checks against the C++ kernel
        refs = {name: fn(torch.device("cpu")) for name, fn in fused.items()}
    exact = {}
    for name in result["backends"]:
        with forced(name):
            failures = (check_vectors(cases, device) if cases is not None else []) + check_fused(fused, refs, device)
        exact[name] = failures or True
    result["exact"] = exact
    print("exact: " + json.dumps(exact), flush=True)
    result["sync_free"] = sync_free(device) if cuda else "not applicable on cpu"
    if small:
        result["act_quant"] = act_quant(device, backends, 256, 1024, repeat=3)
        result["block"] = block_bench(device, WanConfig(dim=256, ffn_dim=512, num_layers=1, num_heads=2),
                                      (2, 4, 4), batch=2, text_len=16, repeat=2)
    else:  # Wan2.2-A14B at 480p, 81 frames: 21 x 30 x 52 = 32,760 tokens, x 2 for cfg
        result["act_quant"] = act_quant(device, backends, 2 * 32760, 13824, repeat=5)
        print("act_quant: " + json.dumps(result["act_quant"]), flush=True)
        result["block"] = block_bench(device, WanConfig(dim=5120, ffn_dim=13824, num_layers=1),
                                      (21, 30, 52), batch=2, text_len=512, repeat=3)
    result["ok"] = all(v is True for v in exact.values()) and result["sync_free"] is not False and \
        not str(result["sync_free"]).startswith("synchronised")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifloat4 gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS, help="hif4_reference_vectors.npz")
    p.add_argument("--small", action="store_true", help="small sizes (the default on CPU)")
    p.add_argument("--backend", action="append", choices=("cpp", "triton", "torch"),
                   help="check only this backend (repeatable; default: every backend that runs on the device)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = run(device, args.vectors, args.small or device.type != "cuda", args.backend)
    print("RESULT " + json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
