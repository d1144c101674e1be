"""Part 1: the embedded tiny Wan2.2-shaped T2V expert pair (hifloat4.tools.measure: the demo's workload).

Calibration runs the two-expert sampler over calibration prompts with
`calibrate.observe` on every main Linear (one observer per percentile); each
prompt's statistics are kept apart and merged (`ChannelStats.merge`, a max over
calls, exactly what one longer calibration would have produced) for calibration
sets of 1, 2, 4, 8 prompts. Every method is then measured on held-out prompts that
no calibration saw (their own random streams and noise seeds):

* per main layer: output error of the W4A4 layer against the float layer on the
  same input, at one probe step per expert on the reference trajectory (relative
  L2 error and SQNR, summed over held-out prompts);
* denoiser output: relative L2 error of the model output at the probe steps;
* final latent: relative L2 error and SQNR after full sampling with the same seed.

The reference is the same pair with bf16-rounded weights computing in fp32, so
every difference is quantization.
"""
from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ... import wan
from ...calibrate import CalibConfig, ExpertObservation, build_state, observe
from ...experts import HIGH, LOW
from ...masks import adaptive_choice
from ...plan import W4A4Config
from ...quantize import LayersConfig, quantize_
from ...sampling import expert_call, sample_two_expert
from ...smoothing import weight_absmax
from ...stats import ChannelStats
from .. import measure
from ..measure import EXPERTS, ORDERS, PairConfig
from .methods import LayerStats, Method, layer_map, method_grid, tail_over_max


@dataclass(frozen=True)
class WanEvalConfig:
    """Fixed before looking at any result: the demo's model and sampling settings."""

    model: PairConfig = field(default_factory=lambda: PairConfig(calib_prompts=8, eval_prompts=2))
    percentiles: tuple[float, ...] = (99.0, 99.9, 99.99)
    alphas: tuple[float, ...] = (0.3, 0.5, 0.7)
    rotation_alphas: tuple[float, ...] = (0.5,)  # rotation rows at the paper's alpha (time budget)
    calib_sizes: tuple[int, ...] = (1, 2, 4, 8)
    sweep_alpha: float = 0.5  # the calibration-size sweep: the paper's alpha ...
    sweep_percentiles: tuple[float, ...] = (99.9,)  # ... and percentile, against max and none
    keep_ns: tuple[int, ...] = (0, 1, 2, 4, 8, 16)  # layers kept in high precision per expert (of 40)
    keep_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # random orders averaged

    @property
    def calib_prompts(self) -> int:
        return max(self.calib_sizes)


def quick_config() -> WanEvalConfig:
    return WanEvalConfig(model=PairConfig(**{**measure.QUICK, "calib_prompts": 2, "eval_prompts": 1}),
                         percentiles=(99.0, 99.9), alphas=(0.5,), calib_sizes=(1, 2), sweep_percentiles=(99.9,),
                         keep_ns=(0, 1, 2, 4), keep_seeds=(0, 1))


def _merged(per_prompt: Sequence[dict[str, ChannelStats]], k: int) -> dict[str, ChannelStats]:
    """The statistics of the first k prompts together."""
    out = {}
    for name, st in per_prompt[0].items():
        m = ChannelStats.from_state_dict(st.state_dict())
        for other in per_prompt[1:k]:
            m.merge(other[name])
        out[name] = m
    return out


def _layer_stats(model: nn.Module, by_pct: dict[float, dict[str, ChannelStats]]) -> dict[str, LayerStats]:
    first = next(iter(by_pct.values()))
    return {name: LayerStats(wmax=weight_absmax(model.get_submodule(name).weight.detach()),
                             absmax=first[name].absmax.clone(),
                             tails={p: s[name].tail.clone() for p, s in by_pct.items()})
            for name in first}


def collect_activations(cfg: PairConfig, reference: dict[str, nn.Module], ref: measure.Reference,
                        prompt: Tensor, neg: Tensor, probes: dict[str, int], max_tokens: int = 1024
                        ) -> dict[str, Tensor]:
    """Inputs of every main Linear at the probe step of each expert (first held-out
    prompt, reference trajectory), at most `max_tokens` rows each: real activations
    for the format comparison."""
    acts: dict[str, Tensor] = {}
    for expert in EXPERTS:
        model = reference[expert]
        handles = []
        for name in wan.main_linear_names(model):
            def hook(module, args, name=f"{expert}/{name}"):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                acts[name] = x[:max_tokens].float().clone()
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        try:
            r = ref.probes[0][probes[expert]]
            with torch.no_grad():
                expert_call(model, r.x, r.sigma, prompt, neg, cfg.cfg)
        finally:
            for h in handles:
                h.remove()
    return acts


def run(ecfg: WanEvalConfig, log: Callable[[str], None] = print, with_activations: bool = True) -> dict:
    cfg = replace(ecfg.model, calib_prompts=ecfg.calib_prompts)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    reference = measure.build_models(cfg)
    work = measure.workload(cfg)
    calib, held_out, neg, switch = work.calib, work.held_out, work.negative, work.switch
    probes = measure.probe_steps(cfg.steps, switch)
    names = {e: wan.main_linear_names(reference[e]) for e in EXPERTS}
    blocks = measure.rotation_blocks(reference[HIGH].get_submodule(n).in_features for n in names[HIGH])
    timings["build"] = time.perf_counter() - t0

    # ---- calibration: one observer per expert and percentile, statistics kept per prompt
    t = time.perf_counter()
    log(f"tiny Wan: calibrating on {cfg.calib_prompts} prompts x {cfg.steps} steps "
        f"(percentiles {', '.join(f'{p:g}' for p in ecfg.percentiles)})")
    per_prompt: dict[tuple[str, float], list[dict[str, ChannelStats]]] = {
        (e, p): [] for e in EXPERTS for p in ecfg.percentiles}
    product = CalibConfig(percentile=cfg.percentile, alpha=cfg.alpha)  # the product's state, all prompts
    with contextlib.ExitStack() as whole:
        observed = {e: whole.enter_context(observe(reference[e], names[e], product)) for e in EXPERTS}
        for i, ctx in enumerate(calib):
            with torch.no_grad(), _observers(reference, names, ecfg.percentiles) as stats:
                sample_two_expert(reference[HIGH], reference[LOW], cfg.latent_shape, ctx, neg, cfg.steps, switch,
                                  cfg.cfg, measure.noise_seed(cfg, "calib", i), cfg.shift)
            for key, s in stats.items():
                per_prompt[key].append(s)
    state = build_state({e: ExpertObservation(reference[e], observed[e]) for e in EXPERTS}, product)
    first = per_prompt[(HIGH, ecfg.percentiles[0])][0][names[HIGH][0]]  # block 0 self_attn.q, prompt 0
    tokens_per_call = first.tokens // max(1, first.calls)
    layer_stats = {k: {e: _layer_stats(reference[e], {p: _merged(per_prompt[(e, p)], k) for p in ecfg.percentiles})
                       for e in EXPERTS} for k in ecfg.calib_sizes}
    timings["calibrate"] = time.perf_counter() - t

    # ---- reference trajectories on the held-out prompts
    t = time.perf_counter()
    ref = measure.reference_runs(cfg, reference, held_out, neg, switch, probes)
    timings["reference"] = time.perf_counter() - t

    def evaluate(quantized: dict[str, nn.Module]) -> dict:
        return measure.measure(cfg, quantized, reference, ref, held_out, neg, switch, probes)

    def method_errors(method: Method, k: int) -> dict:
        return evaluate({e: quantize_(copy.deepcopy(reference[e]), LayersConfig(layer_map(layer_stats[k][e], method)))
                         for e in EXPERTS})

    # ---- the method grid at the largest calibration set
    t = time.perf_counter()
    full = ecfg.calib_prompts
    grid = method_grid(ecfg.percentiles, ecfg.alphas, ecfg.rotation_alphas)
    results: dict[str, dict] = {}
    for j, m in enumerate(grid):
        log(f"tiny Wan: [{j + 1}/{len(grid)}] {m.key}")
        results[m.key] = {"method": _method_dict(m), "calib_prompts": full, **method_errors(m, full)}
    timings["grid"] = time.perf_counter() - t

    # ---- calibration-set size sweep (alpha and percentile fixed a priori; no rotation)
    t = time.perf_counter()
    sweep_methods = [Method("max", ecfg.sweep_alpha)] + [Method("tail", ecfg.sweep_alpha, p)
                                                          for p in ecfg.sweep_percentiles]
    sweep: dict[str, dict[str, dict]] = {}
    for m in sweep_methods:
        sweep[m.key] = {}
        for k in ecfg.calib_sizes:
            if k == full and m.key in results:
                r = results[m.key]
            else:
                log(f"tiny Wan: calibration size {k}: {m.key}")
                r = method_errors(m, k)
            sweep[m.key][str(k)] = _summary(r)
    none = _summary(results[Method("none").key])
    sweep[Method("none").key] = {str(k): none for k in ecfg.calib_sizes}  # no statistics: independent of k
    timings["calib_size_sweep"] = time.perf_counter() - t

    # ---- the product's state: adaptive statistic against fixed p99.9, and kept layers by three orders
    t = time.perf_counter()
    statistics = {}
    for label, statistic in ((f"tail p{cfg.percentile:g}", None), ("adaptive", "adaptive")):
        log(f"tiny Wan: product state, statistic {label}")
        quantized = {e: quantize_(copy.deepcopy(reference[e]), W4A4Config(state, expert=e, statistic=statistic))
                     for e in EXPERTS}
        statistics[label] = _summary(evaluate(quantized))
    choices = Counter(adaptive_choice(ls) for ex in state.experts.values() for ls in ex.layers.values())
    keep = measure.keep_sensitive(cfg, state, reference, ref, held_out, neg, switch, ecfg.keep_ns, ecfg.keep_seeds,
                                  ORDERS)
    timings["keep_and_adaptive"] = time.perf_counter() - t

    acts = {}
    if with_activations:
        acts = collect_activations(cfg, reference, ref, held_out[0], neg, probes)
    timings["total"] = time.perf_counter() - t0

    full_stats = layer_stats[full]
    return {
        "config": {"model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
                   "percentiles": list(ecfg.percentiles), "alphas": list(ecfg.alphas),
                   "rotation_alphas": list(ecfg.rotation_alphas), "calib_sizes": list(ecfg.calib_sizes),
                   "sweep_alpha": ecfg.sweep_alpha, "sweep_percentiles": list(ecfg.sweep_percentiles),
                   "held_out_prompts": cfg.eval_prompts, "switch_step": switch, "probe_steps": probes,
                   "rotation_blocks": blocks, "tokens_per_call": tokens_per_call,
                   "keep_ns": list(ecfg.keep_ns), "keep_seeds": list(ecfg.keep_seeds),
                   "layers_per_expert": len(names[HIGH]),
                   "reference": "bf16-rounded weights, fp32 compute"},
        "tail_over_max": {f"{p:g}": sum(tail_over_max(full_stats[e], p) for e in EXPERTS) / len(EXPERTS)
                          for p in ecfg.percentiles},
        "methods": results,
        "calib_size": sweep,
        "adaptive": {"methods": statistics, "choices": dict(choices)},
        "keep_sensitive": keep,
        "timings_s": timings,
        "_activations": acts,  # popped by the caller (not JSON)
    }


def _method_dict(m: Method) -> dict:
    return {"statistic": m.statistic, "alpha": m.alpha, "percentile": m.percentile, "rotation": m.rotation}


def _summary(r: dict) -> dict:
    return {k: r[k] for k in ("mean_layer_sqnr_db", "min_layer_sqnr_db", "denoiser_rel_err",
                              "final_latent_rel_err", "final_latent_sqnr_db")}


@contextlib.contextmanager
def _observers(models: dict[str, nn.Module], names: dict[str, list[str]], percentiles: Sequence[float]):
    """observe() on every expert for every percentile at once: {(expert, p): {layer: ChannelStats}}
    (updated in place while the block runs)."""
    with contextlib.ExitStack() as stack:
        yield {(e, p): {n: o.stats for n, o in stack.enter_context(observe(model, names[e],
                                                                           CalibConfig(percentile=p))).items()}
               for e, model in models.items() for p in percentiles}
