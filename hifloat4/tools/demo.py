"""`python -m hifloat4 demo`: the whole method end to end on an embedded tiny Wan2.2
T2V model pair, in well under two minutes on a laptop CPU.

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
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import wan
from ..calibrate import CalibConfig, calibrate
from ..experts import HIGH, LOW
from ..format import quantize_dequantize
from ..linear import HiF4Linear
from ..plan import W4A4Config, make_plan
from ..quantize import LayersConfig, quantize_
from ..sampling import BOUNDARY_SIGMA, StepRecord, expert_call, flow_sigmas, sample_two_expert, switch_step_from_sigmas
from ..spec import GROUP_SIZE
from ..state import PTQState, layer_nbytes, load_state, remask, save_state, sensitivity, state_nbytes
from ..wan_model import WanConfig, WanModel
from .eval.keep_eval import keep_sweep
from .tiny_wan import make_tiny_wan

METHODS = ("none", "max", "tail", "tail_rotation")
METHOD_LABELS = {"none": "W4A4, no smoothing", "max": "W4A4, max (SmoothQuant)",
                 "tail": "W4A4, tail-aware p99.9", "tail_rotation": "W4A4, tail-aware + Hadamard"}
KEEP_NS = (0, 2, 4, 8)  # layers kept in high precision per expert (of 40; 20 with --quick)
KEEP_SEEDS = (0, 1)  # random orders averaged in the demo (the eval uses more)
TIE_MARGIN = 0.02  # relative differences below 2% are reported as a tie, not a win
NEAR_MAX = 0.95  # mean tail/max above this: tail-aware and max masks are nearly the same masks
ENCODER_SEED = 20250  # the synthetic text encoder's fixed outlier channels


@dataclass(frozen=True)
class DemoConfig:
    """Model size, workload and method settings (fixed before looking at any result)."""

    dim: int = 256
    ffn_dim: int = 512
    layers: int = 4
    text_dim: int = 4096
    context_len: int = 512  # umT5 pads every prompt to 512 tokens
    active_tokens: int = 24
    text_outlier_channels: int = 4
    text_outlier_scale: float = 10.0
    latent_shape: tuple[int, int, int, int, int] = (1, 16, 4, 24, 24)  # 576 tokens, 1152 per cfg call
    steps: int = 8
    cfg: float = 5.0
    shift: float = 5.0
    boundary: float = BOUNDARY_SIGMA["t2v"]
    calib_prompts: int = 4
    eval_prompts: int = 2
    seed: int = 0
    percentile: float = 99.9
    alpha: float = 0.5
    rotation_seed: int = 0

    @property
    def rotation_block(self) -> int:
        """Largest power of two <= 256 dividing every main-layer in-feature size."""
        g = math.gcd(self.dim, self.ffn_dim)
        return min(256, g & -g)

    @property
    def tokens_per_call(self) -> int:
        b, _, t, h, w = self.latent_shape
        return b * t * (h // 2) * (w // 2) * (2 if self.cfg != 1.0 else 1)


QUICK = dict(dim=128, ffn_dim=256, layers=2, text_dim=256, context_len=64, active_tokens=12,
             latent_shape=(1, 16, 2, 16, 16), steps=4, calib_prompts=2, eval_prompts=2)


def _log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs

def _generator(*parts) -> torch.Generator:
    """A CPU generator seeded from a tuple of labels: independent, reproducible streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def synthetic_contexts(cfg: DemoConfig, kind: str, count: int) -> list[Tensor]:
    """umT5-like prompt features (1, context_len, text_dim): `active_tokens` random rows
    (std 0.2) with a few large-magnitude channels, zero padding after them (as the
    comfy harness's HarnessRandomConditioning). The outlier channels belong to the
    "encoder", so every prompt shares them; `kind` ("calib", "eval", "negative")
    separates the random streams, so held-out prompts are never calibration prompts."""
    chans = torch.randperm(cfg.text_dim, generator=_generator(ENCODER_SEED, cfg.text_dim))
    chans = chans[:cfg.text_outlier_channels]
    out = []
    for i in range(count):
        g = _generator(cfg.seed, kind, i)
        n = min(cfg.active_tokens, cfg.context_len)
        tok = 0.2 * torch.randn(1, n, cfg.text_dim, generator=g)
        tok[:, :, chans] *= cfg.text_outlier_scale
        ctx = torch.zeros(1, cfg.context_len, cfg.text_dim)
        ctx[:, :n] = tok
        out.append(ctx)
    return out


def noise_seed(cfg: DemoConfig, kind: str, i: int) -> int:
    return cfg.seed * 100_000 + (0 if kind == "calib" else 50_000) + i


def build_models(cfg: DemoConfig) -> dict[str, WanModel]:
    """Both T2V experts with their weights rounded to bf16 (what Wan2.2 ships), kept in fp32."""
    models = {}
    for expert in (HIGH, LOW):
        m = make_tiny_wan("t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, layers=cfg.layers, text_dim=cfg.text_dim,
                          seed=cfg.seed, expert=expert)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        models[expert] = m
    return models


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


# --------------------------------------------------------------------------- evaluation

@dataclass
class Reference:
    """Reference trajectories on the held-out prompts: inputs at the probe steps and finals."""

    probes: list[dict[int, StepRecord]]  # per prompt: step -> record
    finals: list[Tensor]


def probe_steps(steps: int, switch: int) -> dict[str, int]:
    """One fixed step in the middle of each expert's segment."""
    return {HIGH: switch // 2, LOW: switch + (steps - switch) // 2}


def _sample(cfg: DemoConfig, experts: dict[str, nn.Module], ctx: Tensor, neg: Tensor, seed: int, switch: int,
            callback: Callable[[StepRecord], None] | None = None) -> Tensor:
    return sample_two_expert(experts[HIGH], experts[LOW], cfg.latent_shape, ctx, neg, cfg.steps, switch,
                             cfg.cfg, seed, cfg.shift, callback=callback)


def reference_runs(cfg: DemoConfig, experts, prompts, neg, switch: int, probes: dict[str, int]) -> Reference:
    wanted = set(probes.values())
    records, finals = [], []
    for i, ctx in enumerate(prompts):
        rec: dict[int, StepRecord] = {}
        finals.append(_sample(cfg, experts, ctx, neg, noise_seed(cfg, "eval", i), switch,
                              lambda r: rec.__setitem__(r.step, r) if r.step in wanted else None))
        records.append(rec)
    return Reference(records, finals)


class SQNRMeter:
    """Per-layer SQNR of every HiF4Linear against the float layer on the same input."""

    def __init__(self, quantized: nn.Module, reference: nn.Module) -> None:
        ref = dict(reference.named_modules())
        self.sums: dict[str, list[float]] = {}
        self.handles = [m.register_forward_hook(self._hook(name, ref[name]))
                        for name, m in quantized.named_modules() if isinstance(m, HiF4Linear)]

    def _hook(self, name: str, linear: nn.Linear):
        def hook(module, args, out):
            want = F.linear(args[0].float(), linear.weight.float(),
                            None if linear.bias is None else linear.bias.float())
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0] += float(want.square().sum())
            acc[1] += float((out.float() - want).square().sum())
        return hook

    def db(self) -> list[float]:
        return [10 * math.log10(s / max(e, 1e-30)) for s, e in self.sums.values()]

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rel(a: Tensor, ref: Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@dataclass
class Measurement:
    """Raw errors of one quantized pair on the held-out prompts (shared with `eval`)."""

    denoiser: dict[str, list[float]]  # per expert: relative error of its output, per prompt
    finals: list[float]  # relative error of the final latent, per prompt
    layers: dict[str, tuple[float, float]]  # "<expert>/<layer>" -> (sum x^2, sum err^2) of its output


def measure(cfg: DemoConfig, quantized: dict[str, nn.Module], reference: dict[str, nn.Module], ref: Reference,
            prompts, neg, switch: int, probes: dict[str, int]) -> Measurement:
    meters = {e: SQNRMeter(quantized[e], reference[e]) for e in (HIGH, LOW)}
    den = {HIGH: [], LOW: []}
    try:
        with torch.no_grad():
            for i, ctx in enumerate(prompts):
                for expert, step in probes.items():
                    r = ref.probes[i][step]
                    out = expert_call(quantized[expert], r.x, r.sigma, ctx, neg, cfg.cfg)
                    den[expert].append(_rel(out, r.model_output))
    finally:
        for m in meters.values():
            m.close()
    finals = [_rel(_sample(cfg, quantized, ctx, neg, noise_seed(cfg, "eval", i), switch), ref.finals[i])
              for i, ctx in enumerate(prompts)]
    layers = {f"{e}/{name}": (sig, err) for e, m in meters.items() for name, (sig, err) in m.sums.items()}
    return Measurement(den, finals, layers)


def evaluate(cfg: DemoConfig, quantized: dict[str, nn.Module], reference: dict[str, nn.Module], ref: Reference,
             prompts, neg, switch: int, probes: dict[str, int]) -> dict:
    m = measure(cfg, quantized, reference, ref, prompts, neg, switch, probes)
    sqnr = [10 * math.log10(s / max(e, 1e-30)) for s, e in m.layers.values()]
    high, low = sum(m.denoiser[HIGH]) / len(m.denoiser[HIGH]), sum(m.denoiser[LOW]) / len(m.denoiser[LOW])
    return {"denoiser_rel_err": (high + low) / 2, "denoiser_rel_err_high": high, "denoiser_rel_err_low": low,
            "final_latent_rel_err": sum(m.finals) / len(m.finals), "mean_layer_sqnr_db": sum(sqnr) / len(sqnr)}


def keep_sensitive(cfg: DemoConfig, state: PTQState, reference: dict[str, nn.Module], ref: Reference, prompts,
                   neg: Tensor, switch: int, ns: Sequence[int] = KEEP_NS, seeds: Sequence[int] = KEEP_SEEDS,
                   orders: Sequence[str] = ("sensitive", "random")) -> dict:
    """Final-latent error on the held-out prompts with N layers per expert kept in high
    precision, chosen by each order (hifloat4.eval.keep_eval), N in `ns`."""
    plans = {e: make_plan(W4A4Config(state, expert=e), wan.fingerprint(reference[e])) for e in (HIGH, LOW)}
    groups = {e: (list(p.layers), {n: sensitivity(state.experts[e].layers[n]) for n in p.layers})
              for e, p in plans.items()}

    def error(kept) -> float:
        quantized = {e: quantize_(copy.deepcopy(reference[e]),
                                  LayersConfig({n: q for n, q in plans[e].layers.items() if n not in kept[e]}))
                     for e in (HIGH, LOW)}
        with torch.no_grad():
            finals = [_sample(cfg, quantized, ctx, neg, noise_seed(cfg, "eval", i), switch) for i, ctx in enumerate(prompts)]
        return sum(_rel(f, r) for f, r in zip(finals, ref.finals)) / len(finals)

    return keep_sweep(groups, error, ns, seeds, orders)


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


def render(cfg: DemoConfig, summary: dict) -> str:
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
             f"(max/none via remask); rotation: block Hadamard {cfg.rotation_block}",
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

def run_demo(cfg: DemoConfig, out: str | None = None) -> dict:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    _log(f"build: two tiny Wan2.2-T2V experts (dim {cfg.dim}, {cfg.layers} blocks) and synthetic prompts")
    reference = build_models(cfg)
    calib_prompts = synthetic_contexts(cfg, "calib", cfg.calib_prompts)
    eval_prompts = synthetic_contexts(cfg, "eval", cfg.eval_prompts)
    neg = synthetic_contexts(cfg, "negative", 1)[0]
    sigmas = flow_sigmas(cfg.steps, cfg.shift)
    switch = switch_step_from_sigmas(sigmas, cfg.boundary)
    if not 0 < switch < cfg.steps:
        raise ValueError(f"with {cfg.steps} steps the boundary sigma {cfg.boundary} gives switch step {switch}: "
                         f"one expert would never run; use more steps")
    probes = probe_steps(cfg.steps, switch)
    timings["build"] = time.perf_counter() - t0

    t = time.perf_counter()
    quantize_dequantize(torch.zeros(GROUP_SIZE))  # first use may build the C++ kernels: timed apart
    timings["warmup"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"calibrate: {cfg.calib_prompts} prompts x {cfg.steps} steps, switch at step {switch}")

    def run() -> None:
        for i, ctx in enumerate(calib_prompts):
            _sample(cfg, reference, ctx, neg, noise_seed(cfg, "calib", i), switch)

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
    states: dict[str, PTQState] = {
        "none": remask(loaded, statistic="none"),
        "max": remask(loaded, statistic="max"),
        "tail": loaded,
        "tail_rotation": dataclasses.replace(loaded, rotation={"block": cfg.rotation_block,
                                                               "seed": cfg.rotation_seed}),
    }
    quantized = {m: {e: quantize_(copy.deepcopy(reference[e]), W4A4Config(s, expert=e)) for e in (HIGH, LOW)}
                 for m, s in states.items()}
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"evaluate: reference sampling on {cfg.eval_prompts} held-out prompts")
    ref = reference_runs(cfg, reference, eval_prompts, neg, switch, probes)
    results = {}
    for m in METHODS:
        _log(f"evaluate: {METHOD_LABELS[m]}")
        results[m] = evaluate(cfg, quantized[m], reference, ref, eval_prompts, neg, switch, probes)
    timings["evaluate"] = time.perf_counter() - t

    t = time.perf_counter()
    _log(f"evaluate: keeping {', '.join(map(str, KEEP_NS[1:]))} layers per expert in high precision, "
         "most sensitive vs random")
    sweep = keep_sensitive(cfg, loaded, reference, ref, eval_prompts, neg, switch)
    keep = {k: sweep[k] for k in ("n", "sensitive", "random")}
    timings["keep_sensitive"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    layers = [ls for ex in loaded.experts.values() for ls in ex.layers.values()]
    tail_over_max = torch.cat([ls.tail.float() / ls.absmax.float().clamp_min(1e-30) for ls in layers])
    model_bytes = sum(bf16_bytes(m) for m in reference.values())
    summary = {
        "config": {**dataclasses.asdict(cfg), "latent_shape": list(cfg.latent_shape), "switch_step": switch,
                   "probe_steps": probes, "rotation_block": cfg.rotation_block,
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
                        "and on a busy CPU extra threads can make them 10-100x slower)")
    return p.parse_args(list(argv))


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(seed=args.seed, **(QUICK if args.quick else {}))
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
