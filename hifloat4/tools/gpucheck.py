"""`python -m hifloat4 gpucheck`: the one GPU check, printing one `RESULT {json}` line.

On a CUDA device (a few minutes on one GPU) it measures what users pay, on real
Wan2.2-A14B shapes (480p, 81 frames: 32,760 tokens, x 2 for cfg):
  exact       every backend against the HiF4 reference vectors (fp32, and bf16/fp16 where
              the inputs are representable), and the fused entry points (activation and
              weight quantizers incl. fp8 + scale, packing to planar rows, the one-launch
              decode, the int8 operands and the int8 GEMM) against the CPU implementation,
              bit for bit, on random, tie-heavy, NaN/Inf, subnormal and saturating data;
  sync_free   the per-call GPU paths under torch.cuda.set_sync_debug_mode("error");
  act_quant   the activation quantizer (and the int8 encoder) against a plain copy, with a
              sweep of launch tiles;
  decode      the packed-weight decode of an ffn weight against a copy's bandwidth;
  int8_gemm   the int8 GEMM on the two ffn layers against F.linear in bf16, and its error
              against a float64 product of the same HiF4 values;
  block       one A14B block: bf16 vs W4A4 (bf16 fake-quant weights) vs packed (decoded per
              call) vs int8 (packed, int8 GEMM): time and peak memory;
  model_call  the 40-block A14B call: a one-block model at real size plus 39 block times;
  apply_vram  main-layer weight memory of one A14B expert (400 layers at real shapes, built
              on the device from an fp8_scaled-like source) as Apply held it before (fp8 +
              a bf16 Q(W/m) per layer) and holds it now (planar codes), and `patch_s`, the
              time to pack all 400 layers;
  lora        what a rank-64 LoRA costs a packed ffn layer: bypass (the low-rank term added
              per call, factors on the host as ComfyUI keeps a LoRA, and on the device) and
              merge (dequantize, add the delta, re-pack: once per layer and LoRA set);
  calibration the cost of observing a block during calibration, when that module is present;
  compute_auto whether int8 measured faster here, against linear.INT8_MEASURED_FASTER.
On a CPU the same keys come out at small sizes with the CPU backends (and Triton's
interpreter when TRITON_INTERPRET=1), so the command is known to work before a GPU is lent
(CI runs it). Each section that fails records its error and the run goes on. Exit status 1
if anything is not exact, not sync-free, or failed.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import backend, linear, wan
from ..lora import LowRank, dequantize_packed, lowrank_term
from ..format import quantize_dequantize
from ..layout import to_planar
from ..linear import LayerQuant, prepare_activation, prepare_weight, w4a4_linear_packed
from ..packed_linear import decode_weight, pack_weight, planar_weight
from ..quantize import LayersConfig, quantize_
from ..spec import GROUP_SIZE, saturate_
from ..wan_model import WanBlock, WanConfig, WanModel, rope_angles
from . import calibration_check
from .bench import best_seconds, peak_forward_bytes

DEFAULT_VECTORS = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "hif4_reference_vectors.npz"
MAIN_LINEARS = wan.MAIN_SUFFIXES
A14B = WanConfig(dim=5120, ffn_dim=13824, num_layers=1)
GRID_480P = (21, 30, 52)  # latent frames x height/16 x width/16: 32,760 tokens
SMALL = WanConfig(dim=256, ffn_dim=512, num_layers=1, num_heads=2)
GRID_SMALL = (2, 4, 4)


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _int8_values(codes: torch.Tensor, quarter: torch.Tensor, k: int) -> torch.Tensor:
    """The values an int8 operand stands for, code * S/4, float32 (exact), NaN-scaled groups NaN."""
    codes, quarter = codes.cpu(), quarter.cpu()
    return (codes.float().view(codes.shape[0], -1, GROUP_SIZE) * quarter.T[:, :, None]).view(codes.shape[0], -1)[:, :k]


def _group_order_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The int8 GEMM's arithmetic on the CPU: exact per-group dots of the HiF4 values, summed in
    group order in float32 (each term exact), plus the bias, rounded once to bf16."""
    k = x.shape[1]
    pad = (-k) % GROUP_SIZE
    qx = F.pad(quantize_dequantize(x.float()).double(), (0, pad)).view(x.shape[0], -1, GROUP_SIZE)
    qw = F.pad(quantize_dequantize(w.float()).double(), (0, pad)).view(w.shape[0], -1, GROUP_SIZE)
    acc = torch.zeros(x.shape[0], w.shape[0])
    for g in range(qx.shape[1]):
        acc = acc + (qx[:, g] @ qw[:, g].T).float()
    return (acc + bias.float()).to(torch.bfloat16)


def fused_cases(rows: int, cols: int, int8: bool) -> tuple[dict[str, Callable[[torch.device], torch.Tensor]],
                                                           dict[str, Callable[[], torch.Tensor]]]:
    """(fused entry points as functions of the device, CPU references where they are not the
    same function on the CPU torch backend)."""
    g = torch.Generator().manual_seed(1)
    x32 = hard_inputs(rows, cols)
    mask = torch.exp2(torch.randn(cols, generator=g) * 2)
    w32 = hard_inputs(cols, cols, seed=2).nan_to_num(0.0, 1e3, -1e3)
    w8 = (w32 / 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.tensor([0.0123], dtype=torch.float32)
    with forced("torch"):
        planar = to_planar(pack_weight(w32.bfloat16(), mask).data)
    cases: dict[str, Callable[[torch.device], torch.Tensor]] = {}
    refs: dict[str, Callable[[], torch.Tensor]] = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        xd, wd = x32.to(dtype), w32.to(dtype)
        cases[f"activation/{name}"] = lambda d, xd=xd: prepare_activation(xd.to(d), mask.to(d))
        cases[f"weight/{name}"] = lambda d, wd=wd, dt=dtype: prepare_weight(wd.to(d), mask.to(d), dtype=dt)
    cases["weight/fp8_e4m3fn+scale"] = lambda d: prepare_weight(w8.to(d), mask.to(d), scale=scale.to(d),
                                                                dtype=torch.bfloat16)
    cases["planar_pack/fp8_e4m3fn+scale"] = lambda d: planar_weight(w8.to(d), mask.to(d), scale=scale.to(d))
    cases["planar_pack/bfloat16"] = lambda d: planar_weight(w32.bfloat16().to(d), mask.to(d))
    cases["packed_decode/bf16"] = lambda d: decode_weight(planar.to(d), cols, torch.bfloat16)
    cases["packed_decode/fp16"] = lambda d: decode_weight(planar.to(d), cols, torch.float16)
    if int8:  # at most 256 x 1024 @ 1024 x 1024: the CPU reference sums group by group in float64
        k8 = min(cols, 1024)
        xb = x32[:256, :k8].nan_to_num(0.0, 1e3, -1e3).bfloat16()
        wb = w32[:k8, :k8].bfloat16()
        m8 = mask[:k8]
        bias = torch.randn(k8, generator=g).bfloat16()
        with forced("torch"):
            planar8 = to_planar(pack_weight(wb, m8).data)

        def encoded(d: torch.device) -> torch.Tensor:
            codes, quarter = backend.kernels(d).int8.encode_rows(xb.to(d), m8.to(d))
            return _int8_values(codes, quarter, k8)

        def weight_rows(d: torch.device) -> torch.Tensor:
            codes, quarter = backend.kernels(d).int8.weight_rows(planar8.to(d), k8)
            return _int8_values(codes, quarter, k8)

        def gemm(d: torch.device) -> torch.Tensor:
            k = backend.kernels(d).int8
            a, qa = k.encode_rows(xb.to(d), None)
            w, qw = k.encode_rows(wb.to(d), None)
            return k.gemm(a, qa, w, qw, bias.to(d), torch.bfloat16)

        cases["int8_encode/bf16"] = encoded
        refs["int8_encode/bf16"] = lambda: prepare_activation(xb, m8, dtype=torch.float32)
        cases["int8_weight_rows"] = weight_rows
        refs["int8_weight_rows"] = lambda: prepare_weight(wb, m8)
        cases["int8_gemm/bf16"] = gemm
        refs["int8_gemm/bf16"] = lambda: _group_order_product(xb, wb, bias)
    return cases, refs


def check_fused(cases: dict, refs: dict, device: torch.device) -> list[str]:
    """Names of the fused cases whose values on `device` differ from the CPU reference
    (int8 operands compare values: an int8 code has no -0)."""
    failed = []
    for name, fn in cases.items():
        got, want = fn(device).cpu(), refs[name]
        ok = same_bits(got, want) if not name.startswith("int8_") else \
            got.shape == want.shape and bool(((got == want) | (got.isnan() & want.isnan())).all())
        if not ok:
            failed.append(name)
    return failed


def sync_free(device: torch.device, cfg: WanConfig, tokens: int) -> bool | str:
    """True when the per-call GPU paths run under sync debug mode "error" (CUDA only)."""
    x = torch.randn(tokens, cfg.dim, device=device, dtype=torch.bfloat16)
    w = torch.randn(cfg.ffn_dim, cfg.dim, device=device, dtype=torch.bfloat16)
    mask = torch.rand(cfg.dim, device=device) + 0.5
    scale = torch.full((1,), 0.5, device=device)
    planar = planar_weight(w, mask)
    kernels = backend.kernels(device)
    quant = LayerQuant(mask)
    steps = [lambda: prepare_activation(x, mask), lambda: prepare_weight(w, mask, dtype=torch.bfloat16),
             lambda: prepare_weight(w.to(torch.float8_e4m3fn), mask, scale=scale, dtype=torch.bfloat16),
             lambda: kernels.pack_rows(w, mask, True, None) if kernels.pack_rows else None,
             lambda: decode_weight(planar, cfg.dim, torch.bfloat16),
             lambda: w4a4_linear_packed(x, planar, cfg.dim, None, quant, "simulate")]
    if kernels.int8 is not None:
        steps.append(lambda: w4a4_linear_packed(x, planar, cfg.dim, None, quant, "int8"))
    lora = [LowRank(torch.randn(64, cfg.dim, dtype=torch.bfloat16), torch.randn(cfg.ffn_dim, 64, dtype=torch.bfloat16),
                    0.5)]  # on the host, as ComfyUI keeps a LoRA: the bypass moves it per call
    steps.append(lambda: lowrank_term(x, lora))
    for step in steps:
        step()  # warm-up: compiles kernels, autotunes, caches tables
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

def act_quant(device: torch.device, backends: list[str], tokens: int, channels: int, repeat: int,
              tiles: list[tuple[int, int, int]]) -> dict:
    """prepare_activation (bf16 in and out) on each backend against a plain copy; on Triton also
    the int8 encoder and each launch tile of the quantizer."""
    x = torch.randn(tokens, channels, device=device, dtype=torch.bfloat16)
    mask = torch.rand(channels, device=device) + 0.5
    copy_s = best_seconds(lambda: x.clone(), repeat, device)
    out = {"shape": [tokens, channels], "dtype": "bfloat16", "copy_ms": copy_s * 1e3,
           "input_bytes": x.numel() * x.element_size()}
    for name in backends:
        with forced(name):
            quant_s = best_seconds(lambda: prepare_activation(x, mask), repeat, device)
            peak = peak_forward_bytes(lambda: prepare_activation(x, mask), device)
            row = {"quant_ms": quant_s * 1e3, "copy_fraction": copy_s / quant_s,
                   "extra_bytes_beyond_output": peak - x.numel() * x.element_size()}
            int8 = backend.kernels(device).int8
            if int8 is not None:  # reads 2 bytes, writes 1 + 4/64: compare with the bytes a copy moves
                enc_s = best_seconds(lambda: int8.encode_rows(x, mask), repeat, device)
                row["int8_encode_ms"] = enc_s * 1e3
                row["int8_encode_copy_fraction"] = copy_s * (2 + 1 + 4 / 64) / 4 / enc_s
            if name == "triton" and tiles:
                from .. import triton_kernels as tk
                sweep = {}
                for tile in tiles:
                    try:
                        t = best_seconds(lambda tile=tile: tk.quantize_rows(x, mask, tile=tile), repeat, device)
                        sweep["x".join(map(str, tile))] = {"quant_ms": t * 1e3, "copy_fraction": copy_s / t}
                    except Exception as e:  # a tile that does not compile here
                        sweep["x".join(map(str, tile))] = {"error": f"{type(e).__name__}: {e}"[:200]}
                row["tiles"] = sweep
        out[name] = row
    return out


def decode_bench(device: torch.device, out_f: int, in_f: int, repeat: int, tiles: list[tuple[int, int, int]]) -> dict:
    """The one-launch decode of a planar weight into bf16 against a copy of the bf16 weight."""
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16)
    mask = torch.rand(in_f, device=device) + 0.5
    planar = planar_weight(w, mask)
    copy_s = best_seconds(lambda: w.clone(), repeat, device)
    dec_s = best_seconds(lambda: decode_weight(planar, in_f, torch.bfloat16), repeat, device)
    moved = planar.numel() + w.numel() * 2  # read codes, write bf16
    out = {"shape": [out_f, in_f], "decode_ms": dec_s * 1e3, "copy_ms": copy_s * 1e3,
           "bandwidth_fraction_of_copy": (moved / dec_s) / (2 * w.numel() * 2 / copy_s)}
    if backend.for_device(device) == "triton" and tiles:
        from .. import triton_kernels as tk
        sweep = {}
        for tile in tiles:
            buf = torch.empty(out_f, in_f, device=device, dtype=torch.bfloat16)
            try:
                t = best_seconds(lambda tile=tile: tk.decode_rows(planar, buf, tile=tile), repeat, device)
                sweep["x".join(map(str, tile))] = {"decode_ms": t * 1e3}
            except Exception as e:
                sweep["x".join(map(str, tile))] = {"error": f"{type(e).__name__}: {e}"[:200]}
        out["tiles"] = sweep
    return out


def _rel_err_vs_fp64(x: torch.Tensor, w: torch.Tensor, got: torch.Tensor, rows: int) -> float:
    """max over sampled rows of |got - exact| / sum_g |dot_g| (the float32 summation error
    relative to the magnitudes summed), with exact per-group dots in float64."""
    idx = torch.linspace(0, x.shape[0] - 1, rows, device=x.device).long()
    k = x.shape[1]
    pad = (-k) % GROUP_SIZE
    qx = F.pad(quantize_dequantize(x[idx]).double(), (0, pad)).view(rows, -1, GROUP_SIZE)
    qw = F.pad(quantize_dequantize(w).double(), (0, pad)).view(w.shape[0], -1, GROUP_SIZE)
    worst = 0.0
    for r in range(0, rows, 16):
        terms = torch.einsum("mgk,ngk->gmn", qx[r : r + 16], qw)
        err = (got[idx[r : r + 16]].double() - terms.sum(0)).abs() / terms.abs().sum(0).clamp_min(1e-300)
        worst = max(worst, float(err.max()))
    return worst


def int8_gemm_bench(device: torch.device, shapes: list[tuple[int, int, int]], repeat: int, err_rows: int) -> list[dict]:
    """The int8 GEMM (pre-encoded operands) and the whole int8 linear (encode + weight
    expansion + GEMM) against F.linear in bf16, on (M, K) @ (K, N) layers."""
    int8 = backend.kernels(device).int8
    rows = []
    for m, k, n in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=device, dtype=torch.bfloat16) / math.sqrt(k)).to(torch.bfloat16)
        a, qa = int8.encode_rows(x, None)
        planar = planar_weight(w, torch.ones(k, device=device))
        b, qb = int8.weight_rows(planar, k)
        gemm_s = best_seconds(lambda: int8.gemm(a, qa, b, qb, None, torch.bfloat16), repeat, device)
        tuning = int8.tuning()
        lin_s = best_seconds(lambda: w4a4_linear_packed(x, planar, k, None, LayerQuant(torch.ones(k, device=device)),
                                                        "int8"), repeat, device)
        bf16_s = best_seconds(lambda: F.linear(x, w), repeat, device)
        got = int8.gemm(a, qa, b, qb, None, torch.float32)
        rows.append({"shape": [m, k, n], "ms": gemm_s * 1e3, "linear_ms": lin_s * 1e3, "bf16_ms": bf16_s * 1e3,
                     "speedup": bf16_s / gemm_s, "linear_speedup": bf16_s / lin_s,
                     "tflops": 2 * m * k * n / gemm_s / 1e12,
                     "max_rel_err_vs_fp64": _rel_err_vs_fp64(x, w, got, min(err_rows, m)), "tuning": tuning})
    return rows


def _block_inputs(device: torch.device, cfg: WanConfig, grid: tuple[int, int, int], batch: int, text_len: int):
    tokens = grid[0] * grid[1] * grid[2]
    with torch.device(device):
        x = torch.randn(batch, tokens, cfg.dim, dtype=torch.bfloat16)
        e0 = torch.randn(batch, 6, cfg.dim, dtype=torch.bfloat16) * 0.1
        context = torch.randn(batch, text_len, cfg.dim, dtype=torch.bfloat16)
    return x, e0, rope_angles(grid, cfg.head_dim, device=device), context


def _variants(module: torch.nn.Module, names: tuple[str, ...], device: torch.device, int8: bool) -> dict:
    """bf16, W4A4 (HiF4Linear: bf16 fake-quant weights), packed (decoded per call) and, where
    the backend has it, int8 (packed, int8 GEMM), all with the same masks."""
    masks = {n: torch.exp2(torch.randn(module.get_submodule(n).in_features, device=device) * 0.5) for n in names}
    layers = {n: LayerQuant(m) for n, m in masks.items()}
    out = {"bf16": module,
           "w4a4": quantize_(copy.deepcopy(module), LayersConfig(layers)),
           "packed": quantize_(copy.deepcopy(module), LayersConfig(layers, compute="simulate"), packed=True)}
    if int8:
        out["int8"] = quantize_(copy.deepcopy(module), LayersConfig(layers, compute="int8"), packed=True)
    return out


def block_bench(device: torch.device, cfg: WanConfig, grid: tuple[int, int, int], batch: int, text_len: int,
                repeat: int) -> dict:
    """One Wan block in each variant of `_variants`: time and peak memory; packed must equal
    W4A4 bit for bit (nothing is reported otherwise), int8 is compared by relative L2."""
    torch.manual_seed(0)
    with torch.device(device):
        block = WanBlock(cfg).to(torch.bfloat16).eval()
    args = _block_inputs(device, cfg, grid, batch, text_len)
    int8 = backend.kernels(device).int8 is not None
    variants = _variants(block, MAIN_LINEARS, device, int8)
    rows = {}
    with torch.no_grad():
        outs = {name: m(*args, None) for name, m in variants.items()}
        if not same_bits(outs["w4a4"], outs["packed"]):
            raise AssertionError("packed and fake-quant W4A4 blocks disagree: refusing to report speeds")
        int8_rel = (float((outs["int8"].float() - outs["w4a4"].float()).norm() / outs["w4a4"].float().norm())
                    if int8 else None)
        del outs
        for name, m in variants.items():
            fn = lambda m=m: m(*args, None)  # noqa: E731
            rows[name] = {"ms": best_seconds(fn, repeat, device) * 1e3, "peak_bytes": peak_forward_bytes(fn, device)}
    largest_input = batch * grid[0] * grid[1] * grid[2] * cfg.ffn_dim * 2  # ffn.2's bf16 input
    result = {"dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "heads": cfg.heads, "tokens": grid[0] * grid[1] * grid[2],
              "batch": batch, "variants": rows}
    for name in rows:
        if name != "bf16":
            result[f"{name}_over_bf16"] = rows[name]["ms"] / rows["bf16"]["ms"]
            result[f"{name}_extra_peak_over_largest_input"] = (rows[name]["peak_bytes"] - rows["bf16"]["peak_bytes"]) \
                / largest_input
    if int8_rel is not None:
        result["int8_rel_l2_vs_w4a4"] = int8_rel
    return result


def model_call(device: torch.device, cfg: WanConfig, grid: tuple[int, int, int], batch: int, text_len: int,
               blocks: int, block: dict, repeat: int) -> dict:
    """The whole model call at `blocks` blocks: a one-block WanModel at real size (patch and
    text embedding, time projection, head) in each variant, plus (blocks - 1) block times."""
    torch.manual_seed(0)
    with torch.device(device):
        model = WanModel(cfg).to(torch.bfloat16).eval()
        x = torch.randn(batch, cfg.in_dim, grid[0], grid[1] * cfg.patch_size[1], grid[2] * cfg.patch_size[2],
                        dtype=torch.bfloat16)
        t = torch.full((batch,), 900.0)
        context = torch.randn(batch, text_len, cfg.text_dim, dtype=torch.bfloat16)
    names = tuple(f"blocks.0.{n}" for n in MAIN_LINEARS)
    out = {"blocks": blocks}
    with torch.no_grad():
        for name, m in _variants(model, names, device, backend.kernels(device).int8 is not None).items():
            one = best_seconds(lambda m=m: m(x, t, context), repeat, device)
            out[f"{name}_ms"] = one * 1e3 + (blocks - 1) * block["variants"][name]["ms"]
    return out


def apply_vram(device: torch.device, cfg: WanConfig, layers: int) -> dict:
    """Main-layer weight memory of one expert under Apply, from an fp8_scaled-like source
    (fp8 weights with a per-tensor scale), measured with memory_allocated: before (the fp8
    weight plus a bf16 Q(W/m) per layer) and now (planar codes; the fp8 original leaves
    the device, to ComfyUI's backup on the offload device). Also the time to pack them."""
    shapes = [(cfg.dim, cfg.dim)] * 8 + [(cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)]
    shapes = [shapes[i % len(shapes)] for i in range(layers)]
    count = sum(o * i for o, i in shapes)
    g = torch.Generator(device=device).manual_seed(0)

    def source(o: int, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = (torch.randn(o, i, device=device, generator=g) * 8).to(torch.float8_e4m3fn)
        return w, torch.full((1,), 0.01, device=device), torch.rand(i, device=device, generator=g) + 0.5

    _sync(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    held = []
    for o, i in shapes:  # before: fp8 source + its bf16 Q(W/m) cache
        w, s, m = source(o, i)
        held.append((w, prepare_weight(w, m, scale=s, dtype=torch.bfloat16)))
    _sync(device)
    before = (torch.cuda.memory_allocated(device) - base) if device.type == "cuda" else \
        sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in held)
    del held
    sources = [source(o, i) for o, i in shapes]
    _sync(device)
    t0 = time.perf_counter()
    codes = [planar_weight(w, m, scale=s) for w, s, m in sources]
    _sync(device)
    patch_s = time.perf_counter() - t0
    del sources  # to the offload device in ComfyUI: off this one
    _sync(device)
    after = (torch.cuda.memory_allocated(device) - base) if device.type == "cuda" else sum(c.numel() for c in codes)
    return {"source": "fp8_e4m3fn + per-tensor scale (fp8_scaled)", "main_weight_count": count, "layers": layers,
            "main_weight_bytes_before": before, "main_weight_bytes_after": after,
            "bytes_per_weight_before": before / count, "bytes_per_weight_after": after / count, "patch_s": patch_s}


def lora_bench(device: torch.device, cfg: WanConfig, tokens: int, rank: int, repeat: int) -> list[dict]:
    """A rank-`rank` LoRA on the two packed ffn layers (hifloat4.lora), as the packed layers
    of nodes/comfy run it: the packed call alone; bypass, the call plus the low-rank term with
    the factors on the host (ComfyUI's place for a LoRA: moved per call, no device memory
    held) and on the device; merge, the once-per-LoRA-set re-pack of W + dW."""
    rows = []
    for out_f, in_f in ((cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)):
        x = torch.randn(tokens, in_f, device=device, dtype=torch.bfloat16)
        w = torch.randn(out_f, in_f, device=device) / math.sqrt(in_f)
        mask = torch.rand(in_f, device=device) + 0.5
        planar, quant = planar_weight(w, mask), LayerQuant(mask)
        down = torch.randn(rank, in_f, dtype=torch.bfloat16) / math.sqrt(in_f)
        up = torch.randn(out_f, rank, dtype=torch.bfloat16) * 0.01
        host = [LowRank(down, up, 1.0)]
        on_device = [LowRank(down.to(device), up.to(device), 1.0)]

        def packed():
            return w4a4_linear_packed(x, planar, in_f, None, quant, "simulate")

        packed_s = best_seconds(packed, repeat, device)
        host_s = best_seconds(lambda: packed().add_(lowrank_term(x, host)), repeat, device)
        device_s = best_seconds(lambda: packed().add_(lowrank_term(x, on_device)), repeat, device)
        delta = (up.float() @ down.float()).to(device)
        merge_s = best_seconds(lambda: planar_weight(dequantize_packed(planar, in_f, mask) + delta, mask), repeat,
                               device)
        rows.append({"shape": [tokens, in_f, out_f], "rank": rank, "packed_ms": packed_s * 1e3,
                     "bypass_host_ms": host_s * 1e3, "bypass_device_ms": device_s * 1e3,
                     "bypass_host_over_packed": host_s / packed_s, "bypass_device_over_packed": device_s / packed_s,
                     "merge_ms_per_layer": merge_s * 1e3})
    return rows


# --------------------------------------------------------------------------- driver

def _section(result: dict, key: str, fn: Callable[[], object], out: Path | None) -> None:
    """Run one section: its value, or its error (the run goes on); print and save progress."""
    t0 = time.perf_counter()
    try:
        result[key] = fn()
    except Exception as e:  # report, never hide
        result[key] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        result.setdefault("failed_sections", []).append(key)
    result.setdefault("section_s", {})[key] = round(time.perf_counter() - t0, 2)
    print(f"{key}: " + json.dumps(result[key], default=str)[:3000], flush=True)
    if out is not None:
        out.write_text(json.dumps(result, default=str))


def speed_sections(result: dict, device: torch.device, small: bool, backends: list[str], out: Path | None) -> None:
    """Every measuring section, in order; each records its value or its error in `result`."""
    cuda = device.type == "cuda"
    int8_here = backend.kernels(device).int8 is not None
    cfg, grid, batch, text_len = (SMALL, GRID_SMALL, 2, 16) if small else (A14B, GRID_480P, 2, 512)
    tokens = batch * grid[0] * grid[1] * grid[2]
    if cuda:
        _section(result, "sync_free", lambda: sync_free(device, cfg, 4096), out)
    else:
        result["sync_free"] = "not applicable on cpu"
    tiles = [(8, 4, 4), (16, 4, 4), (8, 4, 8), (4, 4, 4), (16, 8, 4)] if cuda else []
    repeat = 5 if cuda else 2
    _section(result, "act_quant", lambda: act_quant(device, backends, tokens, cfg.ffn_dim, repeat, tiles), out)
    _section(result, "decode", lambda: decode_bench(device, cfg.ffn_dim, cfg.dim, repeat, tiles), out)
    if int8_here:
        shapes = [(tokens, cfg.dim, cfg.ffn_dim), (tokens, cfg.ffn_dim, cfg.dim)]
        _section(result, "int8_gemm", lambda: int8_gemm_bench(device, shapes, repeat, 256 if cuda else 16), out)
    _section(result, "block", lambda: block_bench(device, cfg, grid, batch, text_len, 3 if cuda else 1), out)
    if isinstance(result.get("block"), dict) and "variants" in result["block"]:
        _section(result, "model_call", lambda: model_call(device, cfg, grid, batch, text_len, 40, result["block"],
                                                          3 if cuda else 1), out)
    _section(result, "apply_vram", lambda: apply_vram(device, cfg, 400 if cuda else 20), out)
    if isinstance(result.get("apply_vram"), dict) and "patch_s" in result["apply_vram"]:
        result["patch_s"] = result["apply_vram"]["patch_s"]
    _section(result, "lora", lambda: lora_bench(device, cfg, tokens, 64 if cuda else 8, repeat), out)
    _section(result, "calibration", lambda: calibration_check.calibration_section(device, small), out)


def run(device: torch.device, vectors: Path | None, small: bool, only: list[str] | None = None,
        out: Path | None = None) -> dict:
    cuda = device.type == "cuda"
    backends = [b for b in backend.available(device) if only is None or b in only]
    result: dict = {"device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
                    "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
                    "torch": torch.__version__, "backends": backends}
    try:
        import triton
        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    cases = vector_cases(vectors) if vectors is not None and vectors.exists() else None
    result["vectors"] = str(vectors) if cases is not None else "missing"
    fused, refs = fused_cases(*((64, 256) if small else (1024, 5120)), int8="triton" in backends)
    with forced("torch"):  # the CPU reference: the torch path, which CI checks against the C++ kernel
        refs = {name: (refs[name]() if name in refs else fn(torch.device("cpu"))) for name, fn in fused.items()}

    def exact() -> dict:
        res = {}
        for name in backends:
            with forced(name):
                mine = {k: v for k, v in fused.items() if not k.startswith("int8_") or name == "triton"}
                failures = (check_vectors(cases, device) if cases is not None else []) + check_fused(mine, refs, device)
            res[name] = failures or True
        return res

    _section(result, "exact", exact, out)
    # The speed sections run on the device's fastest backend: Triton where it runs (on a CPU,
    # its interpreter: a smoke test of the same code at small sizes), else the default.
    with forced("triton") if "triton" in backends else contextlib.nullcontext():
        speed_sections(result, device, small, backends, out)
    gemm = result.get("int8_gemm")
    measured = isinstance(gemm, list) and bool(gemm) and isinstance(result.get("block"), dict) \
        and "int8_over_bf16" in result["block"]
    result["compute_auto"] = {
        "capability": result["capability"],
        "int8_faster_measured": (all(r["speedup"] > 1 for r in gemm) and result["block"]["int8_over_bf16"]
                                 < result["block"]["w4a4_over_bf16"]) if measured else None,
        "int8_faster_in_code": linear.INT8_MEASURED_FASTER.get(tuple(result["capability"]))
        if result["capability"] else None}
    result["ok"] = all(v is True for v in result.get("exact", {}).values()) and not result.get("failed_sections") \
        and result["sync_free"] is not False and not str(result["sync_free"]).startswith("synchronised")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifloat4 gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vectors", type=Path, default=DEFAULT_VECTORS, help="hif4_reference_vectors.npz")
    p.add_argument("--small", action="store_true", help="small sizes (the default on CPU)")
    p.add_argument("--backend", action="append", choices=("cpp", "triton", "torch"),
                   help="check only this backend (repeatable; default: every backend that runs on the device)")
    p.add_argument("--out", type=Path, help="also write the result JSON here after every section (partial runs)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    result = run(device, args.vectors, args.small or device.type != "cuda", args.backend, args.out)
    print("RESULT " + json.dumps(result, default=str))
    if args.out is not None:
        args.out.write_text(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
