"""Wan2.2 layer policy: which Linear layers are quantized, which stay high precision,
what model this is, and a cheap fingerprint that tells two experts apart.

Works on anything that names Wan's layers the original way: ComfyUI's WanModel,
hifloat4.wan_model, a state dict, or a {key: shape} mapping (meta-device models
and shape-only mappings give a fingerprint without a content hash). A common key
prefix such as "diffusion_model." or "model.diffusion_model." is found and
stripped, so every returned name is relative to the Wan transformer root.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .safefile import is_int

MAIN_SUFFIXES = (
    "self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
    "ffn.0", "ffn.2",
)
BOUNDARY_NAMES = (
    "text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2",
    "time_projection.1", "head.head",
)
_IMG_EMB = "img_emb."
_ANCHOR = "time_embedding.0"  # a Linear every Wan transformer has, used to find the key prefix
_MAIN_RE = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(s) for s in MAIN_SUFFIXES) + r")")

# (dim, ffn_dim, layers, in_dim, out_dim) -> variant name
KNOWN_VARIANTS = {
    (5120, 13824, 40, 16, 16): "t2v_a14b",
    (5120, 13824, 40, 36, 16): "i2v_a14b",
    (3072, 14336, 30, 48, 48): "ti2v_5b",
}
VARIANT_TITLES = {"t2v_a14b": "T2V-A14B", "i2v_a14b": "I2V-A14B", "ti2v_5b": "TI2V-5B"}
FINGERPRINT_VERSION = 1
PROBE_VALUES = 32  # leading elements read from each probed row
PROBE_TOLERANCE = 1e-2  # relative L2 distance still counted as "the same weights"

WanLike = nn.Module | Mapping[str, Tensor | Sequence[int]]


class NotWanError(ValueError):
    """The object does not have the layers of a Wan transformer."""


# --------------------------------------------------------------------------- shapes

def is_linear(m: nn.Module) -> bool:
    """nn.Linear, or a module that computes like one without subclassing it (ComfyUI's
    mixed-precision Linear holding a quantized weight tensor): integer in/out
    features and a weight of shape (out, in)."""
    if isinstance(m, nn.Linear):
        return True
    w = getattr(m, "weight", None)
    return (isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int)
            and isinstance(w, Tensor) and tuple(w.shape) == (m.out_features, m.in_features))


def _raw_entries(obj: WanLike) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]]]:
    """(Linear name -> (out, in), parameter key -> shape), unprefixed names as given."""
    if isinstance(obj, nn.Module):
        linears = {n: (m.out_features, m.in_features) for n, m in obj.named_modules() if is_linear(m)}
        params = {n: tuple(p.shape) for n, p in obj.named_parameters()}
        return linears, params
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected an nn.Module or a state-dict-like mapping, got {type(obj).__name__}")
    params = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(int(s) for s in v) for k, v in obj.items()}
    linears = {k[: -len(".weight")]: s for k, s in params.items() if k.endswith(".weight") and len(s) == 2}
    return linears, params


def find_prefix(names) -> str:
    """The prefix in front of Wan's layer names ("" for a bare transformer)."""
    hits = {n[: -len(_ANCHOR)] for n in names
            if n == _ANCHOR or n.endswith("." + _ANCHOR)}
    if len(hits) > 1:
        raise NotWanError(f"several Wan transformers found under prefixes {sorted(hits)}")
    return hits.pop() if hits else ""


def _strip(d: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}


def _view(obj: WanLike) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, ...]], str]:
    linears, params = _raw_entries(obj)
    prefix = find_prefix(linears)
    return _strip(linears, prefix), _strip(params, prefix), prefix


def linear_shapes(obj: WanLike) -> dict[str, tuple[int, int]]:
    """Every Linear layer name -> (out_features, in_features)."""
    return _view(obj)[0]


def classify_layer_names(names) -> tuple[list[str], list[str], list[str]]:
    """Split Linear names (relative to the Wan root) into (main, boundary, other),
    main in block order then MAIN_SUFFIXES order, boundary in BOUNDARY_NAMES order."""
    linears = list(names)
    main = sorted((n for n in linears if _MAIN_RE.fullmatch(n)),
                  key=lambda n: (int(_MAIN_RE.fullmatch(n).group(1)),
                                 MAIN_SUFFIXES.index(_MAIN_RE.fullmatch(n).group(2))))
    boundary = [n for n in BOUNDARY_NAMES if n in linears]
    boundary += sorted(n for n in linears if n.startswith(_IMG_EMB))
    classified = set(main) | set(boundary)
    other = sorted(n for n in linears if n not in classified)
    return main, boundary, other


def main_linear_names(obj: WanLike) -> list[str]:
    """The quantized layers: per block (in block order) self_attn.q/k/v/o,
    cross_attn.q/k/v/o, ffn.0, ffn.2."""
    return classify_layer_names(linear_shapes(obj))[0]


# --------------------------------------------------------------------------- variant

@dataclass(frozen=True)
class WanVariant:
    family: str  # "wan2.2" ("wan2.1" when the Wan2.1-I2V img_emb branch is present)
    variant: str  # "t2v_a14b" | "i2v_a14b" | "ti2v_5b" | "custom"
    kind: str  # "t2v" | "i2v" | "ti2v" | "unknown", from the channel counts
    dim: int
    ffn_dim: int
    layers: int
    in_dim: int
    out_dim: int
    text_dim: int
    has_img_emb: bool = False

    def describe(self) -> str:
        return (f"{self.family} {self.variant} ({self.kind}, dim {self.dim}, ffn {self.ffn_dim}, "
                f"{self.layers} blocks, in {self.in_dim}, out {self.out_dim})")

    def title(self) -> str:
        """The name a user knows the model by ("Wan2.2 I2V-A14B"); other sizes say
        their type and size ("a custom Wan2.2 T2V model (dim 256, 4 blocks, 16 input channels)")."""
        family = "Wan2.1" if self.family == "wan2.1" else "Wan2.2"
        if self.variant in VARIANT_TITLES:
            return f"{family} {VARIANT_TITLES[self.variant]}"
        kind = self.kind.upper() if self.kind != "unknown" else "video"
        return (f"a custom {family} {kind} model (dim {self.dim}, {self.layers} blocks, "
                f"{self.in_dim} input channels)")


def _kind(in_dim: int, out_dim: int) -> str:
    if in_dim == out_dim == 48:
        return "ti2v"
    if in_dim == out_dim:
        return "t2v"
    if in_dim == out_dim + 20:  # 4 mask + 16 image-latent conditioning channels
        return "i2v"
    return "unknown"


def detect_variant(obj: WanLike) -> WanVariant:
    """Identify the Wan model from layer shapes alone.

    Wan2.1-14B T2V has exactly the shapes of a Wan2.2-A14B expert and is reported
    as t2v_a14b: the quantization policy is the same for both.
    """
    linears, params, _ = _view(obj)
    main, _, _ = classify_layer_names(linears)
    need = [n for n in ("time_embedding.0", "text_embedding.0", "head.head") if n not in linears]
    if "patch_embedding.weight" not in params or len(params["patch_embedding.weight"]) != 5:
        need.append("patch_embedding (Conv3d)")
    if not main:
        need.append("blocks.N main layers")
    if need:
        raise NotWanError(f"not a Wan transformer: missing {', '.join(need)}")
    patch_w = params["patch_embedding.weight"]
    dim, in_dim, patch = patch_w[0], patch_w[1], patch_w[2:]
    head_out = linears["head.head"][0]
    if head_out % math.prod(patch):
        raise NotWanError(f"head.head out_features {head_out} is not a multiple of the patch {patch}")
    out_dim = head_out // math.prod(patch)
    indices = sorted({int(_MAIN_RE.fullmatch(n).group(1)) for n in main})
    layers = len(indices)
    if indices != list(range(layers)) or len(main) != layers * len(MAIN_SUFFIXES):
        have = set(main)  # counted, not listed: a hostile block index such as 10**12 must stay cheap
        missing = itertools.islice((f"blocks.{i}.{s}" for i in range(indices[-1] + 1) for s in MAIN_SUFFIXES
                                    if f"blocks.{i}.{s}" not in have), 5)
        count = (indices[-1] + 1) * len(MAIN_SUFFIXES) - len(have)
        raise NotWanError(f"incomplete Wan blocks: missing {', '.join(missing)}"
                          + (f" and {count - 5} more" if count > 5 else ""))
    ffn_dim = linears["blocks.0.ffn.0"][0]
    has_img = any(n.startswith(_IMG_EMB) for n in linears)
    variant = "custom" if has_img or tuple(patch) != (1, 2, 2) else \
        KNOWN_VARIANTS.get((dim, ffn_dim, layers, in_dim, out_dim), "custom")
    return WanVariant(family="wan2.1" if has_img else "wan2.2", variant=variant, kind=_kind(in_dim, out_dim),
                      dim=dim, ffn_dim=ffn_dim, layers=layers, in_dim=in_dim, out_dim=out_dim,
                      text_dim=linears["text_embedding.0"][1], has_img_emb=has_img)


# --------------------------------------------------------------------------- fingerprint

def shape_hash(layers: Mapping[str, Sequence[int]], patch_embedding: Sequence[int] | None = None) -> str:
    """sha256 of the canonical JSON of the Linear shapes {name: [out, in]} and the
    patch-embedding shape (which alone tells T2V from I2V: their Linears are equal)."""
    canon = json.dumps({"layers": {k: [int(s) for s in v] for k, v in layers.items()},
                        "patch_embedding": None if patch_embedding is None else [int(s) for s in patch_embedding]},
                       sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _probe_layers(main: list[str], boundary: list[str]) -> list[str]:
    """Fixed layers sampled for the content hash: first, middle and last block's
    self_attn.q and ffn.2, plus text_embedding.0 and head.head."""
    layers = len(main) // len(MAIN_SUFFIXES)
    blocks = sorted({0, layers // 2, max(layers - 1, 0)}) if layers else []
    names = [f"blocks.{b}.{s}" for b in blocks for s in ("self_attn.q", "ffn.2")]
    return [n for n in names + ["text_embedding.0", "head.head"] if n in set(main) | set(boundary)]


def _default_getter(obj: WanLike, prefix: str) -> Callable[[str], Tensor | None]:
    if isinstance(obj, nn.Module):
        modules = dict(obj.named_modules())
        return lambda name: getattr(modules.get(prefix + name), "weight", None)
    return lambda name: obj.get(prefix + name + ".weight")


def _probe(names: list[str], shapes: Mapping[str, tuple[int, int]],
           get_weight: Callable[[str], Tensor | None]) -> list[float] | None:
    """Rows 0 and out//2, first PROBE_VALUES elements of each probed layer, rounded
    to bf16 so fp32/fp16/bf16 copies of a bf16 checkpoint give the same values."""
    values = []
    for name in names:
        w = get_weight(name)
        if not isinstance(w, Tensor) or w.is_meta or w.dim() != 2:
            return None
        out_f = shapes[name][0]
        rows = w[[0, out_f // 2], :PROBE_VALUES].detach().to("cpu", torch.float32)
        values += rows.to(torch.bfloat16).float().reshape(-1).tolist()
    return values or None


def fingerprint(obj: WanLike, get_weight: Callable[[str], Tensor | None] | None = None) -> dict:
    """{"version", "layers": {name: [out, in]} of all main+boundary Linears (sorted),
    "patch_embedding": its weight shape, "shape_hash" (of both), "content_hash" (None when weights cannot be read, e.g. meta),
    "probe": the sampled values (None likewise)}. JSON-serialisable.

    `get_weight(name) -> Tensor` overrides how weights are read (names relative to
    the Wan root), e.g. to dequantize fp8-scaled weights: raw fp8 values of an
    fp8_scaled checkpoint are NOT dequantized here, so they fingerprint differently
    from the bf16/fp16 checkpoint they came from.
    """
    linears, params, prefix = _view(obj)
    main, boundary, _ = classify_layer_names(linears)
    if not main:
        raise NotWanError("not a Wan transformer: no blocks.N main Linear layers")
    layers = {n: [int(s) for s in linears[n]] for n in sorted(main + boundary)}
    patch = params.get("patch_embedding.weight")
    patch = None if patch is None else [int(s) for s in patch]
    probe = _probe(_probe_layers(main, boundary), linears, get_weight or _default_getter(obj, prefix))
    content = None
    if probe is not None:
        content = hashlib.sha256(torch.tensor(probe, dtype=torch.float32).numpy().tobytes()).hexdigest()
    return {"version": FINGERPRINT_VERSION, "layers": layers, "patch_embedding": patch,
            "shape_hash": shape_hash(layers, patch), "content_hash": content, "probe": probe}


def fingerprint_title(fp: Mapping) -> str:
    """WanVariant.title() of the model a fingerprint was taken from (its layer and
    patch-embedding shapes say which), e.g. to tell a user what a PTQ state was made for."""
    shapes: dict[str, Sequence[int]] = {f"{n}.weight": s for n, s in fp.get("layers", {}).items()}
    if fp.get("patch_embedding"):
        shapes["patch_embedding.weight"] = fp["patch_embedding"]
    try:
        return detect_variant(shapes).title()
    except ValueError:
        return f"a Wan model with {len(fp.get('layers', {}))} quantizable layers"


def check_fingerprint(fp) -> None:
    """Raise ValueError naming the problem if `fp` is not a well-formed fingerprint."""
    if not isinstance(fp, dict):
        raise ValueError("fingerprint is not an object")
    expected = {"version", "layers", "patch_embedding", "shape_hash", "content_hash", "probe"}
    if set(fp) != expected:
        raise ValueError(f"fingerprint fields {sorted(fp)} != {sorted(expected)}")
    if fp["version"] != FINGERPRINT_VERSION or isinstance(fp["version"], bool):
        raise ValueError(f"fingerprint version {fp['version']!r} unsupported")
    layers = fp["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ValueError("fingerprint layers must be a non-empty object")
    for name, shape in layers.items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and s > 0 for s in shape)):
            raise ValueError(f"fingerprint shape of {name!r} must be [out, in] positive ints, got {shape!r}")
    patch = fp["patch_embedding"]
    if patch is not None and not (isinstance(patch, list) and all(is_int(s) and s > 0 for s in patch)):
        raise ValueError(f"fingerprint patch_embedding must be null or positive ints, got {patch!r}")
    if fp["shape_hash"] != shape_hash(layers, patch):
        raise ValueError("fingerprint shape_hash does not match its layers")
    probe, content = fp["probe"], fp["content_hash"]
    if (probe is None) != (content is None):
        raise ValueError("fingerprint probe and content_hash must both be present or both null")
    if probe is not None:
        if not (isinstance(probe, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and math.isfinite(v) for v in probe)):
            raise ValueError("fingerprint probe must be a list of finite numbers")
        if hashlib.sha256(torch.tensor(probe, dtype=torch.float32).numpy().tobytes()).hexdigest() != content:
            raise ValueError("fingerprint content_hash does not match its probe")


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-30))


def _match(fp: dict, candidates: Mapping[str, dict]) -> tuple[str | None, str]:
    same_shape = [n for n, c in candidates.items() if c.get("shape_hash") == fp.get("shape_hash")]
    if fp.get("content_hash") is not None:
        exact = [n for n in same_shape if candidates[n].get("content_hash") == fp["content_hash"]]
        if len(exact) == 1:
            return exact[0], f"exact content match with {exact[0]!r}"
        if len(exact) > 1:
            return None, f"ambiguous: identical content in {exact}"
    dists = {n: _distance(fp["probe"], candidates[n]["probe"]) for n in same_shape
             if fp.get("probe") and candidates[n].get("probe")
             and len(candidates[n]["probe"]) == len(fp["probe"])}
    close = [n for n, d in dists.items() if d <= PROBE_TOLERANCE]
    if len(close) == 1:
        return close[0], f"{close[0]!r} within rounding (relative distance {dists[close[0]]:.2e})"
    return None, "ambiguous: several candidates within rounding" if close else "no candidate matches"


def match_fingerprint(fp: dict, candidates: Mapping[str, dict]) -> str | None:
    """Name of the candidate describing the same weights as `fp`, else None.

    Exact content hash first; failing that, a unique same-shaped candidate whose
    probe is within PROBE_TOLERANCE relative L2 (copies of one checkpoint in other
    dtypes). A fingerprint without content (meta weights) matches nothing: shapes
    alone cannot tell two experts apart. hifloat4.experts says what a refused model is.
    """
    return _match(fp, candidates)[0]
