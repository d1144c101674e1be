"""The PTQ state file: per-layer channel masks plus the raw statistics they came
from, for one or two Wan experts, in a .safetensors file (never pickle).

Layout (format version 2). Tensors per expert and main layer, C = in_features:
    "<expert>/<layer>/mask"    (C,) fp16   m_c, the SmoothQuant channel mask in use
    "<expert>/<layer>/absmax"  (C,) bf16   max |x_c| over calibration tokens
    "<expert>/<layer>/tail"    (C,) bf16   the percentile statistic of |x_c|
    "<expert>/<layer>/wmax"    (C,) bf16   max_o |W[o, c]|, so masks can be re-derived (masks.remask)
    "<expert>/<layer>/tails"   (3, C) bf16 |x_c| at ADAPTIVE_PERCENTILES (p99, p99.9, p99.99)
    "<expert>/<layer>/errors"  (5,) fp32   relative output error ||Q(x m) Q(W/m)^T - x W^T|| / ||x W^T||
                                           on the calibration token sample, for the masks of
                                           ERROR_KEYS: the calibrated mask (the sensitivity),
                                           then each CANDIDATES statistic at the calibrated
                                           alpha and rotation (the "adaptive" choice)
Each statistic is max over calibration calls of that call's value, so per channel
p99 <= p99.9 <= p99.99 <= absmax and tail <= absmax (checked at load).
Version 1 files (no tails/errors) still load, with those fields None: they cannot
give a sensitivity or an "adaptive" statistic (`missing_features` says so); saving
a state without them writes version 1 again, a state with them version 2.
Metadata: ONE key, METADATA_KEY, holding a JSON object (sorted keys). One key
because safetensors writes a multi-key metadata map in random order, and a
shared calibration file should be byte-identical each time it is written. The
object holds format name/version, HiF4 spec id, method, alpha, percentile,
statistic, rotation, model family/variant, the experts (name, ordered layer
list, model fingerprint), calibration settings, tool version, free-form `extra`,
optionally `patches` (per expert, the LoRA / weight patches the model carried at
calibration, hifloat4.patchset; absent in states written before it existed, which
still load with it None), and a sha256 checksum over the canonical metadata and
every tensor's name, dtype, shape and bytes. `load_state` checks all of it and raises PTQStateError.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch
from torch import Tensor, nn

from hifloat4 import patchset
from hifloat4 import rotation as hrotation
from hifloat4 import wan
from hifloat4.rotation import Rotation
from hifloat4.safefile import (
    EXPERT_RE,
    SUFFIX,
    HiF4FileError,
    atomic_file,
    check_fields,
    few,
    is_int,
    loads_json,
    parse_header,
    read_regular,
    safe_output_path,
)
from hifloat4.smoothing import STATISTICS
from hifloat4.stats import ADAPTIVE_PERCENTILES
from hifloat4.version import __version__

FORMAT_NAME = "hifloat4-ptq"
FORMAT_VERSION = 2  # what a calibration writes; READABLE_VERSIONS are what load accepts
READABLE_VERSIONS = (1, 2)
HIF4_SPEC_ID = "hif4-arxiv2602.11287-v1"
METHOD = "tail-aware-smoothquant"
METADATA_KEY = "hifloat4_ptq"
TENSOR_FIELDS = ("mask", "absmax", "tail", "wmax")  # (C,) each, every version
V2_FIELDS = ("tails", "errors")  # format version 2: required there, refused in version 1
# The statistics an "adaptive" choice picks from per layer, in this order (ties go to
# the earlier one), and the masks whose output error calibration records.
CANDIDATES: tuple[str, ...] = tuple(f"p{q:g}" for q in ADAPTIVE_PERCENTILES) + ("max",)
ERROR_KEYS: tuple[str, ...] = ("calibrated",) + CANDIDATES
REMASK_STATISTICS: tuple[str, ...] = STATISTICS + ("adaptive",)
# Storage dtypes. Masks are used exactly as stored (fp16: 11 significant bits, range
# covers the mask clamp); raw statistics only feed mask derivation, so bf16 (fp32's
# range, 8 bits) is plenty. Masks are always derived from the *stored* statistics,
# so re-deriving them with the same settings reproduces the stored masks bit for bit.
# Version 1: 8 bytes per channel, 0.067% of a bf16 Wan2.2-A14B expert pair. Version 2
# adds 6 bytes per channel (tails) and 20 per layer (errors, fp32: few, and compared with
# each other to pick the adaptive statistic): 0.117% (`layer_nbytes`).
FIELD_DTYPES = {"mask": torch.float16, "absmax": torch.bfloat16, "tail": torch.bfloat16, "wmax": torch.bfloat16,
                "tails": torch.bfloat16, "errors": torch.float32}
_TAIL_SLACK = 1e-6  # tail <= absmax (and tails in order) up to float rounding of the interpolation
MAX_STATE_BYTES = 2**30  # read whole: both A14B experts are 37 MiB

_LAYER_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class PTQStateError(HiF4FileError):
    """Anything wrong with a PTQ state or its file; the message names the problem."""


def tool_version() -> str:
    return __version__


@dataclass
class LayerState:
    """Per-input-channel tensors of one quantized Linear, each (C,), dtypes FIELD_DTYPES;
    `tails` (3, C) and `errors` (5,) as in the module docstring, None in version 1 states."""

    mask: Tensor
    absmax: Tensor
    tail: Tensor
    wmax: Tensor
    tails: Tensor | None = None
    errors: Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.mask.shape[0])


@dataclass
class ExpertState:
    """The layers of one expert (in stable policy order) and its model fingerprint."""

    layers: dict[str, LayerState]
    fingerprint: dict


@dataclass
class PTQState:
    experts: dict[str, ExpertState]
    alpha: float = 0.5
    percentile: float = 99.9
    statistic: str = "tail"
    rotation: dict | None = None  # {"block": int, "seed": int}
    model_family: str = "wan2.2"
    model_variant: str = "custom"
    calibration: dict = field(default_factory=dict)  # prompts, steps, sampler, scheduler, cfg, ...
    hif4_spec: str = HIF4_SPEC_ID
    method: str = METHOD
    tool_version: str = field(default_factory=tool_version)
    extra: dict = field(default_factory=dict)
    patches: dict[str, list[dict]] | None = None  # hifloat4.patchset record per expert; None: not recorded

    @property
    def expert_names(self) -> list[str]:
        return list(self.experts)


# --------------------------------------------------------------------------- versions and sizes

def missing_features(state: PTQState) -> list[str]:
    """What a version 1 state cannot do, in words for nodes and the CLI; [] for version 2."""
    if format_version(state) == FORMAT_VERSION:
        return []
    return ["per-layer sensitivity (keep_high_precision)", "adaptive statistic"]


def format_version(state: PTQState) -> int:
    """The version a state is written as: 2 when every layer has tails and errors, 1 when none has."""
    layers = [ls for ex in state.experts.values() for ls in ex.layers.values()]
    has = {(ls.tails is not None, ls.errors is not None) for ls in layers}
    if has == {(True, True)}:
        return FORMAT_VERSION
    if has == {(False, False)}:
        return 1
    raise PTQStateError("every layer needs both tails and errors (format version 2) or neither (version 1)")


def layer_nbytes(channels: int) -> int:
    """Tensor bytes of one layer with `channels` inputs in a version 2 (FORMAT_VERSION) state."""
    return sum(math.prod(_shape(f, channels)) * torch.empty(0, dtype=FIELD_DTYPES[f]).element_size()
               for f in _fields(FORMAT_VERSION))


def state_nbytes(state: PTQState) -> int:
    """Bytes of tensor data (the file adds a JSON header of a few tens of kB per expert)."""
    fields = _fields(format_version(state))
    return sum(getattr(ls, f).numel() * getattr(ls, f).element_size()
               for ex in state.experts.values() for ls in ex.layers.values() for f in fields)


# --------------------------------------------------------------------------- validation

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TYPES = {
    "format": (str,), "format_version": (int,), "hif4_spec": (str,), "method": (str,),
    "alpha": (int, float), "percentile": (int, float), "statistic": (str,), "rotation": (dict, type(None)),
    "model_family": (str,), "model_variant": (str,), "experts": (list,), "calibration": (dict,),
    "tool_version": (str,), "extra": (dict,), "checksum": (str,),
}
_OPTIONAL_TYPES = {"patches": (dict,)}  # absent in older states


def _check_metadata(meta) -> None:
    if not isinstance(meta, dict):
        raise PTQStateError("bad metadata: not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise PTQStateError(f"wrong format name {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if meta.get("format_version") not in READABLE_VERSIONS or not is_int(meta.get("format_version")):
        raise PTQStateError(f"unsupported format version {meta.get('format_version')!r}, "
                            f"this tool reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    check_fields(meta, _TYPES | {k: t for k, t in _OPTIONAL_TYPES.items() if k in meta}, PTQStateError)
    if not (_is_number(meta["alpha"]) and 0.0 <= meta["alpha"] <= 1.0):
        raise PTQStateError(f"alpha must be in [0, 1], got {meta['alpha']!r}")
    if not (_is_number(meta["percentile"]) and 0.0 < meta["percentile"] <= 100.0):
        raise PTQStateError(f"percentile must be in (0, 100], got {meta['percentile']!r}")
    statistics = STATISTICS if meta["format_version"] == 1 else REMASK_STATISTICS  # "adaptive" needs version 2
    if meta["statistic"] not in statistics:
        raise PTQStateError(f"statistic must be one of {statistics} in format version {meta['format_version']}, "
                            f"got {meta['statistic']!r}")
    _check_rotation(meta["rotation"])
    _check_experts(meta["experts"])
    if "patches" in meta:
        patchset.check_record(meta["patches"], [ex["name"] for ex in meta["experts"]], PTQStateError)


def _check_rotation(rot: dict | None) -> None:
    """What the rotation code accepts (block a power of two, seed in [0, 2**63)), block <= rotation.MAX_BLOCK."""
    if rot is None:
        return
    if set(rot) != {"block", "seed"}:
        raise PTQStateError(f"rotation must be null or {{'block': int, 'seed': int}}, got keys {few(map(str, rot))}")
    try:
        Rotation(block=rot["block"], seed=rot["seed"])
    except ValueError as e:
        raise PTQStateError(f"rotation: {e}") from None
    if rot["block"] > hrotation.MAX_BLOCK:
        raise PTQStateError(f"rotation block {rot['block']} is larger than {hrotation.MAX_BLOCK}")


def _check_experts(experts: list) -> None:
    if not experts:
        raise PTQStateError("no experts in metadata")
    names = []
    for ex in experts:
        if not (isinstance(ex, dict) and set(ex) == {"name", "layers", "fingerprint"}):
            raise PTQStateError("each expert must be an object with exactly name, layers, fingerprint")
        name, layers, fp = ex["name"], ex["layers"], ex["fingerprint"]
        if not (isinstance(name, str) and EXPERT_RE.fullmatch(name)):
            raise PTQStateError(f"bad expert name {name!r}")
        names.append(name)
        try:
            wan.check_fingerprint(fp)
        except ValueError as e:
            raise PTQStateError(f"expert {name!r}: {e}") from None
        if not (isinstance(layers, list) and layers and all(isinstance(n, str) for n in layers)):
            raise PTQStateError(f"expert {name!r}: layers must be a non-empty list of names")
        if len(set(layers)) != len(layers):
            raise PTQStateError(f"expert {name!r}: duplicate layer names")
        bad = [n for n in layers if not _LAYER_RE.fullmatch(n)]
        if bad:
            raise PTQStateError(f"expert {name!r}: bad layer names {few(bad)}")
        unknown = [n for n in layers if n not in fp["layers"]]
        if unknown:
            raise PTQStateError(f"expert {name!r}: layers not in its fingerprint: {few(unknown)}")
    if len(set(names)) != len(names):
        raise PTQStateError(f"duplicate expert names in {names}")


def _fields(version: int) -> tuple[str, ...]:
    return TENSOR_FIELDS + (V2_FIELDS if version >= 2 else ())


def _shape(f: str, channels: int) -> tuple[int, ...]:
    return {"tails": (len(ADAPTIVE_PERCENTILES), channels), "errors": (len(ERROR_KEYS),)}.get(f, (channels,))


def _check_tensors(tensors: Mapping[str, Tensor], meta: dict) -> None:
    experts = {ex["name"]: ex for ex in meta["experts"]}
    strangers = {k.split("/", 1)[0] for k in tensors} - set(experts)
    if strangers:
        raise PTQStateError(f"tensors for experts not named in metadata: {few(strangers)} "
                            f"(metadata names {sorted(experts)})")
    fields = _fields(meta["format_version"])
    expected = {f"{e}/{ln}/{f}" for e, ex in experts.items() for ln in ex["layers"] for f in fields}
    if expected - set(tensors):
        raise PTQStateError(f"missing tensors: {few(expected - set(tensors))}")
    if set(tensors) - expected:
        raise PTQStateError(f"unexpected tensors: {few(set(tensors) - expected)} "
                            f"(format version {meta['format_version']})")
    for e, ex in experts.items():
        for ln in ex["layers"]:
            channels = ex["fingerprint"]["layers"][ln][1]
            for f in fields:
                _check_tensor(f"{e}/{ln}/{f}", tensors[f"{e}/{ln}/{f}"], f, _shape(f, channels), ln)
            _check_order(tensors, f"{e}/{ln}", meta["format_version"])


def _check_tensor(key: str, t: Tensor, f: str, shape: tuple[int, ...], layer: str) -> None:
    if t.dtype != FIELD_DTYPES[f]:
        raise PTQStateError(f"tensor {key!r} has dtype {t.dtype}, expected {FIELD_DTYPES[f]}")
    if tuple(t.shape) != shape:
        raise PTQStateError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {shape} "
                            f"(from the in_features of {layer} in the fingerprint)")
    if not torch.isfinite(t).all():
        raise PTQStateError(f"tensor {key!r} has NaN/Inf values")
    if f == "mask" and not (t > 0).all():
        raise PTQStateError(f"tensor {key!r} has non-positive mask values")
    if f != "mask" and (t < 0).any():
        raise PTQStateError(f"tensor {key!r} has negative {'errors' if f == 'errors' else 'statistics'}")


def _check_order(tensors: Mapping[str, Tensor], prefix: str, version: int) -> None:
    """tail <= absmax, and p99 <= p99.9 <= p99.99 <= absmax (version 2), up to _TAIL_SLACK."""
    absmax = tensors[f"{prefix}/absmax"].float()
    chain = [tensors[f"{prefix}/tail"].float(), absmax]
    if (chain[0] > chain[1] * (1 + _TAIL_SLACK)).any():
        raise PTQStateError(f"layer {prefix}: tail statistic exceeds absmax")
    if version < 2:
        return
    ordered = list(tensors[f"{prefix}/tails"].float()) + [absmax]
    if any((lo > hi * (1 + _TAIL_SLACK)).any() for lo, hi in zip(ordered, ordered[1:])):
        raise PTQStateError(f"layer {prefix}: tails are not ordered p99 <= p99.9 <= p99.99 <= absmax")


def compute_checksum(tensors: Mapping[str, Tensor], meta: Mapping) -> str:
    """sha256 over the canonical metadata (minus the checksum) and, in sorted name
    order, each tensor's name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    body = {k: v for k, v in meta.items() if k != "checksum"}
    h.update(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _validate(tensors: Mapping[str, Tensor], meta) -> None:
    _check_metadata(meta)
    _check_tensors(tensors, meta)
    if compute_checksum(tensors, meta) != meta["checksum"]:
        raise PTQStateError("checksum mismatch: the file was modified or corrupted")


# --------------------------------------------------------------------------- encode / decode

def encode_state(state: PTQState) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a state, validated exactly as load_state would."""
    tensors = {}
    version = format_version(state)
    for e, ex in state.experts.items():
        for ln, ls in ex.layers.items():
            for f in _fields(version):
                t = getattr(ls, f)
                if not isinstance(t, Tensor):
                    raise PTQStateError(f"{e}/{ln}/{f} is not a tensor")
                tensors[f"{e}/{ln}/{f}"] = t.detach().to("cpu").contiguous()
    meta = {
        "format": FORMAT_NAME, "format_version": version, "hif4_spec": state.hif4_spec,
        "method": state.method, "alpha": state.alpha, "percentile": state.percentile,
        "statistic": state.statistic, "rotation": state.rotation, "model_family": state.model_family,
        "model_variant": state.model_variant,
        "experts": [{"name": e, "layers": list(ex.layers), "fingerprint": ex.fingerprint}
                    for e, ex in state.experts.items()],
        "calibration": state.calibration, "tool_version": state.tool_version, "extra": state.extra,
    }
    if state.patches is not None:
        meta["patches"] = state.patches
    try:  # normalise to what JSON gives back (tuples -> lists, numpy/torch scalars rejected)
        meta = json.loads(json.dumps(meta, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise PTQStateError(f"metadata is not JSON-serialisable: {e}") from None
    meta["checksum"] = compute_checksum(tensors, meta)
    _validate(tensors, meta)
    return tensors, {METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)}


def decode_state(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> PTQState:
    """Validate tensors + safetensors metadata and build the PTQState."""
    if not metadata or METADATA_KEY not in metadata:
        raise PTQStateError(f"not a HiFloat4 PTQ state: metadata key {METADATA_KEY!r} missing "
                            f"(wrong format name)")
    if set(metadata) != {METADATA_KEY}:  # the checksum covers only this key, so nothing else may ride along
        raise PTQStateError(f"unknown safetensors metadata keys: {few(set(metadata) - {METADATA_KEY})}")
    if not isinstance(metadata[METADATA_KEY], str):
        raise PTQStateError("bad metadata JSON: not a string")
    meta = loads_json(metadata[METADATA_KEY], PTQStateError, "bad metadata JSON")
    _validate(tensors, meta)
    fields = _fields(meta["format_version"])
    experts = {
        ex["name"]: ExpertState(
            layers={ln: LayerState(**{f: tensors[f"{ex['name']}/{ln}/{f}"] for f in fields})
                    for ln in ex["layers"]},
            fingerprint=ex["fingerprint"])
        for ex in meta["experts"]}
    return PTQState(experts=experts, alpha=float(meta["alpha"]), percentile=float(meta["percentile"]),
                    statistic=meta["statistic"], rotation=meta["rotation"], model_family=meta["model_family"],
                    model_variant=meta["model_variant"], calibration=meta["calibration"],
                    hif4_spec=meta["hif4_spec"], method=meta["method"], tool_version=meta["tool_version"],
                    extra=meta["extra"], patches=meta.get("patches"))


# --------------------------------------------------------------------------- files

def safe_state_path(directory: str | os.PathLike, name: str) -> str:
    """Join a user-supplied bare file name to `directory`, refusing anything that could
    point elsewhere (hifloat4.safefile.safe_output_path)."""
    return safe_output_path(directory, name, what="state", suffix=SUFFIX, error=PTQStateError)


def save_state(path: str | os.PathLike, state: PTQState) -> str:
    """Validate and write atomically: temp file in the same directory, fsync, os.replace.
    The temp file is removed on any failure. Returns the path written."""
    path = os.fspath(path)
    if not path.endswith(SUFFIX):
        raise PTQStateError(f"state file {path!r} must end in {SUFFIX}")
    tensors, metadata = encode_state(state)
    data = safetensors.torch.save(tensors, metadata=metadata)
    with atomic_file(path) as f:
        f.write(data)
    return path


def load_state(path: str | os.PathLike) -> PTQState:
    """Read and fully validate a PTQ state file; every problem raises PTQStateError."""
    path = os.fspath(path)
    data = read_regular(path, PTQStateError, MAX_STATE_BYTES)
    header = parse_header(data, PTQStateError, path)
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise PTQStateError(f"not a HiFloat4 PTQ state: metadata key {METADATA_KEY!r} missing "
                            f"(wrong format name)")
    stored = {"F16", "BF16", "F32"}  # FIELD_DTYPES as safetensors names; the per-field check comes after loading
    bad = [k for k, v in header.items() if k != "__metadata__" and not (isinstance(v, dict) and v.get("dtype") in stored)]
    if bad:
        raise PTQStateError(f"tensors with wrong dtype (must be F16, BF16 or F32): {few(bad)}")
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:  # safetensors raises its own error types for malformed files
        raise PTQStateError(f"not a readable safetensors file: {e}") from None
    return decode_state(tensors, metadata)


def validate_against_model(state: PTQState, expert: str,
                           layer_shapes: Mapping[str, Sequence[int]] | nn.Module) -> None:
    """Raise PTQStateError naming the first layer of `expert` that the model lacks or
    whose in_features differ. `layer_shapes`: {name: (out, in)} such as
    wan.linear_shapes(model), or a module / state dict (converted the same way)."""
    if expert not in state.experts:
        raise PTQStateError(f"state has no expert {expert!r}; it has {state.expert_names}")
    if isinstance(layer_shapes, nn.Module) or any(k.endswith(".weight") for k in layer_shapes):
        layer_shapes = wan.linear_shapes(layer_shapes)
    for name, ls in state.experts[expert].layers.items():
        if name not in layer_shapes:
            raise PTQStateError(f"layer {name!r} of expert {expert!r} is not a Linear of the model")
        in_features = int(layer_shapes[name][-1])
        if in_features != ls.channels:
            raise PTQStateError(f"layer {name!r} of expert {expert!r}: model has {in_features} input "
                                f"channels, state has {ls.channels}")
