"""`python -m hifloat4 inspect FILE [--json]`: validate a PTQ state file and show what
is in it (metadata, experts, layers, channels, file size, checksum), and from format
version 2 on the most sensitive layers (largest relative W4A4 output error on the
calibration sample) and how many layers each statistic would get under "adaptive";
for a version 1 file, what it lacks.

Validation is `hifloat4.state.load_state` itself, so "checksum OK" here means exactly
what the Load PTQ State node will accept. Exit codes: 0 good file, 2 bad or missing
file (the PTQStateError message goes to stderr; a FIFO, a device or a hostile header is
refused in bounded time like any bad file).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

from .. import patchset
from ..masks import adaptive_choice, sensitivity
from ..safefile import loads_json, read_header
from ..state import (CANDIDATES, FORMAT_NAME, METADATA_KEY, PTQState, PTQStateError, format_version, load_state,
                     missing_features, state_nbytes)

MOST_SENSITIVE = 10  # layers listed


def _checksum(path: str) -> str:
    """The stored checksum (load_state has already verified it)."""
    metadata = read_header(path, PTQStateError)["__metadata__"][METADATA_KEY]
    return loads_json(metadata, PTQStateError, "bad metadata JSON")["checksum"]


def _mask_range(state: PTQState, expert: str) -> list[float]:
    masks = torch.cat([ls.mask for ls in state.experts[expert].layers.values()])
    return [float(masks.min()), float(masks.median()), float(masks.max())]


def _adaptive_counts(state: PTQState, expert: str) -> dict[str, int] | None:
    """How many layers of the expert each CANDIDATES statistic wins (None for version 1)."""
    if missing_features(state):
        return None
    choices = [adaptive_choice(ls) for ls in state.experts[expert].layers.values()]
    return {c: choices.count(c) for c in CANDIDATES}


def _most_sensitive(state: PTQState) -> list[dict]:
    if missing_features(state):
        return []
    rows = [{"expert": e, "layer": ln, "error": sensitivity(ls), "adaptive": adaptive_choice(ls)}
            for e, ex in state.experts.items() for ln, ls in ex.layers.items()]
    return sorted(rows, key=lambda r: -r["error"])[:MOST_SENSITIVE]


def summarize(path: str | os.PathLike) -> dict:
    """Validate the file and return a JSON-serialisable description; raises PTQStateError."""
    path = os.fspath(path)
    state = load_state(path)
    experts = []
    for name, ex in state.experts.items():
        fp = ex.fingerprint
        experts.append({
            "name": name,
            "layers": len(ex.layers),
            "channels": sum(ls.channels for ls in ex.layers.values()),
            "mask_min_median_max": _mask_range(state, name),
            "adaptive_choices": _adaptive_counts(state, name),
            "shape_hash": fp["shape_hash"],
            "content_hash": fp["content_hash"],
        })
    return {
        "file": os.path.abspath(path),
        "file_bytes": os.path.getsize(path),
        "tensor_bytes": state_nbytes(state),
        "checksum": _checksum(path),
        "checksum_ok": True,
        "format": FORMAT_NAME,
        "format_version": format_version(state),
        "missing": missing_features(state),
        "most_sensitive": _most_sensitive(state),
        "hif4_spec": state.hif4_spec,
        "method": state.method,
        "alpha": state.alpha,
        "percentile": state.percentile,
        "statistic": state.statistic,
        "rotation": state.rotation,
        "model_family": state.model_family,
        "model_variant": state.model_variant,
        "calibration": state.calibration,
        "tool_version": state.tool_version,
        "extra": state.extra,
        "patches": state.patches,
        "experts": experts,
        "total_layers": sum(e["layers"] for e in experts),
        "total_channels": sum(e["channels"] for e in experts),
    }


def _patches_text(patches: dict | None) -> str:
    """The LoRA / weight patches each expert carried at calibration (hifloat4.patchset)."""
    if patches is None:
        return "(not recorded)"
    return "; ".join(f"{e}: " + (", ".join(map(patchset.describe, groups)) or "none") for e, groups in patches.items())


def render(summary: dict) -> str:
    rot = summary["rotation"]
    rot_text = "none" if rot is None else f"block Hadamard, block {rot['block']}, seed {rot['seed']}"
    lines = [
        f"file:        {summary['file']}",
        f"size:        {summary['file_bytes']} bytes ({summary['tensor_bytes']} bytes of tensors)",
        f"checksum:    OK ({summary['checksum']})",
        f"format:      {summary['format']} v{summary['format_version']}, HiF4 spec {summary['hif4_spec']}",
        f"method:      {summary['method']}: alpha {summary['alpha']:g}, statistic {summary['statistic']}, "
        f"percentile {summary['percentile']:g}",
        f"rotation:    {rot_text}",
        f"model:       {summary['model_family']} {summary['model_variant']}",
        f"tool:        hifloat4 {summary['tool_version']}",
        "calibration: " + (json.dumps(summary["calibration"], sort_keys=True) if summary["calibration"] else "(none)"),
    ]
    if summary["extra"]:
        lines.append("extra:       " + json.dumps(summary["extra"], sort_keys=True))
    lines.append("patches:     " + _patches_text(summary["patches"]))
    lines.append(f"experts:     {len(summary['experts'])} ({summary['total_layers']} layers, "
                 f"{summary['total_channels']} channels in all)")
    for e in summary["experts"]:
        lo, med, hi = e["mask_min_median_max"]
        content = (e["content_hash"] or "none")[:12]
        lines.append(f"  {e['name']:<12} {e['layers']} layers, {e['channels']} channels, "
                     f"mask min/median/max {lo:.3g}/{med:.3g}/{hi:.3g}, "
                     f"shape {e['shape_hash'][:12]}, content {content}")
        if e["adaptive_choices"] is not None:
            lines.append(f"  {'':<12} adaptive statistic: "
                         + ", ".join(f"{c} {n}" for c, n in e["adaptive_choices"].items()) + " layers")
    if summary["missing"]:
        lines.append(f"missing:     a version {summary['format_version']} state has no "
                     f"{' and no '.join(summary['missing'])}; recalibrate with this version to get them")
    if summary["most_sensitive"]:
        lines.append("most sensitive (relative W4A4 output error on the calibration sample, adaptive choice):")
        lines += [f"  {r['expert'] + '/' + r['layer']:<40} {r['error']:.4g}  {r['adaptive']}"
                  for r in summary["most_sensitive"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hifloat4 inspect",
                                description="Validate a HiFloat4 PTQ state file and print its contents.")
    p.add_argument("file", help="a .safetensors PTQ state")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        summary = summarize(args.file)
    except PTQStateError as e:
        print(f"error: {args.file}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True) if args.json else render(summary))
    return 0
