"""Shareable HiF4 checkpoints: one Wan2.2 expert in a `.safetensors` file whose main
Linear weights are packed HiF4 (4.5 bits per value) with the PTQ masks embedded.

`python -m hifloat4 export --model MODEL.safetensors --state STATE.safetensors
 --expert high_noise --out OUT.safetensors`

File layout (bare Wan keys, the source's key prefix such as "model.diffusion_model."
removed):
  "<layer>.weight.hif4"  uint8 (out, ceil(in/64), 36)  pack(rot(W / m)) along in-features
  "<layer>.hif4_mask"    float32 (in,)                 the channel mask m
  everything else        unchanged (dtype and values), biases of main layers included;
                         fp8 "scaled" sources are dequantized (main layers before
                         packing, other fp8 weights stored as bf16), their scale keys
                         and the `scaled_fp8` marker dropped
Metadata: one key, METADATA_KEY, a JSON object: format name/version (the marker),
HiF4 spec, the expert, the model variant, per-layer shape and rotation, the dtype the
loaders present the main weights as, the source fingerprint and the PTQ state's
settings and checksum.

Writing streams one tensor at a time (the header is planned from shapes first), so a
28 GB expert is never in memory: peak is about one main layer in float32. The file
is written to a temporary name in the target directory, fsynced and renamed; progress
and cancel hooks let a UI show a bar and stop it (nothing is left behind).
Loading (`load_hif4_checkpoint`) never unpickles: safetensors only, and everything is
validated first (hifloat4.safefile's header checks, marker, version, metadata types
and ranges, the exact key set and shapes of a Wan transformer of the file's
dimensions, dtypes, shapes against the per-layer metadata, finite positive masks).
The exporter runs the same header check on what it plans to write before writing.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import Tensor, nn

from . import experts as hexperts
from . import rotation as hrotation
from . import state as hstate
from . import wan as hwan
from .format import GROUP_SIZE
from .packed_linear import PackedHiF4Linear, pack_weight
from .packing import BYTES_PER_GROUP, PackedHiF4
from .rotation import Rotation
from .safefile import HiF4FileError, atomic_file, few, loads_json, read_header

FORMAT_NAME = "hifloat4-packed-wan"
FORMAT_VERSION = 1
METADATA_KEY = "hifloat4_packed"
PACKED_SUFFIX = ".weight.hif4"
MASK_SUFFIX = ".hif4_mask"
SUFFIX = ".safetensors"

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_EXPERT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_BLOCKS = 1024  # Wan2.2 has 30 or 40; bounds the model a header can make the loader describe
log = logging.getLogger("hifloat4")
_META_TYPES = {
    "format": str, "format_version": int, "hif4_spec": str, "group_size": int, "bytes_per_group": int,
    "expert": str, "weight_dtype": str, "model": dict, "layers": dict, "source": dict, "ptq": dict,
    "tool_version": str,
}


class HiF4CheckpointError(HiF4FileError):
    """Anything wrong with a packed HiF4 checkpoint or an export; the message names it."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- sources

class ModelSource:
    """What the exporter reads from a model, by bare Wan keys (no prefix).

    shapes(): every tensor of the model (a Linear's ".weight" with its logical shape);
    stored_dtype(key) / tensor(key): a tensor carried over as it is to be stored;
    real_weight(layer): a Linear's real-valued weight in float32 (dequantized,
    patches merged), what gets packed; weight_dtype(): the dtype loaders present the
    packed weights as (ComfyUI derives the model's dtype from it).
    """

    name = "model"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def stored_dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def tensor(self, key: str) -> Tensor:
        raise NotImplementedError

    def real_weight(self, layer: str) -> Tensor:
        raise NotImplementedError

    def weight_dtype(self) -> torch.dtype:
        raise NotImplementedError


class SafetensorsSource(ModelSource):
    """A Wan transformer in a .safetensors file (bare, or under a prefix such as
    "model.diffusion_model." in a full checkpoint), read one tensor at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        header = read_header(self.path, HiF4CheckpointError)  # checked before safetensors maps the file
        if METADATA_KEY in header.get("__metadata__", {}):
            raise HiF4CheckpointError(f"{self.name} is already a packed HiF4 checkpoint; export from the "
                                      "original (bf16/fp16/fp8) model file")
        try:
            self._file = safe_open(self.path, framework="pt")
        except Exception as e:  # noqa: BLE001 (safetensors raises its own error types)
            raise HiF4CheckpointError(f"cannot read {self.path} as safetensors: {e}") from None
        keys = [k for k in header if k != "__metadata__"]
        try:
            self.prefix = hwan.find_prefix(k[: -len(".weight")] for k in keys if k.endswith(".weight"))
        except hwan.NotWanError as e:
            raise HiF4CheckpointError(f"{self.name}: {e}") from None
        self.ignored = [k for k in keys if not k.startswith(self.prefix)]
        self._raw: dict[str, tuple[str, tuple[int, ...]]] = {
            k[len(self.prefix):]: (header[k]["dtype"], tuple(header[k]["shape"])) for k in keys if k.startswith(self.prefix)}
        self._scaled = {k[: -len(".scale_weight")] for k in self._raw if k.endswith(".scale_weight")}
        dropped = {"scaled_fp8"} | {k for k in self._raw if k.endswith((".scale_weight", ".scale_input"))}
        self._keys = [k for k in self._raw if k not in dropped]
        unknown = {self._raw[k][0] for k in self._keys} - set(ST_DTYPES)
        if unknown:
            raise HiF4CheckpointError(f"{self.name}: unsupported tensor dtypes {sorted(unknown)}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self._raw[k][1] for k in self._keys}

    def _dequantize(self, key: str, t: Tensor) -> Tensor:
        """Real values of a stored tensor in float32 (fp8 "scaled": times scale_weight)."""
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        t = t.float()
        if layer in self._scaled:
            t = t * self._file.get_tensor(self.prefix + layer + ".scale_weight").float()
        return t

    def _needs_dequant(self, key: str) -> bool:
        return key.endswith(".weight") and key[: -len(".weight")] in self._scaled

    def stored_dtype(self, key: str) -> torch.dtype:
        return torch.bfloat16 if self._needs_dequant(key) else ST_DTYPES[self._raw[key][0]]

    def tensor(self, key: str) -> Tensor:
        t = self._file.get_tensor(self.prefix + key)
        return self._dequantize(key, t).to(torch.bfloat16) if self._needs_dequant(key) else t

    def real_weight(self, layer: str) -> Tensor:
        key = layer + ".weight"
        return self._dequantize(key, self._file.get_tensor(self.prefix + key))

    def weight_dtype(self) -> torch.dtype:
        main, _, _ = hwan.classify_layer_names(hwan.linear_shapes(self.shapes()))
        counts: dict[torch.dtype, int] = {}
        for n in main:
            dt, shape = self._raw[n + ".weight"]
            counts[ST_DTYPES[dt]] = counts.get(ST_DTYPES[dt], 0) + math.prod(shape)
        dtype = max(counts, key=counts.get) if counts else torch.bfloat16
        return dtype if dtype in WEIGHT_DTYPES.values() else torch.bfloat16


# --------------------------------------------------------------------------- expert choice

def choose_expert(state: hstate.PTQState, fingerprint: dict, requested: str) -> tuple[str, str | None]:
    """(expert name, warning or None): hifloat4.experts.choose_expert, the rule Apply uses."""
    try:
        choice = hexperts.choose_expert(fingerprint, {n: ex.fingerprint for n, ex in state.experts.items()},
                                        requested)
    except hexperts.ExpertMismatch as e:
        raise HiF4CheckpointError(str(e)) from None
    return choice.name, choice.warning


# --------------------------------------------------------------------------- writing

@dataclass
class _Spec:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], Tensor]
    work: int = 0  # values read to produce it (progress weight); 0: its own size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


def _plan_header(specs: list[_Spec], metadata: Mapping[str, str]) -> dict:
    """The safetensors header of `specs` written in order."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for s in specs:
        header[s.key] = {"dtype": ST_NAMES[s.dtype], "shape": list(s.shape),
                         "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    return header


def write_safetensors_streaming(path: str, specs: list[_Spec], metadata: Mapping[str, str],
                                progress: Callable[[int, int], None] | None = None,
                                cancel: Callable[[], None] | None = None) -> int:
    """Write a .safetensors file tensor by tensor (the header is planned from the
    specs), atomically: temp file in the same directory, fsync, os.replace. Each
    produced tensor must have its spec's dtype and shape. Returns the file size.

    progress(done, total): called at the start and after each tensor, in units of
    values read (packing dominates the time). cancel(): called before each tensor;
    whatever it raises stops the write and leaves no file, temporary or final."""
    if sys.byteorder != "little":
        raise HiF4CheckpointError("safetensors files are little-endian; this machine is not")
    header = _plan_header(specs, metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    work = [s.work or math.prod(s.shape) for s in specs]
    total, done = sum(work), 0
    with atomic_file(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        if progress is not None:
            progress(0, total)
        for s, w in zip(specs, work):
            if cancel is not None:
                cancel()
            t = s.produce()
            if t.dtype != s.dtype or tuple(t.shape) != s.shape:
                raise HiF4CheckpointError(f"{s.key}: produced {t.dtype} {tuple(t.shape)}, planned "
                                          f"{s.dtype} {s.shape}")
            t = t.detach().to("cpu").contiguous().reshape(-1)
            f.write(t.view(torch.uint8).numpy().data)
            done += w
            if progress is not None:
                progress(done, total)
    return 8 + len(raw) + sum(s.nbytes for s in specs)


# --------------------------------------------------------------------------- export

def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


@dataclass
class ExportReport:
    path: str
    expert: str
    variant: str
    layers: int
    main_bf16_bytes: int
    codes_bytes: int  # packed HiF4 codes of the main weights
    mask_bytes: int
    other_bytes: int
    file_bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pct = 100.0 * self.codes_bytes / max(1, self.main_bf16_bytes)
        return (f"exported the {self.expert!r} expert of {self.variant} -> {self.path}\n"
                f"  {self.layers} main layers packed: {_size(self.main_bf16_bytes)} as bf16 -> "
                f"{_size(self.codes_bytes)} HiF4 codes ({pct:.2f}%) + {_size(self.mask_bytes)} masks\n"
                f"  other tensors: {_size(self.other_bytes)}; file: {_size(self.file_bytes)}")


def _ptq_summary(state: hstate.PTQState) -> dict:
    _, meta = hstate.encode_state(state)
    checksum = json.loads(meta[hstate.METADATA_KEY])["checksum"]
    return {"format": hstate.FORMAT_NAME, "format_version": hstate.format_version(state), "method": state.method,
            "alpha": state.alpha, "percentile": state.percentile, "statistic": state.statistic,
            "rotation": state.rotation, "model_family": state.model_family, "model_variant": state.model_variant,
            "calibration": state.calibration, "tool_version": state.tool_version, "checksum": checksum}


def export_expert(source: ModelSource, state: hstate.PTQState, expert: str, out_path: str | os.PathLike,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], None] | None = None) -> ExportReport:
    """Pack one expert of `source` with the masks of `state` into `out_path`.

    `expert`: "auto" (fingerprint match) or a name in the state. Every main layer of
    the model must be in the state; boundary layers and all other tensors are carried
    over unchanged. `progress(done, total)` and `cancel()` as in
    write_safetensors_streaming: a cancel (or Ctrl-C) leaves no file behind.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(SUFFIX):
        raise HiF4CheckpointError(f"output {out_path!r} must end in {SUFFIX}")
    shapes = source.shapes()
    try:
        variant = hwan.detect_variant(shapes)
    except hwan.NotWanError as e:
        raise HiF4CheckpointError(f"{source.name}: {e}") from None
    linears = hwan.linear_shapes(shapes)
    main, _, _ = hwan.classify_layer_names(linears)
    clash = [k for k in shapes if k.endswith((PACKED_SUFFIX, MASK_SUFFIX))]
    if clash:
        raise HiF4CheckpointError(f"the model already has HiF4 tensors ({few(clash)})")
    fp = hwan.fingerprint(shapes, get_weight=lambda n: source.real_weight(n) if n in linears else None)
    name, warning = choose_expert(state, fp, expert)
    try:
        hstate.validate_against_model(state, name, linears)
    except hstate.PTQStateError as e:
        raise HiF4CheckpointError(str(e)) from None
    layers = state.experts[name].layers
    if set(layers) != set(main):
        raise HiF4CheckpointError(f"the state's {name!r} expert covers {len(layers)} layers, the model has "
                                  f"{len(main)} main layers; missing: {few(set(main) - set(layers))}")
    rotations = {n: hrotation.for_layer(hrotation.from_meta(state.rotation), linears[n][1]) for n in main}
    specs: list[_Spec] = []
    main_keys = {n + ".weight": n for n in main}
    keys = (set(shapes) - set(main_keys)) | {n + PACKED_SUFFIX for n in main} | {n + MASK_SUFFIX for n in main}
    for key in sorted(keys):
        if key.endswith(PACKED_SUFFIX):
            n = key[: -len(PACKED_SUFFIX)]
            out_f, in_f = linears[n]
            mask, r = layers[n].mask, rotations[n]
            specs.append(_Spec(key, torch.uint8, (out_f, math.ceil(in_f / GROUP_SIZE), BYTES_PER_GROUP),
                               lambda n=n, mask=mask, r=r: pack_weight(source.real_weight(n), mask, r).data,
                               work=out_f * in_f))
        elif key.endswith(MASK_SUFFIX):
            n = key[: -len(MASK_SUFFIX)]
            specs.append(_Spec(key, torch.float32, (linears[n][1],), lambda n=n: layers[n].mask.float()))
        else:
            specs.append(_Spec(key, source.stored_dtype(key), tuple(shapes[key]), lambda key=key: source.tensor(key)))
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "hif4_spec": state.hif4_spec,
        "group_size": GROUP_SIZE, "bytes_per_group": BYTES_PER_GROUP, "expert": name,
        "weight_dtype": _dtype_name(source.weight_dtype()),
        "model": {"family": variant.family, "variant": variant.variant, "kind": variant.kind, "dim": variant.dim,
                  "ffn_dim": variant.ffn_dim, "layers": variant.layers, "in_dim": variant.in_dim,
                  "out_dim": variant.out_dim, "text_dim": variant.text_dim},
        "layers": {n: {"shape": list(linears[n]),
                       "rotation": hrotation.to_meta(rotations[n])}
                   for n in main},
        "source": {"name": source.name, "fingerprint": fp, "expert_requested": expert,
                   "expert_matched": warning is None},
        "ptq": _ptq_summary(state),
        "tool_version": hstate.tool_version(),
    }
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    _check_tensor_header(_plan_header(specs, metadata), _parse_metadata({"__metadata__": metadata}))
    # ^ what a loader will check, before writing anything
    size = write_safetensors_streaming(out_path, specs, metadata, progress, cancel)
    read_hif4_header(out_path)  # the written header parses and validates
    codes = sum(s.nbytes for s in specs if s.key.endswith(PACKED_SUFFIX))
    masks = sum(s.nbytes for s in specs if s.key.endswith(MASK_SUFFIX))
    main_values = sum(math.prod(linears[n]) for n in main)
    return ExportReport(
        path=out_path, expert=name, variant=variant.describe(), layers=len(main),
        main_bf16_bytes=2 * main_values, codes_bytes=codes, mask_bytes=masks,
        other_bytes=sum(s.nbytes for s in specs) - codes - masks, file_bytes=size,
        warnings=[warning] if warning else [])


# --------------------------------------------------------------------------- reading

@dataclass
class PackedLayer:
    packed: PackedHiF4  # dtype float32
    mask: Tensor
    rotation: Rotation | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape  # type: ignore[return-value]


@dataclass
class HiF4Checkpoint:
    path: str
    meta: dict
    layers: dict[str, PackedLayer]  # main layers, policy order
    tensors: dict[str, Tensor]  # everything else (biases of main layers included), bare keys

    @property
    def expert(self) -> str:
        return self.meta["expert"]

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.meta["weight_dtype"]]

    def logical_shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's tensor shapes as an unpacked state dict would have them."""
        shapes = {k: tuple(t.shape) for k, t in self.tensors.items()}
        shapes.update({n + ".weight": layer.shape for n, layer in self.layers.items()})
        return shapes

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + sum(
            layer.packed.nbytes + layer.mask.numel() * 4 for layer in self.layers.values())


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_metadata(meta) -> None:
    if not isinstance(meta, dict):
        raise HiF4CheckpointError("bad HiF4 metadata: not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise HiF4CheckpointError(f"wrong format marker {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not _is_int(meta.get("format_version")) or meta["format_version"] != FORMAT_VERSION:
        raise HiF4CheckpointError(f"unsupported HiF4 checkpoint version {meta.get('format_version')!r}; "
                                  f"this tool reads version {FORMAT_VERSION}")
    missing, unknown = set(_META_TYPES) - set(meta), set(meta) - set(_META_TYPES)
    if missing:
        raise HiF4CheckpointError(f"metadata fields missing: {few(missing)}")
    if unknown:
        raise HiF4CheckpointError(f"unknown metadata fields: {few(unknown)}")
    for key, typ in _META_TYPES.items():
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise HiF4CheckpointError(f"metadata field {key!r} has type {type(meta[key]).__name__}, "
                                      f"expected {typ.__name__}")
    if meta["group_size"] != GROUP_SIZE or meta["bytes_per_group"] != BYTES_PER_GROUP:
        raise HiF4CheckpointError(f"group layout {meta['group_size']}/{meta['bytes_per_group']} bytes is not "
                                  f"HiF4's {GROUP_SIZE}/{BYTES_PER_GROUP}")
    if not _EXPERT_RE.fullmatch(meta["expert"]):
        raise HiF4CheckpointError(f"bad expert name {meta['expert']!r}")
    if meta["weight_dtype"] not in WEIGHT_DTYPES:
        raise HiF4CheckpointError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {meta['weight_dtype']!r}")
    if not meta["layers"]:
        raise HiF4CheckpointError("no packed layers in metadata")
    for name, info in meta["layers"].items():
        _check_layer_meta(name, info)


def _check_layer_meta(name, info) -> None:
    match = hwan._MAIN_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise HiF4CheckpointError(f"packed layer {str(name)[:80]!r} is not a Wan main layer name")
    if len(match.group(1)) > 4 or int(match.group(1)) >= MAX_BLOCKS:
        raise HiF4CheckpointError(f"packed layer {name[:80]!r}: block index beyond {MAX_BLOCKS - 1}")
    if not (isinstance(info, dict) and set(info) == {"shape", "rotation"}):
        raise HiF4CheckpointError(f"layer {name!r}: metadata must have exactly shape and rotation")
    shape, rot = info["shape"], info["rotation"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(s) and 0 < s < 2**31 for s in shape)):
        raise HiF4CheckpointError(f"layer {name!r}: shape must be [out, in] positive ints, got {shape!r}")
    if rot is not None:
        if not (isinstance(rot, dict) and set(rot) == {"block", "seed"}):
            raise HiF4CheckpointError(f"layer {name!r}: rotation must be null or {{block, seed}}, got {rot!r}")
        try:
            Rotation(block=rot["block"], seed=rot["seed"]).check(shape[1])
        except ValueError as e:
            raise HiF4CheckpointError(f"layer {name!r}: {e}") from None


def _check_tensor_header(header: dict, meta: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{key: (dtype name, shape)} after checking the key set, dtypes and shapes."""
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in ST_DTYPES and isinstance(info.get("shape"), list)
                and all(_is_int(s) and s >= 0 for s in info["shape"])):
            raise HiF4CheckpointError(f"tensor {key!r}: bad header entry")
        entries[key] = (info["dtype"], tuple(info["shape"]))
    layers = meta["layers"]
    expected = {n + PACKED_SUFFIX for n in layers} | {n + MASK_SUFFIX for n in layers}
    missing = expected - set(entries)
    if missing:
        raise HiF4CheckpointError(f"missing tensors: {few(missing)}")
    stray = {k for k in entries if k.endswith((PACKED_SUFFIX, MASK_SUFFIX))} - expected
    if stray:
        raise HiF4CheckpointError(f"HiF4 tensors for layers not in the metadata: {few(stray)}")
    unpacked = {n + ".weight" for n in layers} & set(entries)
    if unpacked:
        raise HiF4CheckpointError(f"packed layers also carry an unpacked weight: {few(unpacked)}")
    for n, info in layers.items():
        out_f, in_f = info["shape"]
        want = {n + PACKED_SUFFIX: ("U8", (out_f, math.ceil(in_f / GROUP_SIZE), BYTES_PER_GROUP)),
                n + MASK_SUFFIX: ("F32", (in_f,))}
        if n + ".bias" in entries:
            want[n + ".bias"] = (entries[n + ".bias"][0], (out_f,))
        for key, (dt, shape) in want.items():
            if entries[key] != (dt, shape):
                raise HiF4CheckpointError(f"tensor {key!r} is {entries[key][0]} {list(entries[key][1])}, "
                                          f"expected {dt} {list(shape)} from the layer metadata")
    for key, (dt, _) in entries.items():
        if key not in expected and dt not in FLOAT_NAMES:
            raise HiF4CheckpointError(f"tensor {key!r} has dtype {dt}; only floating-point tensors are carried over")
    shapes = {k: s for k, (_, s) in entries.items() if k not in expected}
    shapes.update({n + ".weight": tuple(info["shape"]) for n, info in layers.items()})
    try:
        variant = hwan.detect_variant(shapes)
    except hwan.NotWanError as e:
        raise HiF4CheckpointError(f"not a complete Wan model: {e}") from None
    main = set(hwan.main_linear_names(shapes))
    if main != set(layers):
        raise HiF4CheckpointError(f"main layers not packed: {few(main - set(layers))}")
    model = meta["model"]
    for k in ("dim", "ffn_dim", "layers", "in_dim", "out_dim"):
        if model.get(k) != getattr(variant, k):
            raise HiF4CheckpointError(f"metadata says {k} = {model.get(k)!r}, the tensors give {getattr(variant, k)}")
    reference = _reference_shapes(shapes, variant)
    if set(reference) != set(shapes):
        raise HiF4CheckpointError(f"not the key set of a Wan transformer of these dimensions: unexpected "
                                  f"{few(set(shapes) - set(reference)) or 'none'}; missing "
                                  f"{few(set(reference) - set(shapes)) or 'none'}")
    wrong = [k for k in reference if reference[k] != shapes[k]]
    if wrong:
        raise HiF4CheckpointError(f"tensor {wrong[0]!r} has shape {list(shapes[wrong[0]])}, a Wan transformer of "
                                  f"these dimensions has {list(reference[wrong[0]])}")
    return entries


def _reference_shapes(shapes: Mapping[str, tuple[int, ...]], variant: hwan.WanVariant) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan transformer with these dimensions and its shape: ComfyUI's
    WanModel layout as hifloat4.tiny_wan builds it, on the meta device (nothing
    allocated). This is what makes the key set exact: no stray tensor rides along."""
    from .tiny_wan import TinyWan, WanConfig  # lazy: only loaders need it

    if variant.layers > MAX_BLOCKS:
        raise HiF4CheckpointError(f"{variant.layers} blocks, more than {MAX_BLOCKS}")
    img = shapes.get("img_emb.proj.0.weight")
    try:
        cfg = WanConfig(in_dim=variant.in_dim, out_dim=variant.out_dim, dim=variant.dim, ffn_dim=variant.ffn_dim,
                        num_layers=variant.layers, num_heads=1, text_dim=variant.text_dim,
                        freq_dim=shapes["time_embedding.0.weight"][1],
                        patch_size=tuple(shapes["patch_embedding.weight"][2:]),
                        img_dim=None if img is None or len(img) != 1 else img[0])
        with torch.device("meta"):
            model = TinyWan(cfg)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise HiF4CheckpointError(f"not a Wan transformer layout: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _parse_metadata(header: dict) -> dict:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise HiF4CheckpointError(f"not a HiF4 packed checkpoint: metadata key {METADATA_KEY!r} (the format "
                                  "marker) is missing; export one with 'python -m hifloat4 export' or the "
                                  "'Save HiF4 Model' node")
    if set(metadata) != {METADATA_KEY}:
        raise HiF4CheckpointError(f"unknown safetensors metadata keys: {few(set(metadata) - {METADATA_KEY})}")
    meta = loads_json(metadata[METADATA_KEY], HiF4CheckpointError, "bad HiF4 metadata JSON")
    _check_metadata(meta)
    return meta


def read_hif4_header(path: str | os.PathLike) -> dict:
    """The validated metadata of a packed checkpoint, reading only its header."""
    header = read_header(path, HiF4CheckpointError)
    meta = _parse_metadata(header)
    _check_tensor_header(header, meta)
    return meta


def _marker(path: str | os.PathLike) -> bool:
    metadata = read_header(path, HiF4CheckpointError).get("__metadata__", {})
    return FORMAT_NAME in metadata.get(METADATA_KEY, "")


def is_hif4_checkpoint(path: str | os.PathLike) -> bool:
    """Whether the file's safetensors header carries the HiF4 marker (header only; cheap)."""
    try:
        return _marker(path)
    except HiF4CheckpointError:
        return False


_MARKERS: dict[str, tuple[tuple[int, int], bool]] = {}


def has_hif4_marker(path: str | os.PathLike) -> bool:
    """is_hif4_checkpoint for folder listings: cached by (mtime, size), and a file
    that cannot be read (a FIFO, a broken header) is skipped with one log line per
    version of the file instead of failing the listing."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return False
    key = (st.st_mtime_ns, st.st_size)
    hit = _MARKERS.get(path)
    if hit is None or hit[0] != key:
        try:
            found = _marker(path)
        except HiF4CheckpointError as e:
            log.warning("hifloat4: skipping %s in the model list: %s", path, e)
            found = False
        hit = _MARKERS[path] = (key, found)
    return hit[1]


def hif4_checkpoint_names(named_paths: Iterable[tuple[str, str | None]]) -> list[str]:
    """The names (of (name, full path) pairs, e.g. a ComfyUI folder listing) whose
    files are packed HiF4 checkpoints; bad files are skipped (has_hif4_marker)."""
    return [name for name, path in named_paths
            if path and name.lower().endswith(SUFFIX) and has_hif4_marker(path)]


def load_hif4_checkpoint(path: str | os.PathLike) -> HiF4Checkpoint:
    """Read and fully validate a packed checkpoint (safetensors only, never pickle);
    every problem raises HiF4CheckpointError naming it."""
    path = os.fspath(path)
    header = read_header(path, HiF4CheckpointError)
    meta = _parse_metadata(header)
    entries = _check_tensor_header(header, meta)
    try:
        with safe_open(path, framework="pt") as f:
            if set(f.keys()) != set(entries):
                raise HiF4CheckpointError("the safetensors library reads another key set than the header")
            tensors = {k: f.get_tensor(k) for k in entries}
    except HiF4CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (safetensors raises its own types for malformed files)
        raise HiF4CheckpointError(f"not a readable safetensors file: {e}") from None
    for k, (dt, shape) in entries.items():
        if tensors[k].dtype != ST_DTYPES[dt] or tuple(tensors[k].shape) != shape:
            raise HiF4CheckpointError(f"tensor {k!r} does not read back as {dt} {list(shape)}")
    layers = {}
    for n in hwan.classify_layer_names(meta["layers"])[0]:  # policy order (the JSON keys are sorted)
        info = meta["layers"][n]
        data, mask = tensors.pop(n + PACKED_SUFFIX), tensors.pop(n + MASK_SUFFIX)
        if not (torch.isfinite(mask).all() and (mask > 0).all()):
            raise HiF4CheckpointError(f"tensor {n + MASK_SUFFIX!r} has non-finite or non-positive values")
        if (data[..., 32] == 255).any():
            raise HiF4CheckpointError(f"tensor {n + PACKED_SUFFIX!r} holds the E6M2 NaN scale (byte 255)")
        rot = info["rotation"]
        layers[n] = PackedLayer(PackedHiF4(data, tuple(info["shape"]), 1, torch.float32), mask,
                                hrotation.from_meta(rot))
    return HiF4Checkpoint(path=path, meta=meta, layers=layers, tensors=tensors)


def install_checkpoint_(model: nn.Module, ckpt: HiF4Checkpoint) -> nn.Module:
    """Load a packed checkpoint into a Wan nn.Module of the same shapes (e.g.
    hifloat4.tiny_wan.TinyWan, possibly built on the meta device), in place: main
    layers become PackedHiF4Linear, every other tensor is copied in (cast to the
    parameter's dtype; meta parameters take the file's tensor as it is). The key
    sets must match exactly; nothing is changed otherwise."""
    modules = dict(model.named_modules())
    prefix = hwan.find_prefix(n for n, m in modules.items() if isinstance(m, nn.Linear))
    problems = []
    for n, layer in ckpt.layers.items():
        m = modules.get(prefix + n)
        if not isinstance(m, nn.Linear) or (m.out_features, m.in_features) != layer.shape:
            problems.append(n)
    if problems:
        raise HiF4CheckpointError(f"the model has no Linear of the packed shape for {few(problems)}")
    own = {k[len(prefix):]: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(prefix)}
    packed_keys = {n + ".weight" for n in ckpt.layers}
    expected = set(own) - packed_keys
    if expected != set(ckpt.tensors):
        raise HiF4CheckpointError(f"key mismatch: missing {few(expected - set(ckpt.tensors)) or 'none'}; "
                                  f"unexpected {few(set(ckpt.tensors) - expected) or 'none'}")
    for n, layer in ckpt.layers.items():
        m = modules[prefix + n]
        bias = ckpt.tensors.get(n + ".bias")
        if (bias is None) != (m.bias is None):
            raise HiF4CheckpointError(f"{n}: bias present in one of model and checkpoint only")
    with torch.no_grad():
        for k, t in ckpt.tensors.items():
            if k.rpartition(".")[0] in ckpt.layers:
                continue  # a packed layer's bias goes into its PackedHiF4Linear
            param = own[k]
            if tuple(param.shape) != tuple(t.shape):
                raise HiF4CheckpointError(f"{k}: model shape {tuple(param.shape)}, checkpoint {tuple(t.shape)}")
            if param.is_meta:
                parent, _, attr = (prefix + k).rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                new = t  # a meta model has no dtype of its own yet: the file's (load_state_dict(assign=True))
                if isinstance(param, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=param.requires_grad)
                setattr(owner, attr, new)
            else:
                param.copy_(t)
    for n, layer in ckpt.layers.items():
        m = modules[prefix + n]
        bias = ckpt.tensors.get(n + ".bias")
        if bias is not None and not m.bias.is_meta:
            bias = bias.to(m.bias.dtype)
        parent, _, child = (prefix + n).rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                PackedHiF4Linear(layer.packed, layer.mask, bias, layer.rotation))
    return model


# --------------------------------------------------------------------------- CLI

def _progress_printer(every_s: float = 5.0) -> Callable[[int, int], None]:
    """progress(done, total) for the CLI: a line on stderr at the start, then at most
    every `every_s` seconds with the percentage and an estimate of the time left."""
    start = time.monotonic()
    last = [-math.inf]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0:
            print("  writing (Ctrl-C cancels and leaves no file) ...", file=sys.stderr, flush=True)
        elif now - last[0] >= every_s or done >= total:
            last[0] = now
            left = (now - start) * (total - done) / done
            print(f"  {100.0 * done / max(total, 1):5.1f}% after {now - start:.0f} s, about {left:.0f} s left",
                  file=sys.stderr, flush=True)
    return show


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m hifloat4 export",
        description="Write one Wan2.2 expert as a packed HiF4 checkpoint (4.5-bit main weights, masks embedded) "
                    "for the 'Load HiF4 Diffusion Model' node or hifloat4.export.install_checkpoint_.")
    p.add_argument("--model", required=True, help="the expert's .safetensors (bf16/fp16/fp32 or fp8 scaled)")
    p.add_argument("--state", required=True, help="a PTQ state .safetensors calibrated on this model")
    p.add_argument("--expert", default="auto",
                   help="which expert of the state: auto (match the model's fingerprint, default), "
                        "high_noise, low_noise, single")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    a = p.parse_args(argv)
    if not logging.getLogger().handlers:  # the kernel-build notice and other one-line notes
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if os.path.exists(a.out) and os.path.exists(a.model) and os.path.samefile(a.out, a.model):
            raise HiF4CheckpointError("--out is the --model file; write the checkpoint elsewhere")
        state = hstate.load_state(a.state)
        t0 = time.perf_counter()
        report = export_expert(SafetensorsSource(a.model), state, a.expert, a.out, progress=_progress_printer())
    except (HiF4FileError, hwan.NotWanError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cancelled: nothing written to {a.out}", file=sys.stderr)
        return 130
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(report.summary())
    print(f"  took {time.perf_counter() - t0:.1f} s")
    return 0
