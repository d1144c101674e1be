"""`python -m hifloat4 demo`: the whole method end to end on an embedded tiny Wan2.2
T2V model pair, on a CPU.

What it does, in order (timed per phase):
  build      two tiny Wan2.2-shaped experts (hifloat4.tools.tiny_wan, with the outlier
             channels real DiTs have), weights rounded to bf16; synthetic umT5-like
             prompt contexts: calibration prompts and separate held-out prompts
  calibrate  two-expert sampling (flow Euler, shift 5, cfg batched, switch at
             sigma 0.875) over the calibration prompts with observers on all main
             Linears -> tail-aware PTQ state (p99.9, alpha 0.5: the paper's defaults)
  save/load  save_state to a .safetensors file, load_state (full validation)
  quantize   W4A4 copies of both experts with four mask choices derived from the
             one reloaded state: none (m = 1), max (classic SmoothQuant), tail
             (Tail-Aware HiFloat4), tail + block Hadamard rotation
  evaluate   on the held-out prompts only: relative L2 error of the model output at
             one fixed step per expert (same input for every model), of the final
             latent (full sampling, same seed), and the mean per-layer SQNR

The reference ("bf16") is the same model pair with bf16-rounded weights computing in
fp32: W4A4 variants use those very weights, so every difference is quantization.
Settings are fixed a priori (paper defaults); nothing here is tuned per method. The
last line is `RESULT {json}` for scripts and tests.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

import torch
from torch import nn

from .. import rotation, wan
from ..calibrate import CalibConfig, calibrate
from ..experts import HIGH, LOW
from ..format import quantize_dequantize
from ..plan import W4A4Config
from ..quantize import quantize_
from ..spec import GROUP_SIZE
from ..state import layer_nbytes, load_state, save_state, state_nbytes
from ..wan_model import WanConfig, WanModel
from . import measure
from .measure import PairConfig

METHODS = ("none", "max", "tail", "tail_rotation")
METHOD_LABELS = {"none": "W4A4, no smoothing", "max": "W4A4, max (SmoothQuant)",
                 "tail": "W4A4, tail-aware p99.9", "tail_rotation": "W4A4, tail-aware + Hadamard"}
KEEP_NS = (0, 2, 4, 8)  # layers kept in high precision per expert (of 40; 20 with --quick)
KEEP_SEEDS = (0, 1)  # random orders averaged in the demo (the eval uses more)
METRICS = ("denoiser_rel_err", "denoiser_rel_err_high", "denoiser_rel_err_low", "final_latent_rel_err",
           "mean_layer_sqnr_db")  # of measure.measure's, what the demo reports
TIE_MARGIN = 0.02  # relative differences below 2% are reported as a tie, not a win
NEAR_MAX = 0.95  # mean tail/max above this: tail-aware and max masks are nearly the same masks
# Each method as the Apply node's choices on the one calibrated state (W4A4Config).
METHOD_CHOICES = {"none": {"statistic": "none"}, "max": {"statistic": "max"}, "tail": {},
                  "tail_rotation": {"rotation": "hadamard"}}


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def bf16_bytes(model: nn.Module) -> int:
    return 2 * sum(p.numel() for p in model.parameters())


def a14b_projection() -> dict:
    """State tensor bytes vs bf16 weights for both Wan2.2-T2V-A14B experts, from shapes
    alone (a meta-device model with the real dims; the file adds a JSON header)."""
    with torch.device("meta"):
        model = WanModel(WanConfig(dim=5120, ffn_dim=13824, num_layers=40, text_dim=4096))
    shapes = wan.linear_shapes(model)
    state = 2 * sum(layer_nbytes(shapes[n][1]) for n in wan.main_linear_names(model))
    weights = 2 * bf16_bytes(model)
    return {"state_tensor_bytes": state, "model_bf16_bytes": weights, "state_pct": 100.0 * state / weights}


# --------------------------------------------------------------------------- verdict

def compare(a: dict, b: dict) -> str:
    """'better' / 'worse' / 'tie' / 'mixed' for method a against b on the two output errors."""
    signs = set()
    for key in ("denoiser_rel_err", "final_latent_rel_err"):
        diff = (a[key] - b[key]) / max(b[key], 1e-30)
        signs.add(0 if abs(diff) < TIE_MARGIN else (-1 if diff < 0 else 1))
    if signs == {0}:
        return "tie"
    if signs <= {-1, 0}:
        return "better"
    if signs <= {1, 0}:
        return "worse"
    return "mixed"


def verdict_lines(results: dict) -> list[str]:
    t = results["tail"]
    lines = []
    for other in ("max", "none"):
        o = results[other]
        v = compare(t, o)
        detail = (f"denoiser {t['denoiser_rel_err']:.4f} vs {o['denoiser_rel_err']:.4f}, "
                  f"final latent {t['final_latent_rel_err']:.4f} vs {o['final_latent_rel_err']:.4f}")
        text = {"better": f"tail-aware BEATS {other} on this model ({detail})",
                "worse": f"tail-aware does NOT beat {other} on this model: it is worse ({detail})",
                "tie": f"tail-aware does NOT beat {other} on this model: a tie within {TIE_MARGIN:.0%} ({detail})",
                "mixed": f"tail-aware does NOT clearly beat {other} on this model: mixed ({detail})"}[v]
        lines.append(text)
    return lines


def keep_verdict(keep: dict) -> list[str]:
    """One line: at each N > 0, is keeping the most sensitive layers better than random ones?"""
    words = {-1: "better", 0: "tie", 1: "worse"}
    parts = []
    for n, s, r in zip(keep["n"], keep["sensitive"], keep["random"]):
        if n:
            diff = (s - r) / max(r, 1e-30)
            sign = 0 if abs(diff) < TIE_MARGIN else (-1 if diff < 0 else 1)
            parts.append(f"N={n}: {s:.4f} vs {r:.4f} ({words[sign]})")
    return ["keeping the N most sensitive layers vs N random ones, final latent: " + "; ".join(parts)]


# --------------------------------------------------------------------------- report

def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(cfg: PairConfig, summary: dict) -> str:
    res = summary["methods"]
    rows = [("reference (bf16 weights, fp32 compute)", None)] + [(METHOD_LABELS[m], res[m]) for m in METHODS]
    head = f"{'model':<40} {'denoiser err':>12} {'(high)':>8} {'(low)':>8} {'final latent':>13} {'layer SQNR':>11}"
    lines = ["", "HiFloat4 W4A4 on a tiny Wan2.2-T2V expert pair (held-out prompts)",
             f"  model: dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.layers} blocks, text_dim {cfg.text_dim}; "
             f"latent {list(cfg.latent_shape)} = {cfg.tokens_per_call} tokens per cfg-batched call",
             f"  sampling: {cfg.steps} steps flow Euler, shift {cfg.shift}, cfg {cfg.cfg}, "
             f"switch at step {summary['config']['switch_step']} (sigma < {cfg.boundary}); "
             f"{cfg.calib_prompts} calibration prompts, {cfg.eval_prompts} held-out prompts",
             f"  masks: alpha {cfg.alpha}, tail = p{cfg.percentile:g}, all from one calibration "
             f"(max/none re-derived, as Apply's statistic); rotation: Apply's hadamard, block "
             f"{rotation.DEFAULT_BLOCK} fitted per layer: "
             + ", ".join(f"{b} for {k} inputs" for k, b in summary["config"]["rotation_blocks"].items()),
             f"  errors: relative L2 vs the reference; denoiser = the model's velocity output (cond+uncond) "
             f"on the reference's input at step {summary['config']['probe_steps'][HIGH]} (high-noise expert) "
             f"and {summary['config']['probe_steps'][LOW]} (low-noise); final latent = full sampling, same seed",
             "", head, "-" * len(head)]
    for label, r in rows:
        if r is None:
            lines.append(f"{label:<40} {0:>12.4f} {0:>8.4f} {0:>8.4f} {0:>13.4f} {'inf':>8} dB")
        else:
            lines.append(f"{label:<40} {r['denoiser_rel_err']:>12.4f} {r['denoiser_rel_err_high']:>8.4f} "
                         f"{r['denoiser_rel_err_low']:>8.4f} {r['final_latent_rel_err']:>13.4f} "
                         f"{r['mean_layer_sqnr_db']:>8.2f} dB")
    k = summary["keep_sensitive"]
    lines += ["", f"kept in high precision per expert (keep_high_precision): final-latent error, tail p{cfg.percentile:g}",
              f"{'layers kept':<40} " + " ".join(f"{n:>8}" for n in k["n"])]
    for order, label in (("sensitive", "most sensitive at calibration"),
                         ("random", f"random (mean of {len(KEEP_SEEDS)} seeds)")):
        lines.append(f"{label:<40} " + " ".join(f"{v:>8.4f}" for v in k[order]))
    s, p = summary["size"], summary["size"]["a14b_projection"]
    lines += ["",
              f"state file: {_fmt_bytes(s['state_file_bytes'])} ({s['state_file_bytes']} bytes, "
              f"{s['layers']} layers, {s['channels']} channels) vs both experts in bf16 "
              f"{_fmt_bytes(s['model_bf16_bytes'])}: {s['state_pct']:.2f}% (tiny models have few weights "
              f"per channel)",
              f"  projected for Wan2.2-T2V-A14B (both experts, same layout): {_fmt_bytes(p['state_tensor_bytes'])} "
              f"vs {_fmt_bytes(p['model_bf16_bytes'])} = {p['state_pct']:.3f}%",
              f"tail/max statistic ratio (mean over channels): {summary['mean_tail_over_max']:.3f} "
              f"- p{cfg.percentile:g} of {cfg.tokens_per_call} tokens per call excludes only "
              f"~{cfg.tokens_per_call * (100 - cfg.percentile) / 100:.1f} tokens",
              "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings_s"].items()),
              ""]
    lines += ["verdict: " + v for v in summary["verdict"]]
    if summary["mean_tail_over_max"] > NEAR_MAX:
        lines.append(f"caveat: the tail statistic is on average within {1 - summary['mean_tail_over_max']:.1%} of "
                     f"the max here, so tail vs max differences on this workload are noise, not evidence")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def run_demo(cfg: PairConfig, out: str | None = None) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _log(f"build: two tiny Wan2.2-T2V experts (dim {cfg.dim}, {cfg.layers} blocks) and synthetic prompts")
    reference = measure.build_models(cfg)
    work = measure.workload(cfg)
    calib_prompts, eval_prompts, neg, switch = work.calib, work.held_out, work.negative, work.switch
    probes = measure.probe_steps(cfg.steps, switch)
    timings["build"] = time.perf_counter() - t0

    t = time.perf_counter()
    quantize_dequantize(torch.zeros(GROUP_SIZE))  # first use may build the C++ kernels: timed apart
    timings["warmup"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"calibrate: {cfg.calib_prompts} prompts x {cfg.steps} steps, switch at step {switch}")

    def run() -> None:
        for i, ctx in enumerate(calib_prompts):
            measure.sample_pair(cfg, reference, ctx, neg, measure.noise_seed(cfg, "calib", i), switch)

    settings = {"prompts": cfg.calib_prompts, "steps": cfg.steps, "sampler": "euler", "scheduler": "simple",
                "shift": cfg.shift, "cfg": cfg.cfg, "seed": cfg.seed, "switch_step": switch,
                "boundary_sigma": cfg.boundary, "latent_shape": list(cfg.latent_shape), "source": "hifloat4 demo"}
    state = calibrate(reference, run, CalibConfig(percentile=cfg.percentile, alpha=cfg.alpha), settings)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hifloat4-demo-") as tmp:
        path = out or os.path.join(tmp, "tiny_wan22_t2v_hif4.safetensors")
        _log(f"save/load: {path}")
        save_state(path, state)
        file_bytes = os.path.getsize(path)
        loaded = load_state(path)
    timings["save_load"] = time.perf_counter() - t

    t = time.perf_counter()
    _log("quantize: W4A4 copies of both experts for none / max / tail / tail + rotation")
    quantized = {m: {e: quantize_(copy.deepcopy(reference[e]), W4A4Config(loaded, expert=e, **choices))
                     for e in (HIGH, LOW)}
                 for m, choices in METHOD_CHOICES.items()}
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"evaluate: reference sampling on {cfg.eval_prompts} held-out prompts")
    ref = measure.reference_runs(cfg, reference, eval_prompts, neg, switch, probes)
    results = {}
    for m in METHODS:
        _log(f"evaluate: {METHOD_LABELS[m]}")
        r = measure.measure(cfg, quantized[m], reference, ref, eval_prompts, neg, switch, probes)
        results[m] = {k: r[k] for k in METRICS}
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"evaluate: keeping {', '.join(map(str, KEEP_NS[1:]))} layers per expert in high precision, "
         "most sensitive vs random")
    sweep = measure.keep_sensitive(cfg, loaded, reference, ref, eval_prompts, neg, switch, KEEP_NS, KEEP_SEEDS,
                                   ("sensitive", "random"))
    keep = {k: sweep[k] for k in ("n", "sensitive", "random")}
    timings["keep_sensitive"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    layers = [ls for ex in loaded.experts.values() for ls in ex.layers.values()]
    tail_over_max = torch.cat([ls.tail.float() / ls.absmax.float().clamp_min(1e-30) for ls in layers])
    model_bytes = sum(bf16_bytes(m) for m in reference.values())
    summary = {
        "config": {**dataclasses.asdict(cfg), "latent_shape": list(cfg.latent_shape), "switch_step": switch,
                   "probe_steps": probes,
                   "rotation_blocks": measure.rotation_blocks(reference[HIGH].get_submodule(n).in_features
                                                              for n in wan.main_linear_names(reference[HIGH])),
                   "tokens_per_call": cfg.tokens_per_call,
                   "reference": "bf16-rounded weights, fp32 compute"},
        "methods": results,
        "keep_sensitive": keep,
        "size": {"state_file_bytes": file_bytes, "state_tensor_bytes": state_nbytes(loaded),
                 "model_bf16_bytes": model_bytes, "state_pct": 100.0 * file_bytes / model_bytes,
                 "layers": len(layers), "channels": sum(ls.channels for ls in layers),
                 "a14b_projection": a14b_projection()},
        "mean_tail_over_max": float(tail_over_max.mean()),
        "timings_s": timings,
        "tail_vs_max": compare(results["tail"], results["max"]),
        "tail_vs_none": compare(results["tail"], results["none"]),
        "state_path": out,
    }
    summary["verdict"] = verdict_lines(results) + keep_verdict(keep)
    return summary


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hifloat4 demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="model, prompt and noise seed (default 0)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 8; 4 with --quick)")
    p.add_argument("--prompts", type=int, default=None,
                   help="calibration prompts (default 4; 2 with --quick); held-out prompts are separate")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts (default 2)")
    p.add_argument("--out", default=None, help="also keep the PTQ state at this .safetensors path")
    p.add_argument("--quick", action="store_true", help="a smaller model and workload (seconds; for tests)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the tiny model's ops are too small to gain from more, "
                        "and on a busy CPU extra threads make them many times slower)")
    return p.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> PairConfig:
    cfg = PairConfig(seed=args.seed, **(measure.QUICK if args.quick else {}))
    changes = {k: v for k, v in (("steps", args.steps), ("calib_prompts", args.prompts),
                                 ("eval_prompts", args.eval_prompts)) if v is not None}
    for k, v in changes.items():
        if v < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    return dataclasses.replace(cfg, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = config_from_args(args)
        if args.out is not None and not args.out.endswith(".safetensors"):
            raise ValueError(f"--out must end in .safetensors, got {args.out!r}")
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            summary = run_demo(cfg, args.out)
        finally:
            torch.set_num_threads(threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(render(cfg, summary))
    print("RESULT " + json.dumps(summary, sort_keys=True, allow_nan=False))
    return 0
