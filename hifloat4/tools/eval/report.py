"""Plain-text tables, verdicts and (optional, matplotlib) PNG plots of an evaluation."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

TIE_MARGIN = 0.02  # relative differences of an error below 2% are a tie (as the demo)
NEAR_MAX = 0.95  # mean tail/max above this: the tail statistic is essentially the max (as the demo)
PLOTS = ("eval_percentile.png", "eval_calib_size.png", "eval_formats.png", "eval_keep.png")
KEEP_PARTS = (("tiny_wan", "tiny Wan2.2 pair", "final latent rel. L2 error", "per expert (of {n})"),
              ("real_model", "all-MiniLM-L6-v2", "1 - cos(embedding)", "(of {n} Linears)"))
ORDER_LABELS = {"sensitive": "most sensitive at calibration (keep_high_precision)",
                "random": "random (mean over seeds)", "position": "first blocks (block order)"}


# --------------------------------------------------------------------------- helpers

def _f(v, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, spec)


def table(headers: Sequence[str], rows: Sequence[Sequence], first_width: int | None = None) -> list[str]:
    """Left-aligned first column, right-aligned others, a rule under the header."""
    cols = list(zip(*([headers] + [list(map(str, r)) for r in rows])))
    widths = [max(len(str(c)) for c in col) for col in cols]
    if first_width:
        widths[0] = max(widths[0], first_width)

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "-" * len(line(headers))]
    out += [line(list(map(str, r))) for r in rows]
    return out


def relative_verdict(a: float, b: float, lower_is_better: bool = True) -> str:
    """'better' / 'worse' / 'tie' of error a against error b (ties within TIE_MARGIN)."""
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "tie" if a == b else ("better" if (a < b) == lower_is_better else "worse")
    d = (a - b) / abs(b)
    if abs(d) < TIE_MARGIN:
        return "tie"
    return "better" if (d < 0) == lower_is_better else "worse"


# --------------------------------------------------------------------------- sections

def _blocks(blocks: dict) -> str:
    """{in_features: block} of the shipped rule, in words."""
    return "block Hadamard as Apply's default, per layer " + ", ".join(
        f"{b} for {k} inputs" for k, b in blocks.items())


def wan_section(w: dict) -> list[str]:
    c = w["config"]
    m = c["model"]
    lines = ["", "== 1. Tiny Wan2.2-shaped T2V expert pair: W4A4 vs the unquantized model (held-out prompts) ==",
             (f"model: dim {m['dim']}, ffn {m['ffn_dim']}, {m['layers']} blocks, text_dim {m['text_dim']}; "
             f"{c['layers_per_expert']} main layers per expert x 2 experts; {c['tokens_per_call']} tokens per "
             f"cfg-batched call"),
             (f"sampling: {m['steps']} steps flow Euler, shift {m['shift']}, cfg {m['cfg']}, switch at step "
             f"{c['switch_step']}; calibration on {max(c['calib_sizes'])} prompts, measured on "
             f"{c['held_out_prompts']} held-out prompts (never calibrated on)"),
             ("layer SQNR: each W4A4 layer vs the float layer on the same input at one probe step per expert; "
             "denoiser: rel. L2 error of the model output at those steps; final latent: rel. L2 error after "
             f"full sampling (same seed). Rotation: {_blocks(c['rotation_blocks'])}."), ""]
    rows = []
    for key, r in w["methods"].items():
        rows.append([key, _f(r["mean_layer_sqnr_db"], ".2f"), _f(r["min_layer_sqnr_db"], ".2f"),
                     _f(r["denoiser_rel_err"]), _f(r["final_latent_rel_err"]), _f(r["final_latent_sqnr_db"], ".2f")])
    lines += table(["method", "layer SQNR dB (mean)", "(worst)", "denoiser rel err", "final latent rel err",
                    "final latent SQNR dB"], rows)
    lines += ["", "calibration-set size (held-out prompts; final latent rel err | mean layer SQNR dB):"]
    sizes = [str(k) for k in c["calib_sizes"]]
    rows = [[key] + [f"{_f(v[k]['final_latent_rel_err'])} | {_f(v[k]['mean_layer_sqnr_db'], '.2f')}" for k in sizes]
            for key, v in w["calib_size"].items()]
    lines += table(["method"] + [f"{k} prompt{'s' if k != '1' else ''}" for k in sizes], rows)
    lines += ["", "how far the tail statistic is from the max (mean over channels of tail/absmax):"]
    lines += table(["percentile", "tail/max", "tokens per call excluded above it"],
                   [[f"p{p}", _f(v, ".3f"), _f(c["tokens_per_call"] * (100 - float(p)) / 100, ".2f")]
                    for p, v in w["tail_over_max"].items()])
    return lines


def layer_type_section(w: dict, keys: Sequence[str]) -> list[str]:
    """Mean SQNR per layer type (over blocks and experts) for a few methods."""
    keys = [k for k in keys if k in w["methods"]]
    if not keys:
        return []
    suffixes: list[str] = []
    for name in w["methods"][keys[0]]["layers"]:
        s = name.split(".", 2)[-1]  # "<expert>/blocks.<i>.<suffix>" -> suffix
        if s not in suffixes:
            suffixes.append(s)
    rows = []
    for s in suffixes:
        row = [s]
        for k in keys:
            vals = [v["sqnr_db"] for n, v in w["methods"][k]["layers"].items() if n.split(".", 2)[-1] == s]
            row.append(_f(sum(vals) / len(vals), ".2f"))
        rows.append(row)
    return ["", "tiny Wan: mean layer SQNR (dB) by layer type:"] + table(["layer"] + keys, rows)


def real_section(r: dict) -> list[str]:
    lines = ["", "== 2. Real pretrained transformer: " + r.get("model", "?") + " =="]
    if r.get("status") != "ok":
        return lines + [r.get("reason", "skipped")]
    c = r["config"]
    lines += [(f"{c['layers']} encoder Linear layers W4A4; calibration {c['calibration_sentences']} sentences "
              f"({c['calibration_tokens']} tokens, one call each: {c['tokens_per_call']:.1f} tokens per call), "
              f"{c['held_out_sentences']} held-out sentences; rotation: {_blocks(c['rotation_blocks'])}"),
              ("tail = percentile over all calibration tokens (pooled); 'per-call' = calibrate.observe's streaming "
              "statistic (max over calls of each call's percentile)"),
              "cos: cosine similarity of W4A4 vs fp32 sentence embeddings on the held-out sentences", ""]
    rows = [[k, _f(v["cos_mean"], ".5f"), _f(v["cos_min"], ".5f"), _f(v["one_minus_cos_mean"], ".5f"),
             _f(v["mean_layer_sqnr_db"], ".2f"), _f(v["min_layer_sqnr_db"], ".2f")] for k, v in r["methods"].items()]
    lines += table(["method", "cos mean", "cos min", "1 - cos", "layer SQNR dB (mean)", "(worst)"], rows)
    bad = c.get("observe_absmax_mismatch", [])
    lines += ["", "calibrate.observe on these non-Wan layer names: " +
              ("absmax identical to the pooled tokens' on every layer" if not bad else
               f"absmax DIFFERS from the pooled tokens' on {len(bad)} layers (e.g. {bad[0]})")]
    pooled = ", ".join(f"p{p} {_f(v, '.3f')}" for p, v in r["tail_over_max"].items())
    lines += ["", (f"tail/max (mean over channels): pooled {pooled}; per-call "
                  f"{_f(r['tail_over_max_per_call'], '.3f')}")]
    return lines


def formats_section(fm: dict) -> list[str]:
    names = list(fm["formats"])
    lines = ["", "== 3. HiF4 vs other 4-bit formats (quantization SQNR in dB; higher is better) ==", ""]
    lines += table(["format", "bits/value", "layout"],
                   [[n, _f(v["bits_per_value"], ".2f"), v["layout"]] for n, v in fm["formats"].items()])
    r, c = fm.get("gaussian_shape", ("?", "?"))
    lines += ["", f"Gaussian N(0, sigma^2): one {r} x {c} sample scaled by sigma, blocks along its rows:"]
    ks = [e["log2_scale"] for e in fm["gaussian"][names[0]]]
    shown = [k for k in ks if k % 5 == 0 or k == ks[-1] or k == ks[0]]
    rows = []
    for k in shown:
        i = ks.index(k)
        rows.append([f"sigma = 2^{k}"] + [_f(fm["gaussian"][n][i]["sqnr_db"], ".2f") for n in names])
    lines += table(["input"] + names, rows)
    for src, per in fm["activations"].items():
        lines += ["", (f"real activations ({src}; raw Linear inputs, no smoothing): "
                      "mean layer SQNR | pooled SQNR | layers where best")]
        lines += table(["format", "mean dB", "worst layer dB", "pooled dB", "best on"],
                       [[n, _f(v["mean_layer_sqnr_db"], ".2f"), _f(v["min_layer_sqnr_db"], ".2f"),
                         _f(v["pooled_sqnr_db"], ".2f"), f"{v['layers_best']}/{v['layers']}"] for n, v in per.items()])
    return lines


MASSIVE_METRICS = (("ordinary_rel_err", "ordinary tokens"), ("massive_rel_err", "massive tokens"),
                   ("final_latent_rel_err", "final latent"))


def massive_section(m: dict) -> list[str]:
    """Part 4: the premise as measured, then the three errors of every method."""
    c = m["config"]
    md, spec = c["model"], c["spec"]
    n = c["tokens_per_call"]
    lines = ["", "== 4. Token-wise massive activations: tiny Wan2.2 pair with sink tokens (held-out prompt) ==",
             (f"model: dim {md['dim']}, ffn {md['ffn_dim']}, {md['layers']} blocks, text_dim {md['text_dim']}; per expert "
              f"{spec['channels']} massive residual channels (sinks at {spec['register']:g}, ordinary tokens at "
              f"{spec['quiet']:g}x scale there), one massive ffn unit per block (gain {spec['unit_gain']:g})"),
             (f"workload: {n} tokens per cfg-batched call, {c['sinks_per_call']} of them sinks (positions "
              f"{c['sink_positions']} of each sample); per call p99 drops {n * 0.01:.1f} tokens, p99.9 "
              f"{n * 0.001:.1f}, p99.99 {n * 0.0001:.2f}"),
             (f"sampling: {md['steps']} steps flow Euler, shift {md['shift']}, cfg {md['cfg']}, switch at step "
              f"{c['switch_step']}; calibration on {c['calib_prompts']} prompts, measured on {c['held_out_prompts']} "
              f"held-out prompt(s); rotation: Hadamard, block {c['rotation_block']} fitted per layer"),
             "", "premise, first call of each unquantized expert (worst massive channel; |x| of the sinks against the "
             "ordinary tokens' median in that channel and the median |x| of the whole input; percentiles per call):"]
    rows = [[f"{e}: {loc}", _f(r["sink_abs_min"], ".2f"), _f(r["sink_over_channel_median"], ".0f"),
             _f(r["sink_over_all_median"], ".0f"), _f(r["p99_over_sink"], ".3f"), _f(r["p99.9_over_sink"], ".3f"),
             _f(r["p99.99_over_sink"], ".3f")]
            for e, per in m["premise"].items() for loc, r in per.items()]
    lines += table(["location", "sink |x|", "/ channel median", "/ all median", "p99 / sink", "p99.9 / sink",
                    "p99.99 / sink"], rows)
    lines += ["", ("errors: ordinary / massive tokens = mean over the W4A4 layers that see video tokens of the "
                   "relative output error against the float layer on the same input, over the ordinary / sink "
                   "tokens of every call; final latent = relative L2 error after full sampling (same seed)"), ""]
    rows = [[k] + [_f(r[metric]) for metric, _ in MASSIVE_METRICS] for k, r in m["methods"].items()]
    lines += table(["method"] + [f"{label} rel err" for _, label in MASSIVE_METRICS], rows)
    lines += ["", "adaptive statistic, choices over both experts' layers: " + "; ".join(
        f"{k}: " + ", ".join(f"{s} {n}" for s, n in sorted(v.items())) for k, v in m["adaptive_choices"].items())]
    return lines


# --------------------------------------------------------------------------- verdicts

def _tally_tail_vs_max(methods: dict, metric: str, tail_source: str | None = None) -> dict[str, int]:
    """Every tail setting against max at the same alpha and rotation: better/tie/worse counts.
    With `tail_source`, only tail settings whose statistic came from that source count."""
    tally = {"better": 0, "tie": 0, "worse": 0}
    for r in methods.values():
        meth = r["method"]
        if meth["statistic"] != "tail" or (tail_source is not None and meth.get("tail_source") != tail_source):
            continue
        ref = methods.get(f"max a{meth['alpha']:g}" + (" +rot" if meth["rotation"] else ""))
        if ref:
            tally[relative_verdict(r[metric], ref[metric])] += 1
    return tally


def _keep_parts(results: dict):
    """(key, part results, title, metric label, n label) of the parts that have a keep sweep."""
    for key, title, metric, n_label in KEEP_PARTS:
        part = results.get(key, {})
        if "keep_sensitive" in part:
            total = part["config"].get("layers_per_expert") or part["config"].get("layers")
            yield key, part, title, metric, n_label.format(n=total)


def keep_section(results: dict) -> list[str]:
    """Error against the number of layers kept in high precision, per order; adaptive vs fixed."""
    lines = []
    for _, part, title, metric, n_label in _keep_parts(results):
        k = part["keep_sensitive"]
        lines += ["", f"== {title}: {metric} with N layers kept in high precision {n_label}, held-out inputs ==",
                  f"random: mean over seeds {k['seeds']}"]
        rows = [[ORDER_LABELS[o]] + [_f(v, ".5f") for v in k[o]] for o in ORDER_LABELS if o in k]
        lines += table(["kept layers N"] + [str(n) for n in k["n"]], rows)
        a = part["adaptive"]
        lines += ["", f"{title}: adaptive statistic per layer vs the fixed one (choices: "
                  + ", ".join(f"{c} {n}" for c, n in sorted(a["choices"].items())) + ")"]
        names = list(a["methods"])
        cols = [c for c in next(iter(a["methods"].values()))]
        lines += table(["statistic"] + cols, [[m] + [_f(a["methods"][m][c], ".5f") for c in cols] for m in names])
    return lines


def keep_verdicts(results: dict) -> list[str]:
    out = []
    for key, part, title, _, _ in _keep_parts(results):
        k = part["keep_sensitive"]
        for other, words in (("random", "N random ones"), ("position", "the first N in block order")):
            tally = {"better": 0, "tie": 0, "worse": 0}
            for n, s, o in zip(k["n"], k["sensitive"], k[other]):
                if n:
                    tally[relative_verdict(s, o)] += 1
            out.append(f"{title}: keeping the N most sensitive layers vs {words}, over N in "
                       f"{[n for n in k['n'] if n]}: {tally['better']} better, {tally['tie']} tie, "
                       f"{tally['worse']} worse")
        metric = "final_latent_rel_err" if key == "tiny_wan" else "one_minus_cos_mean"
        fixed, adaptive = (part["adaptive"]["methods"][m][metric] for m in part["adaptive"]["methods"])
        out.append(f"{title}: adaptive statistic vs fixed: {relative_verdict(adaptive, fixed)} "
                   f"({adaptive:.5f} vs {fixed:.5f})")
    return out


def _tally(pairs) -> str:
    tally = {"better": 0, "tie": 0, "worse": 0}
    for a, b in pairs:
        tally[relative_verdict(a, b)] += 1
    return f"{tally['better']} better, {tally['tie']} tie, {tally['worse']} worse"


def massive_verdicts(m: dict) -> list[str]:
    """Part 4 in plain statements (2% tie margin; the rule for beating the default fixed a priori)."""
    ms = m["methods"]
    out = []
    default, mx = ms.get("tail p99.9 a0.5"), ms.get("max a0.5")
    if default and mx:
        out.append("massive tokens: tail p99.9 a0.5 vs max a0.5: " + "; ".join(
            f"{label} {relative_verdict(default[k], mx[k])} ({default[k]:.4f} vs {mx[k]:.4f})"
            for k, label in MASSIVE_METRICS))
    for p in m["config"]["percentiles"]:
        pairs = [(r, ms[f"max a{r['method']['alpha']:g}" + (" +rot" if r["method"]["rotation"] else "")])
                 for r in ms.values() if r["method"]["statistic"] == "tail" and r["method"]["percentile"] == p]
        out.append(f"massive tokens: tail p{p:g} vs max at the same alpha and rotation ({len(pairs)} settings): "
                   + "; ".join(f"{label} {_tally((a[k], b[k]) for a, b in pairs)}" for k, label in MASSIVE_METRICS))
    pairs = [(r, ms[f"tail p99.9 a{r['method']['alpha']:g}" + (" +rot" if r["method"]["rotation"] else "")])
             for r in ms.values() if r["method"]["statistic"] == "adaptive"]
    if pairs:
        out.append(f"massive tokens: adaptive vs tail p99.9 at the same alpha and rotation ({len(pairs)} settings): "
                   + "; ".join(f"{label} {_tally((a[k], b[k]) for a, b in pairs)}" for k, label in MASSIVE_METRICS))
    pairs = [(ms[k + " +rot"], r) for k, r in ms.items() if not r["method"]["rotation"] and k + " +rot" in ms]
    out.append(f"massive tokens: adding the rotation, same statistic and alpha ({len(pairs)} settings): "
               + "; ".join(f"{label} {_tally((a[k], b[k]) for a, b in pairs)}" for k, label in MASSIVE_METRICS))
    for k, label in MASSIVE_METRICS:
        best = min(ms, key=lambda name: ms[name][k])
        out.append(f"massive tokens: lowest {label} error: {best} ({ms[best][k]:.4f})")
    if default:
        beats = [name for name, r in ms.items() if name != "tail p99.9 a0.5"
                 and relative_verdict(r["final_latent_rel_err"], default["final_latent_rel_err"]) == "better"
                 and all(relative_verdict(r[k], default[k]) != "worse" for k in ("ordinary_rel_err", "massive_rel_err"))]
        out.append("massive tokens: settings that beat the paper's default (tail p99.9 a0.5) by the pre-set rule "
                   "(final latent better by > 2%, neither token population worse by > 2%): "
                   + (", ".join(beats) if beats else "none"))
    return out


def verdicts(results: dict) -> list[str]:
    """Plain statements, computed from the numbers with the 2% tie margin; never tuned."""
    out = []
    w = results.get("tiny_wan")
    if w:
        ms = w["methods"]
        alpha = w["config"]["sweep_alpha"]
        pcts = w["config"]["percentiles"]
        p_main = 99.9 if 99.9 in pcts else pcts[-1]
        tail, mx, none = ms.get(f"tail p{p_main:g} a{alpha:g}"), ms.get(f"max a{alpha:g}"), ms.get("none")
        if tail and mx and none:
            for other_name, other in ((f"max a{alpha:g}", mx), ("none", none)):
                v = relative_verdict(tail["final_latent_rel_err"], other["final_latent_rel_err"])
                d = relative_verdict(tail["denoiser_rel_err"], other["denoiser_rel_err"])
                out.append(f"tiny Wan: tail p{p_main:g} a{alpha:g} vs {other_name}: final latent {v} "
                           f"({tail['final_latent_rel_err']:.4f} vs {other['final_latent_rel_err']:.4f}), "
                           f"denoiser {d} ({tail['denoiser_rel_err']:.4f} vs {other['denoiser_rel_err']:.4f})")
        tally = _tally_tail_vs_max(ms, "final_latent_rel_err")
        out.append(f"tiny Wan, every tail setting vs max at the same alpha and rotation (final latent): "
                   f"{tally['better']} better, {tally['tie']} tie, {tally['worse']} worse")
        rot, plain = ms.get(f"tail p{p_main:g} a{alpha:g} +rot"), tail
        if rot and plain:
            out.append(f"tiny Wan: adding the Hadamard rotation to tail p{p_main:g} a{alpha:g}: final latent "
                       f"{relative_verdict(rot['final_latent_rel_err'], plain['final_latent_rel_err'])} "
                       f"({rot['final_latent_rel_err']:.4f} vs {plain['final_latent_rel_err']:.4f}), denoiser "
                       f"{relative_verdict(rot['denoiser_rel_err'], plain['denoiser_rel_err'])} "
                       f"({rot['denoiser_rel_err']:.4f} vs {plain['denoiser_rel_err']:.4f})")
        ratio = w["tail_over_max"].get(f"{p_main:g}")
        if ratio is not None:
            line = (f"tiny Wan: p{p_main:g} over {w['config']['tokens_per_call']} tokens per call excludes "
                    f"~{w['config']['tokens_per_call'] * (100 - p_main) / 100:.1f} tokens; mean tail/max = {ratio:.3f}")
            if ratio > NEAR_MAX:
                line += ", so tail-aware and max masks nearly coincide here by construction"
            out.append(line)
    r = results.get("real_model", {})
    if r.get("status") == "ok":
        ms = r["methods"]
        tail, mx, none = ms.get("tail p99.9 a0.5"), ms.get("max a0.5"), ms.get("none")
        if tail and mx and none:
            for other_name, other in (("max a0.5", mx), ("none", none)):
                v = relative_verdict(tail["one_minus_cos_mean"], other["one_minus_cos_mean"])
                out.append(f"{r['model']}: tail p99.9 a0.5 vs {other_name}: 1 - cos {v} "
                           f"({tail['one_minus_cos_mean']:.5f} vs {other['one_minus_cos_mean']:.5f})")
        tally = _tally_tail_vs_max(ms, "one_minus_cos_mean", tail_source="pooled")
        out.append(f"{r['model']}, every tail setting vs max at the same alpha and rotation (1 - cos): "
                   f"{tally['better']} better, {tally['tie']} tie, {tally['worse']} worse")
        ratio = r["tail_over_max"].get("99.9")
        if ratio is not None:
            toks = r["config"]["calibration_tokens"]
            line = (f"{r['model']}: p99.9 over {toks} calibration tokens excludes ~{toks * 0.001:.2f} tokens; "
                    f"mean tail/max = {ratio:.3f}")
            if ratio > NEAR_MAX:
                line += ", so tail-aware and max masks nearly coincide here by construction"
            out.append(line)
    out += keep_verdicts(results)
    fm = results.get("formats")
    if fm:
        g = fm["gaussian"]
        names = list(g)
        i0 = next(i for i, e in enumerate(g[names[0]]) if e["log2_scale"] == 0) if any(
            e["log2_scale"] == 0 for e in g[names[0]]) else 0
        at1 = {n: g[n][i0]["sqnr_db"] for n in names}
        best = max(at1, key=at1.get)
        out.append("formats, Gaussian sigma = 1: " + ", ".join(f"{n} {v:.2f} dB" for n, v in at1.items())
                   + f" (best: {best})")
        for src, per in fm["activations"].items():
            ranked = sorted(per, key=lambda n: per[n]["mean_layer_sqnr_db"], reverse=True)
            out.append(f"formats, {src} activations (mean layer SQNR): " + " > ".join(
                f"{n} {per[n]['mean_layer_sqnr_db']:.2f} dB" for n in ranked))
    if results.get("massive"):
        out += massive_verdicts(results["massive"])
    return out


def render(results: dict) -> str:
    lines = []
    if "tiny_wan" in results:
        lines += wan_section(results["tiny_wan"])
        lines += layer_type_section(results["tiny_wan"], ["none", "max a0.5", "tail p99.9 a0.5",
                                                          "tail p99.9 a0.5 +rot"])
    if "real_model" in results:
        lines += real_section(results["real_model"])
    lines += keep_section(results)
    if "formats" in results:
        lines += formats_section(results["formats"])
    if "massive" in results:
        lines += massive_section(results["massive"])
    lines += ["", "== verdicts (2% tie margin on relative errors; settings fixed a priori) =="]
    lines += ["- " + v for v in verdicts(results)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- plots

def load_pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _style(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(plt, fig, title: str, path: str) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stat_axis(ms: dict, metric: str, percentiles: Sequence[float], alpha: float, rot: bool):
    xs, ys = [], []
    suffix = " +rot" if rot else ""
    for i, p in enumerate(percentiles):
        k = f"tail p{p:g} a{alpha:g}{suffix}"
        if k in ms:
            xs.append(i)
            ys.append(ms[k][metric])
    k = f"max a{alpha:g}{suffix}"
    if k in ms:
        xs.append(len(percentiles))
        ys.append(ms[k][metric])
    return xs, ys


def plot_percentile(plt, results: dict, path: str) -> None:
    panels = [("tiny_wan", "final_latent_rel_err", "tiny Wan2.2 pair: final latent rel. L2 error")]
    if results.get("real_model", {}).get("status") == "ok":
        panels.append(("real_model", "one_minus_cos_mean", "all-MiniLM-L6-v2: 1 - cos(embedding)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (part, metric, title) in zip(axes[0], panels):
        res = results[part]
        ms = res["methods"]
        pcts = res["config"]["percentiles"]
        alphas = res["config"]["alphas"]
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for j, a in enumerate(alphas):
            for rot in (False, True):
                xs, ys = _stat_axis(ms, metric, pcts, a, rot)
                if not xs:
                    continue
                ax.plot(xs, ys, marker="o", linestyle="--" if rot else "-", color=colors[j % len(colors)],
                        label=f"alpha {a:g}" + (" + rotation" if rot else ""))
        for rot, ls in ((False, ":"), (True, "-.")):
            k = "none +rot" if rot else "none"
            if k in ms:
                ax.axhline(ms[k][metric], color="gray", linestyle=ls,
                           label="no smoothing" + (" + rotation" if rot else ""))
        ax.set_xticks(range(len(pcts) + 1), [f"p{p:g}" for p in pcts] + ["max"])
        _style(ax, "activation statistic a_c of the mask", metric.replace("_", " "), title)
    _save(plt, fig, "HiF4 W4A4 error vs the mask's activation statistic (lower is better)", path)


def plot_calib_size(plt, results: dict, path: str) -> None:
    w = results["tiny_wan"]
    sizes = [int(k) for k in next(iter(w["calib_size"].values()))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "final_latent_rel_err", "final latent rel. L2 error (lower is better)"),
                              (axes[1], "mean_layer_sqnr_db", "mean layer SQNR dB (higher is better)")):
        for key, per in w["calib_size"].items():
            ys = [per[str(k)][metric] for k in sizes]
            ax.plot(sizes, ys, marker="o", linestyle=":" if key == "none" else "-", label=key)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(k) for k in sizes])
        _style(ax, "calibration prompts", label)
    _save(plt, fig, f"tiny Wan2.2 pair: error vs calibration-set size ({w['config']['held_out_prompts']} held-out "
          "prompts)", path)


def plot_formats(plt, results: dict, path: str) -> None:
    fm = results["formats"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.4, 1]})
    ax = axes[0]
    for name, pts in fm["gaussian"].items():
        bits = fm["formats"][name]["bits_per_value"]
        ax.plot([p["log2_scale"] for p in pts], [p["sqnr_db"] for p in pts], marker=".",
                label=f"{name} ({bits:g} b)")
    ax.set_xlabel("log2(sigma) of the Gaussian input")
    ax.set_ylabel("SQNR dB (higher is better)")
    ax.set_title("Gaussian tensors over a wide range of scales", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    sources = list(fm["activations"])
    names = list(fm["formats"])
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        vals = [fm["activations"][s][name]["mean_layer_sqnr_db"] for s in sources]
        ax.bar([i + j * width for i in range(len(sources))], vals, width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sources))], sources, fontsize=8)
    ax.set_ylabel("mean layer SQNR dB")
    ax.set_title("real activations (raw Linear inputs)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    vals = [fm["activations"][s][n]["mean_layer_sqnr_db"] for s in sources for n in names]
    if vals:
        ax.set_ylim(max(0.0, min(vals) - 3), max(vals) + 0.35 * (max(vals) - min(vals) + 3))
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_keep(plt, results: dict, path: str) -> None:
    parts = list(_keep_parts(results))
    fig, axes = plt.subplots(1, len(parts), figsize=(6.2 * len(parts), 4.4), squeeze=False)
    for ax, (_, part, title, metric, n_label) in zip(axes[0], parts):
        k = part["keep_sensitive"]
        for order, style in (("sensitive", "o-"), ("random", "s--"), ("position", "^:")):
            if order in k:
                ax.plot(k["n"], k[order], style, label=ORDER_LABELS[order])
        if "random_runs" in k:
            ax.fill_between(k["n"], [min(r) for r in k["random_runs"]], [max(r) for r in k["random_runs"]],
                            alpha=0.15, color="gray", label="random: min..max over seeds")
        _style(ax, f"layers kept in high precision {n_label}", metric + " (lower is better)", title)
    _save(plt, fig, "HiF4 W4A4 error vs layers kept unquantized, by how they are chosen (held-out inputs)", path)


def write_plots(results: dict, out_dir: str) -> tuple[list[str], str | None]:
    """(written paths, None) or ([], reason) when matplotlib is missing."""
    plt = load_pyplot()
    if plt is None:
        return [], "plots skipped: matplotlib is not installed (pip install '.[eval]'); the tables are complete"
    written = []
    jobs = [("eval_percentile.png", plot_percentile, "tiny_wan"), ("eval_calib_size.png", plot_calib_size, "tiny_wan"),
            ("eval_formats.png", plot_formats, "formats"), ("eval_keep.png", plot_keep, "tiny_wan")]
    for name, fn, needs in jobs:
        if needs in results:
            path = os.path.join(out_dir, name)
            fn(plt, results, path)
            written.append(path)
    return written, None
