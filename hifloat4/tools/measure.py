"""What `demo` and `eval` both measure, and how: one workload, one set of errors.

The workload: the tiny Wan2.2-shaped T2V expert pair (hifloat4.tools.tiny_wan, with
the outlier channels real DiTs have) with bf16-rounded weights computing in fp32 (the
reference, so every difference is quantization), synthetic umT5-like prompts whose
calibration and held-out streams never meet, and two-expert flow sampling.

The measurements, always on held-out prompts: each expert's output at one probe step
on the reference trajectory (same input for every model), the final latent after full
sampling with the same seed, and every W4A4 layer's output SQNR against the float
layer on the same input (`SQNRMeter`, also used on the real model).

Keeping layers in high precision: for N kept layers per group, three orders of
choosing them are compared (ORDERS):
* "sensitive": the N largest W4A4 errors measured at calibration (what
  `keep_high_precision` does, hifloat4.plan.rank_by_sensitivity);
* "random": N layers drawn at random, averaged over fixed seeds;
* "position": the first N layers in block order (the usual "keep the first blocks" rule).

Rotation is never set up here: callers ask for it the way users do (W4A4Config's
"hadamard", or `rotation.for_layer` of `rotation.hadamard(rotation.DEFAULT_BLOCK)`),
so the evidence measures the shipped rule.
"""
from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import rotation as hrotation
from .. import wan
from ..experts import HIGH, LOW
from ..linear import HiF4Linear
from ..masks import sensitivity
from ..plan import W4A4Config, make_plan, rank_by_sensitivity
from ..quantize import LayersConfig, quantize_
from ..sampling import BOUNDARY_SIGMA, StepRecord, expert_call, flow_sigmas, sample_two_expert, switch_step_from_sigmas
from ..state import PTQState
from .tiny_wan import make_tiny_wan

EXPERTS = (HIGH, LOW)
ENCODER_SEED = 20250  # the synthetic text encoder's fixed outlier channels
ORDERS = ("sensitive", "random", "position")
Kept = dict[str, frozenset[str]]  # group -> layers kept in high precision


@dataclass(frozen=True)
class PairConfig:
    """Model size, workload and the calibration's settings (fixed before looking at any result)."""

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

    @property
    def tokens_per_call(self) -> int:
        b, _, t, h, w = self.latent_shape
        return b * t * (h // 2) * (w // 2) * (2 if self.cfg != 1.0 else 1)


QUICK = dict(dim=128, ffn_dim=256, layers=2, text_dim=256, context_len=64, active_tokens=12,
             latent_shape=(1, 16, 2, 16, 16), steps=4, calib_prompts=2, eval_prompts=2)


# --------------------------------------------------------------------------- the workload

def _generator(*parts) -> torch.Generator:
    """A CPU generator seeded from a tuple of labels: independent, reproducible streams."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def synthetic_contexts(cfg: PairConfig, kind: str, count: int) -> list[Tensor]:
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


@dataclass(frozen=True)
class Workload:
    """What every measurement on the pair samples: calibration and held-out prompts, the
    negative prompt, and the step where the low-noise expert takes over."""

    calib: list[Tensor]
    held_out: list[Tensor]
    negative: Tensor
    switch: int


def workload(cfg: PairConfig) -> Workload:
    switch = switch_step_from_sigmas(flow_sigmas(cfg.steps, cfg.shift), cfg.boundary)
    if not 0 < switch < cfg.steps:
        raise ValueError(f"with {cfg.steps} steps the boundary sigma {cfg.boundary} gives switch step {switch}: "
                         f"one expert would never run; use more steps")
    return Workload(synthetic_contexts(cfg, "calib", cfg.calib_prompts),
                    synthetic_contexts(cfg, "eval", cfg.eval_prompts),
                    synthetic_contexts(cfg, "negative", 1)[0], switch)


def noise_seed(cfg: PairConfig, kind: str, i: int) -> int:
    return cfg.seed * 100_000 + (0 if kind == "calib" else 50_000) + i


def build_models(cfg: PairConfig) -> dict[str, nn.Module]:
    """Both T2V experts with their weights rounded to bf16 (what Wan2.2 ships), kept in fp32."""
    models = {}
    for expert in EXPERTS:
        m = make_tiny_wan("t2v", dim=cfg.dim, ffn_dim=cfg.ffn_dim, layers=cfg.layers, text_dim=cfg.text_dim,
                          seed=cfg.seed, expert=expert)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).float())
        models[expert] = m
    return models


def probe_steps(steps: int, switch: int) -> dict[str, int]:
    """One fixed step in the middle of each expert's segment."""
    return {HIGH: switch // 2, LOW: switch + (steps - switch) // 2}


def rotation_blocks(in_features: Iterable[int]) -> dict[int, int]:
    """{in_features: block} the shipped rule gives each layer width under the default
    Hadamard setting (rotation.for_layer of rotation.hadamard(DEFAULT_BLOCK)): for the record."""
    rot = hrotation.hadamard(hrotation.DEFAULT_BLOCK)
    return {k: hrotation.for_layer(rot, k).block for k in sorted(set(in_features))}


def sample_pair(cfg: PairConfig, experts: Mapping[str, nn.Module], ctx: Tensor, neg: Tensor, seed: int, switch: int,
                callback: Callable[[StepRecord], None] | None = None) -> Tensor:
    """Full two-expert sampling of one prompt: the final latent."""
    return sample_two_expert(experts[HIGH], experts[LOW], cfg.latent_shape, ctx, neg, cfg.steps, switch,
                             cfg.cfg, seed, cfg.shift, callback=callback)


@dataclass
class Reference:
    """Reference trajectories on the held-out prompts: inputs at the probe steps and finals."""

    probes: list[dict[int, StepRecord]]  # per prompt: step -> record
    finals: list[Tensor]


def reference_runs(cfg: PairConfig, experts, prompts, neg, switch: int, probes: dict[str, int]) -> Reference:
    wanted = set(probes.values())
    records, finals = [], []
    for i, ctx in enumerate(prompts):
        rec: dict[int, StepRecord] = {}
        finals.append(sample_pair(cfg, experts, ctx, neg, noise_seed(cfg, "eval", i), switch,
                                  lambda r: rec.__setitem__(r.step, r) if r.step in wanted else None))
        records.append(rec)
    return Reference(records, finals)


# --------------------------------------------------------------------------- errors

def rel_error(a: Tensor, ref: Tensor) -> float:
    """||a - ref|| / ||ref|| in fp32."""
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def db_from_rel(rel: float) -> float:
    return math.inf if rel == 0.0 else -20.0 * math.log10(rel)


class SQNRMeter:
    """Per-layer output energy and error of every HiF4Linear against the float layer on
    the same input: `sums[name] = [sum y^2, sum (y_q - y)^2]`."""

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

    def layers(self) -> dict[str, dict[str, float]]:
        """{layer: {"rel_err", "sqnr_db"}} of what was measured so far."""
        return {name: {"rel_err": math.sqrt(err / max(sig, 1e-300)), "sqnr_db": sqnr_db(sig, err)}
                for name, (sig, err) in self.sums.items()}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(cfg: PairConfig, quantized: Mapping[str, nn.Module], reference: Mapping[str, nn.Module], ref: Reference,
            prompts: Sequence[Tensor], neg: Tensor, switch: int, probes: dict[str, int]) -> dict:
    """A quantized pair against the reference on the held-out prompts: per-layer output
    error (at the probe steps), denoiser error at the probe steps, final-latent error."""
    meters = {e: SQNRMeter(quantized[e], reference[e]) for e in EXPERTS}
    den: dict[str, list[float]] = {HIGH: [], LOW: []}
    try:
        with torch.no_grad():
            for i, ctx in enumerate(prompts):
                for expert, step in probes.items():
                    r = ref.probes[i][step]
                    out = expert_call(quantized[expert], r.x, r.sigma, ctx, neg, cfg.cfg)
                    den[expert].append(rel_error(out, r.model_output))
    finally:
        for m in meters.values():
            m.close()
    with torch.no_grad():
        finals = [rel_error(sample_pair(cfg, quantized, ctx, neg, noise_seed(cfg, "eval", i), switch), ref.finals[i])
                  for i, ctx in enumerate(prompts)]
    layers = {f"{e}/{name}": v for e, m in meters.items() for name, v in m.layers().items()}
    dbs = [v["sqnr_db"] for v in layers.values()]
    final = sum(finals) / len(finals)
    high, low = sum(den[HIGH]) / len(den[HIGH]), sum(den[LOW]) / len(den[LOW])
    return {"mean_layer_sqnr_db": sum(dbs) / len(dbs), "min_layer_sqnr_db": min(dbs),
            "mean_layer_rel_err": sum(v["rel_err"] for v in layers.values()) / len(layers),
            "denoiser_rel_err": (high + low) / 2, "denoiser_rel_err_high": high, "denoiser_rel_err_low": low,
            "final_latent_rel_err": final, "final_latent_sqnr_db": db_from_rel(final),
            "final_latent_rel_err_per_prompt": finals, "layers": layers}


# --------------------------------------------------------------------------- keeping layers

def kept_layers(layers: Sequence[str], sensitivity: Mapping[str, float], order: str, n: int,
                seed: int = 0) -> frozenset[str]:
    """The n layers of one group (`layers` in block order) an order keeps."""
    if not 0 <= n <= len(layers):
        raise ValueError(f"cannot keep {n} of {len(layers)} layers")
    if order == "sensitive":
        return frozenset(rank_by_sensitivity({name: sensitivity[name] for name in layers})[:n])
    if order == "random":
        perm = torch.randperm(len(layers), generator=torch.Generator().manual_seed(seed)).tolist()
        return frozenset(layers[i] for i in perm[:n])
    if order == "position":
        return frozenset(layers[:n])
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def keep_sweep(groups: Mapping[str, tuple[Sequence[str], Mapping[str, float]]], error: Callable[[Kept], float],
               ns: Sequence[int], seeds: Sequence[int] = (0, 1, 2), orders: Sequence[str] = ORDERS,
               log: Callable[[str], None] = lambda _: None) -> dict:
    """{"n": ns, order: [error at each n]} (random: the mean over `seeds`, its runs under
    "random_runs"). `groups`: name -> (layers in block order, {layer: sensitivity});
    `error(kept)` quantizes every layer but the kept ones and measures. n = 0 is
    measured once and shared by every order."""
    out: dict = {"n": list(ns), "seeds": list(seeds)}
    cache: dict[frozenset, float] = {}

    def one(order: str, n: int, seed: int = 0) -> float:
        kept = {g: kept_layers(layers, sens, order, n, seed) for g, (layers, sens) in groups.items()}
        key = frozenset((g, name) for g, names in kept.items() for name in names)
        if key not in cache:
            log(f"keep {n} per group ({order}{f', seed {seed}' if order == 'random' else ''})")
            cache[key] = error(kept)
        return cache[key]

    for order in orders:
        if order == "random":
            runs = [[one(order, n, s) for s in seeds] for n in ns]
            out["random_runs"] = runs
            out["random"] = [sum(r) / len(r) for r in runs]
        else:
            out[order] = [one(order, n) for n in ns]
    return out


def keep_sensitive(cfg: PairConfig, state: PTQState, reference: Mapping[str, nn.Module], ref: Reference,
                   prompts: Sequence[Tensor], neg: Tensor, switch: int, ns: Sequence[int], seeds: Sequence[int],
                   orders: Sequence[str]) -> dict:
    """Final-latent error of the pair on the held-out prompts with N layers per expert
    kept in high precision, chosen by each order, N in `ns` (keep_sweep)."""
    plans = {e: make_plan(W4A4Config(state, expert=e), wan.fingerprint(reference[e])) for e in EXPERTS}
    groups = {e: (list(p.layers), {n: sensitivity(state.experts[e].layers[n]) for n in p.layers})
              for e, p in plans.items()}

    def error(kept: Kept) -> float:
        quantized = {e: quantize_(copy.deepcopy(reference[e]),
                                  LayersConfig({n: q for n, q in plans[e].layers.items() if n not in kept[e]}))
                     for e in EXPERTS}
        with torch.no_grad():
            finals = [sample_pair(cfg, quantized, ctx, neg, noise_seed(cfg, "eval", i), switch)
                      for i, ctx in enumerate(prompts)]
        return sum(rel_error(f, r) for f, r in zip(finals, ref.finals)) / len(finals)

    return keep_sweep(groups, error, ns, seeds, orders)
