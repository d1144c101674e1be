"""Part 4: a tiny Wan2.2 pair with token-wise massive activations, where the method's premise holds.

The pair is the demo's harness model made smaller (so that each call holds real token
counts on a 2-core CPU) plus `hifloat4.tools.massive_wan`: two sink tokens per sample
carry massive values in two residual channels and in one ffn hidden unit per block.
Settings fixed before any result was seen (not tuned after looking):

* model: dim 128, ffn 256, 2 blocks, text_dim 4096, MassiveSpec() (2 massive channels
  at 200, quiet 1/8, unit gain 20, seed 23), both experts; weights bf16-rounded;
* workload: latent 4 x 64 x 64 (4096 tokens per sample, 8192 per cfg-batched call,
  4 of them sinks: 0.05%, so p99.9 of a call drops 8.2 tokens and excludes every sink,
  p99.99 drops 0.8 and keeps them); 3 steps flow Euler, shift 5, cfg 5, switch at
  sigma 0.875 (step 2); calibration on 2 prompts, measured on 1 held-out prompt with
  its own noise seed;
* methods: none / max / tail p99 / p99.9 / p99.99 / adaptive, at alpha 0.3 / 0.5 / 0.7,
  each without and with the block-Hadamard rotation (W4A4Config's default block 512,
  fitted per layer by rotation.for_layer);
* verdicts: the 2% tie margin of the other parts; a setting "beats the paper's default"
  (tail p99.9, alpha 0.5, no rotation) only if its final-latent error is lower by more
  than the margin and neither token population's error is higher by more than it.

Everything runs through the product: `calibrate.observe` (one observer per
percentile) while the sampler runs, `calibrate.build_state` with the CalibConfig of
each (percentile, alpha, rotation), and `quantize_(model, W4A4Config(state, ...))`
("max", "none" and "adaptive" as the statistic override of the p99.9 state, so the
adaptive choice is the one measured at that alpha and rotation).

Metrics, on the held-out prompt's full sampling run of each quantized pair:
* ordinary-token error: per W4A4 layer that sees video tokens, the relative L2 error
  of its output against the float layer on the same input, over the ordinary tokens
  of every call; mean over those layers of both experts;
* massive-token error: the same over the sink tokens;
* final latent: relative L2 error of the final latent against the unquantized pair
  (same prompt and seed).
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...calibrate import CalibConfig, ExpertObservation, build_state, observe
from ...experts import HIGH, LOW
from ...linear import HiF4Linear
from ...plan import W4A4Config
from ...quantize import quantize_
from ...rotation import DEFAULT_BLOCK, hadamard
from ...sampling import sample_two_expert
from ...masks import adaptive_choice
from ...state import PTQState
from ...stats import call_stats
from .. import measure
from ..massive_wan import MassiveSpec, add_massive_tokens, layout_of, sink_positions
from .methods import Method, method_grid

EXPERTS = (HIGH, LOW)
STATISTICS = ("none", "max", "tail", "adaptive")
PAPER = (99.9, 0.5)  # the paper's percentile and alpha: the default the verdicts compare against
PREMISE_PERCENTILES = (99.0, 99.9, 99.99)


@dataclass(frozen=True)
class MassiveEvalConfig:
    """Fixed before looking at any result (see the module docstring)."""

    model: measure.PairConfig = field(default_factory=lambda: measure.PairConfig(
        dim=128, ffn_dim=256, layers=2, latent_shape=(1, 16, 4, 64, 64), steps=3, calib_prompts=2,
        eval_prompts=1))
    spec: MassiveSpec = MassiveSpec()
    percentiles: tuple[float, ...] = (99.0, 99.9, 99.99)
    alphas: tuple[float, ...] = (0.3, 0.5, 0.7)
    rotation_block: int = DEFAULT_BLOCK  # W4A4Config's default; each layer fits it (rotation.for_layer)


def quick_config() -> MassiveEvalConfig:
    """Seconds: one block, 2 steps, 2048 tokens per sample (4096 per call, so p99.9 still
    drops 4.1 tokens and excludes the 4 sinks), every statistic at alpha 0.5."""
    return MassiveEvalConfig(model=measure.PairConfig(dim=128, ffn_dim=256, layers=1, latent_shape=(1, 16, 2, 64, 64),
                                                   steps=2, calib_prompts=1, eval_prompts=1), alphas=(0.5,))


def key(m: Method) -> str:
    """Method.key, plus "adaptive a<alpha>" for the per-layer adaptive statistic."""
    if m.statistic == "adaptive":
        return f"adaptive a{m.alpha:g}" + (" +rot" if m.rotation else "")
    return m.key


def methods(percentiles: Sequence[float], alphas: Sequence[float]) -> list[Method]:
    """none, max, tail at every percentile, adaptive; every alpha; without, then with rotation."""
    grid = method_grid(percentiles, alphas)
    plain, rotated = [m for m in grid if not m.rotation], [m for m in grid if m.rotation]
    return (plain + [Method("adaptive", a) for a in alphas]
            + rotated + [Method("adaptive", a, rotation=True) for a in alphas])


# --------------------------------------------------------------------------- the model pair

def build_models(cfg: measure.PairConfig, spec: MassiveSpec) -> dict[str, nn.Module]:
    """The demo's bf16-rounded pair at cfg's size, each expert with massive sink tokens
    (its weights stay bf16-exact: see massive_wan)."""
    models = measure.build_models(cfg)
    for m in models.values():
        add_massive_tokens(m, spec)
    return models


def tokens_per_sample(cfg: measure.PairConfig) -> int:
    _, _, t, h, w = cfg.latent_shape
    return t * (h // 2) * (w // 2)


def sinks(cfg: measure.PairConfig) -> list[int]:
    _, _, t, h, w = cfg.latent_shape
    return sink_positions((t, h // 2, w // 2))


# --------------------------------------------------------------------------- premise

def _premise_row(x: Tensor, channels: Sequence[int], positions: Sequence[int]) -> dict:
    """How massive the sinks are in `channels` of one call's input x [B, L, C], worst channel."""
    x = x.detach().float()
    ordinary = torch.ones(x.shape[1], dtype=torch.bool)
    ordinary[list(positions)] = False
    sink_min = min(float(x[:, positions, c].abs().min()) for c in channels)
    medians = [float(x[:, ordinary, c].abs().median()) for c in channels]
    tails = call_stats(x[..., list(channels)], PREMISE_PERCENTILES).tails  # (3, len(channels)), per call
    row = {"sink_abs_min": sink_min, "ordinary_channel_median": max(medians),
           "all_median": float(x.abs().median()),
           "sink_over_channel_median": min(float(x[:, positions, c].abs().min()) / max(m, 1e-30)
                                           for c, m in zip(channels, medians))}
    row["sink_over_all_median"] = sink_min / max(row["all_median"], 1e-30)
    for p, t in zip(PREMISE_PERCENTILES, tails):
        row[f"p{p:g}_over_sink"] = float(t.max()) / max(sink_min, 1e-30)
    return row


@contextlib.contextmanager
def premise(model: nn.Module, positions: Sequence[int]) -> Iterator[dict[str, dict]]:
    """While the block runs, record for the model's FIRST call how massive the sinks are:
    in the residual stream after each block (massive channels), at each self_attn.q input
    (massive channels, after LayerNorm) and at each ffn.2 input (the block's massive unit)."""
    layout = layout_of(model)
    rows: dict[str, dict] = {}

    def keep(name: str, channels: Sequence[int], output: bool):
        def hook(module, args, out=None):
            if name not in rows:
                rows[name] = _premise_row(out if output else args[0], channels, positions)
        return hook

    handles = []
    for i, b in enumerate(model.blocks):
        handles.append(b.register_forward_hook(keep(f"blocks.{i} output (residual)", layout.channels, True)))
        handles.append(b.self_attn.q.register_forward_pre_hook(keep(f"blocks.{i}.self_attn.q input", layout.channels,
                                                                    False)))
        handles.append(b.ffn[2].register_forward_pre_hook(keep(f"blocks.{i}.ffn.2 input", (layout.units[i],),
                                                               False)))
    try:
        yield rows
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- measurement

class PopulationMeter:
    """Per W4A4 layer whose input rows are video tokens: sums of the float output's square
    and of the error's square, over the sink rows and over the ordinary rows."""

    def __init__(self, quantized: nn.Module, reference: nn.Module, positions: Sequence[int], tokens: int,
                 prefix: str) -> None:
        self.positions = torch.tensor(list(positions))
        self.tokens = tokens
        self.sums: dict[str, list[float]] = {}  # name -> [sig sink, err sink, sig ordinary, err ordinary]
        ref = dict(reference.named_modules())
        self.handles = [m.register_forward_hook(self._hook(prefix + name, ref[name]))
                        for name, m in quantized.named_modules() if isinstance(m, HiF4Linear)]

    def _hook(self, name: str, linear: nn.Linear):
        def hook(module, args, out):
            x = args[0]
            if x.dim() != 3 or x.shape[1] != self.tokens:  # cross_attn.k/v see text tokens
                return
            want = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
            sig, err = want.square().sum(-1), (out.float() - want).square().sum(-1)  # [B, L]
            s_sig, s_err = float(sig[:, self.positions].sum()), float(err[:, self.positions].sum())
            acc = self.sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
            acc[0] += s_sig
            acc[1] += s_err
            acc[2] += float(sig.sum()) - s_sig
            acc[3] += float(err.sum()) - s_err
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _rel(a: Tensor, ref: Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def w4a4_config(m: Method, states: dict[tuple[float, float, bool], PTQState], expert: str) -> W4A4Config:
    """The product's config of a method: tail from its percentile's state as calibrated;
    max / none / adaptive as the statistic override of the p99.9 state at that alpha and rotation."""
    if m.statistic == "tail":
        return W4A4Config(states[(m.percentile, m.alpha, m.rotation)], expert=expert)
    alpha = PAPER[1] if m.alpha is None else m.alpha
    return W4A4Config(states[(PAPER[0], alpha, m.rotation)], expert=expert, statistic=m.statistic)


def run(ecfg: MassiveEvalConfig, log: Callable[[str], None] = print) -> dict:
    cfg = ecfg.model
    if PAPER[0] not in ecfg.percentiles:
        raise ValueError(f"percentiles must include the paper's p{PAPER[0]:g}: max/none/adaptive use its state")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    reference = build_models(cfg, ecfg.spec)
    work = measure.workload(cfg)
    calib, held_out, neg, switch = work.calib, work.held_out, work.negative, work.switch
    positions, tokens = sinks(cfg), tokens_per_sample(cfg)
    rotation = hadamard(ecfg.rotation_block)

    def sample(models: dict[str, nn.Module], ctx: Tensor, kind: str, i: int) -> Tensor:
        return sample_two_expert(models[HIGH], models[LOW], cfg.latent_shape, ctx, neg, cfg.steps, switch, cfg.cfg,
                                 measure.noise_seed(cfg, kind, i), cfg.shift)
    timings["build"] = time.perf_counter() - t0

    # ---- calibration: one observer per percentile on both experts, then one state per setting
    t = time.perf_counter()
    log(f"massive tokens: calibrating on {cfg.calib_prompts} prompts x {cfg.steps} steps, "
        f"{2 * tokens} tokens per call ({2 * len(positions)} sinks)")
    with contextlib.ExitStack() as stack:
        observed = {p: {e: stack.enter_context(observe(reference[e], config=CalibConfig(percentile=p)))
                        for e in EXPERTS} for p in ecfg.percentiles}
        with torch.no_grad():
            for i, ctx in enumerate(calib):
                sample(reference, ctx, "calib", i)
    states: dict[tuple[float, float, bool], PTQState] = {}
    for p in ecfg.percentiles:
        for a in ecfg.alphas:
            for rot in (False, True):
                config = CalibConfig(percentile=p, alpha=a, rotation=rotation if rot else None)
                states[(p, a, rot)] = build_state({e: ExpertObservation(reference[e], observed[p][e]) for e in EXPERTS},
                                                  config)
    timings["calibrate"] = time.perf_counter() - t

    # ---- the unquantized pair on the held-out prompts; the premise from its first calls
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        rows = {e: stack.enter_context(premise(reference[e], positions)) for e in EXPERTS}
        with torch.no_grad():
            finals = [sample(reference, ctx, "eval", i) for i, ctx in enumerate(held_out)]
    timings["reference"] = time.perf_counter() - t

    # ---- every method
    t = time.perf_counter()
    grid = methods(ecfg.percentiles, ecfg.alphas)
    results: dict[str, dict] = {}
    for j, m in enumerate(grid):
        log(f"massive tokens: [{j + 1}/{len(grid)}] {key(m)}")
        quantized = {e: quantize_(copy.deepcopy(reference[e]), w4a4_config(m, states, e)) for e in EXPERTS}
        meters = [PopulationMeter(quantized[e], reference[e], positions, tokens, f"{e}/") for e in EXPERTS]
        try:
            with torch.no_grad():
                errs = [_rel(sample(quantized, ctx, "eval", i), finals[i]) for i, ctx in enumerate(held_out)]
        finally:
            for meter in meters:
                meter.close()
        layers = {n: {"massive_rel_err": math.sqrt(s[1] / max(s[0], 1e-300)),
                      "ordinary_rel_err": math.sqrt(s[3] / max(s[2], 1e-300))}
                  for meter in meters for n, s in meter.sums.items()}
        results[key(m)] = {
            "method": {"statistic": m.statistic, "alpha": m.alpha, "percentile": m.percentile, "rotation": m.rotation},
            "ordinary_rel_err": _mean([v["ordinary_rel_err"] for v in layers.values()]),
            "massive_rel_err": _mean([v["massive_rel_err"] for v in layers.values()]),
            "final_latent_rel_err": _mean(errs), "final_latent_rel_err_per_prompt": errs, "layers": layers}
    timings["methods"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    choices: dict[str, dict[str, int]] = {}
    for (p, a, rot), st in states.items():
        if p == PAPER[0]:
            counts = choices.setdefault(key(Method("adaptive", a, rotation=rot)), {})
            for ex in st.experts.values():
                for ls in ex.layers.values():
                    c = adaptive_choice(ls)
                    counts[c] = counts.get(c, 0) + 1
    layouts = {e: layout_of(reference[e]) for e in EXPERTS}
    return {
        "config": {"model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()
                             if k not in ("percentile", "alpha")},
                   "spec": dict(vars(ecfg.spec)), "percentiles": list(ecfg.percentiles), "alphas": list(ecfg.alphas),
                   "rotation_block": ecfg.rotation_block, "switch_step": switch, "tokens_per_call": 2 * tokens,
                   "sinks_per_call": 2 * len(positions), "sink_positions": positions,
                   "massive_channels": {e: list(v.channels) for e, v in layouts.items()},
                   "massive_units": {e: list(v.units) for e, v in layouts.items()},
                   "calib_prompts": cfg.calib_prompts, "held_out_prompts": cfg.eval_prompts,
                   "reference": "bf16-rounded weights, fp32 compute"},
        "premise": {e: rows[e] for e in EXPERTS},
        "methods": results,
        "adaptive_choices": choices,
        "timings_s": timings,
    }
