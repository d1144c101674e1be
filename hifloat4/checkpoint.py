"""Reading packed HiF4 checkpoints (written by hifloat4.export): the format, its
validation, and installing one into a Wan nn.Module.

File layout, version 2 (bare Wan keys); the names are the module's own, so a packed
layer's state dict is what the file holds (PackedHiF4Linear, the ComfyUI op):
  "<layer>.weight"     uint8 (out, ceil(in/64), 36)  pack(rot(W / m)) along in-features
  "<layer>.hif4_mask"  float32 (in,)                 the channel mask m
  everything else      floating point, as a Wan transformer of these dimensions has it
                       (biases of main layers included; the weights of main layers kept in
                       high precision, `kept` in the metadata, are ordinary "<layer>.weight")
Metadata: one key, METADATA_KEY, a JSON object: format name/version (the marker),
HiF4 spec, the expert, the model variant, per-layer logical shape [out, in] and
rotation (what turns the codes back into a weight), the dtype loaders present the
main weights as, the main layers kept unquantized (version 2), the source
fingerprint and the PTQ state's settings and checksum.

Version 1 stored the codes as "<layer>.weight.hif4" and is otherwise the same; it is
read by renaming those keys in one place (`_tensor_entries`).

Loading never unpickles: safetensors only, and everything is validated before a
tensor is read (hifloat4.safefile's header checks, marker, version, metadata types
and ranges, the exact key set and shapes of a Wan transformer of the file's
dimensions, dtypes, shapes against the per-layer metadata), then the values
(finite positive masks, no NaN scale byte).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from . import rotation as hrotation
from . import wan as hwan
from .linear import MASK_NAME
from .packed_linear import PackedHiF4Linear
from .packing import PackedHiF4
from .rotation import Rotation
from .safefile import EXPERT_RE, SUFFIX, HiF4FileError, check_fields, few, is_int, loads_json, read_header
from .spec import BYTES_PER_GROUP, GROUP_SIZE
from .wan_model import WanConfig, WanModel

FORMAT_NAME = "hifloat4-packed-wan"
FORMAT_VERSION = 2  # written; READ_VERSIONS are read
READ_VERSIONS = (1, 2)
V1_CODES_SUFFIX = ".weight.hif4"  # version 1's name of "<layer>.weight"
METADATA_KEY = "hifloat4_packed"

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
FLOAT_NAMES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_BLOCKS = 1024  # Wan2.2 has 30 or 40; bounds the model a header can make the loader describe
log = logging.getLogger("hifloat4")
_META_TYPES = {
    "format": str, "format_version": int, "hif4_spec": str, "group_size": int, "bytes_per_group": int,
    "expert": str, "weight_dtype": str, "model": dict, "layers": dict, "source": dict, "ptq": dict,
    "tool_version": str,
}
_V2_META_TYPES = {"kept": list}  # main layers left unquantized (keep_high_precision)


class HiF4CheckpointError(HiF4FileError):
    """Anything wrong with a packed HiF4 checkpoint or an export; the message names it."""


def codes_key(layer: str) -> str:
    """The file key of a packed layer's codes: its ordinary weight key."""
    return f"{layer}.weight"


def mask_key(layer: str) -> str:
    """The file key of a packed layer's channel mask: its module's buffer name."""
    return f"{layer}.{MASK_NAME}"


# --------------------------------------------------------------------------- what a loader returns

@dataclass
class PackedLayer:
    """One packed Linear, named as in the file and PackedHiF4Linear: `weight` the
    codes with their logical (out, in) shape, `hif4_mask` and `rotation`."""

    weight: PackedHiF4  # dtype float32
    hif4_mask: Tensor
    rotation: Rotation | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight.shape  # type: ignore[return-value]


@dataclass
class HiF4Checkpoint:
    path: str
    meta: dict
    layers: dict[str, PackedLayer]  # packed main layers, policy order
    tensors: dict[str, Tensor]  # everything else (biases, kept main layers' weights), bare keys

    @property
    def expert(self) -> str:
        return self.meta["expert"]

    @property
    def kept(self) -> list[str]:
        """Main layers stored unquantized (keep_high_precision at export)."""
        return list(self.meta.get("kept", []))

    @property
    def weight_dtype(self) -> torch.dtype:
        return WEIGHT_DTYPES[self.meta["weight_dtype"]]


# --------------------------------------------------------------------------- metadata

def _check_metadata(meta) -> None:
    if not isinstance(meta, dict):
        raise HiF4CheckpointError("bad HiF4 metadata: not a JSON object")
    if meta.get("format") != FORMAT_NAME:
        raise HiF4CheckpointError(f"wrong format marker {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    if not is_int(meta.get("format_version")) or meta["format_version"] not in READ_VERSIONS:
        raise HiF4CheckpointError(f"unsupported HiF4 checkpoint version {meta.get('format_version')!r}; "
                                  f"this tool reads versions {', '.join(map(str, READ_VERSIONS))}")
    check_fields(meta, _META_TYPES | (_V2_META_TYPES if meta["format_version"] >= 2 else {}), HiF4CheckpointError)
    if meta["group_size"] != GROUP_SIZE or meta["bytes_per_group"] != BYTES_PER_GROUP:
        raise HiF4CheckpointError(f"group layout {meta['group_size']}/{meta['bytes_per_group']} bytes is not "
                                  f"HiF4's {GROUP_SIZE}/{BYTES_PER_GROUP}")
    if not EXPERT_RE.fullmatch(meta["expert"]):
        raise HiF4CheckpointError(f"bad expert name {meta['expert']!r}")
    if meta["weight_dtype"] not in WEIGHT_DTYPES:
        raise HiF4CheckpointError(f"weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {meta['weight_dtype']!r}")
    if not meta["layers"]:
        raise HiF4CheckpointError("no packed layers in metadata")
    for name, info in meta["layers"].items():
        _check_layer_meta(name, info)
    kept = meta.get("kept", [])
    for name in kept:
        _check_main_name(name, "kept layer")
    if len(set(kept)) != len(kept) or set(kept) & set(meta["layers"]):
        raise HiF4CheckpointError("kept layers must be distinct and not packed")


def _check_main_name(name, what: str) -> None:
    match = hwan._MAIN_RE.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise HiF4CheckpointError(f"{what} {str(name)[:80]!r} is not a Wan main layer name")
    if len(match.group(1)) > 4 or int(match.group(1)) >= MAX_BLOCKS:
        raise HiF4CheckpointError(f"{what} {name[:80]!r}: block index beyond {MAX_BLOCKS - 1}")


def _check_layer_meta(name, info) -> None:
    _check_main_name(name, "packed layer")
    if not (isinstance(info, dict) and set(info) == {"shape", "rotation"}):
        raise HiF4CheckpointError(f"layer {name!r}: metadata must have exactly shape and rotation")
    shape, rot = info["shape"], info["rotation"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(is_int(s) and 0 < s < 2**31 for s in shape)):
        raise HiF4CheckpointError(f"layer {name!r}: shape must be [out, in] positive ints, got {shape!r}")
    if rot is not None:
        if not (isinstance(rot, dict) and set(rot) == {"block", "seed"}):
            raise HiF4CheckpointError(f"layer {name!r}: rotation must be null or {{block, seed}}, got {rot!r}")
        try:
            Rotation(block=rot["block"], seed=rot["seed"]).check(shape[1])
        except ValueError as e:
            raise HiF4CheckpointError(f"layer {name!r}: {e}") from None


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


# --------------------------------------------------------------------------- tensor table

class Entry(NamedTuple):
    """A tensor of the checkpoint: its dtype name and shape, and its key in the file
    (the current key, except for version-1 codes)."""

    dtype: str
    shape: tuple[int, ...]
    file_key: str


def _tensor_entries(header: dict, meta: dict) -> dict[str, Entry]:
    """{current key: Entry} of a header's tensor table; the one place where a
    version-1 file's key names are mapped to today's."""
    entries = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and info.get("dtype") in ST_DTYPES and isinstance(info.get("shape"), list)
                and all(is_int(s) and s >= 0 for s in info["shape"])):
            raise HiF4CheckpointError(f"tensor {key!r}: bad header entry")
        entries[key] = Entry(info["dtype"], tuple(info["shape"]), key)
    if meta["format_version"] == 1:
        renamed = {codes_key(k[: -len(V1_CODES_SUFFIX)]): k for k in entries if k.endswith(V1_CODES_SUFFIX)}
        twins = set(renamed) & set(entries)
        if twins:
            raise HiF4CheckpointError(f"packed layers also carry an unpacked weight: {few(twins)}")
        entries = {k: e for k, e in entries.items() if not k.endswith(V1_CODES_SUFFIX)} | {
            new: entries[old] for new, old in renamed.items()}
    return entries


def _check_tensor_header(entries: Mapping[str, Entry], meta: dict) -> None:
    """Check the key set, dtypes and shapes against the metadata and a Wan transformer."""
    layers = meta["layers"]
    expected = {codes_key(n) for n in layers} | {mask_key(n) for n in layers}
    missing = expected - set(entries)
    if missing:
        raise HiF4CheckpointError(f"missing tensors: {few(missing)}")
    hif4 = {k for k, e in entries.items() if k.endswith("." + MASK_NAME) or (k.endswith(".weight") and e.dtype == "U8")}
    stray = hif4 - expected
    if stray:
        raise HiF4CheckpointError(f"HiF4 tensors for layers not in the metadata: {few(stray)}")
    for n, info in layers.items():
        out_f, in_f = info["shape"]
        want = {codes_key(n): ("U8", (out_f, math.ceil(in_f / GROUP_SIZE), BYTES_PER_GROUP)),
                mask_key(n): ("F32", (in_f,))}
        if n + ".bias" in entries:
            want[n + ".bias"] = (entries[n + ".bias"].dtype, (out_f,))
        for key, (dt, shape) in want.items():
            if entries[key][:2] != (dt, shape):
                raise HiF4CheckpointError(f"tensor {key!r} is {entries[key].dtype} {list(entries[key].shape)}, "
                                          f"expected {dt} {list(shape)} from the layer metadata")
    for key, e in entries.items():
        if key not in expected and e.dtype not in FLOAT_NAMES:
            raise HiF4CheckpointError(f"tensor {key!r} has dtype {e.dtype}; only floating-point tensors are "
                                      "carried over")
    shapes = {k: e.shape for k, e in entries.items() if k not in expected}
    shapes.update({codes_key(n): tuple(info["shape"]) for n, info in layers.items()})
    try:
        variant = hwan.detect_variant(shapes)
    except hwan.NotWanError as e:
        raise HiF4CheckpointError(f"not a complete Wan model: {e}") from None
    main, kept = set(hwan.main_linear_names(shapes)), set(meta.get("kept", []))
    if main != set(layers) | kept:
        raise HiF4CheckpointError(f"main layers neither packed nor listed as kept: {few(main - set(layers) - kept)}"
                                  if main - set(layers) - kept else
                                  f"kept layers that are not main layers of this model: {few(kept - main)}")
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


def _reference_shapes(shapes: Mapping[str, tuple[int, ...]], variant: hwan.WanVariant) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Wan transformer with these dimensions and its shape: ComfyUI's
    WanModel layout as hifloat4.wan_model builds it, on the meta device (nothing
    allocated). This is what makes the key set exact: no stray tensor rides along."""
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
            model = WanModel(cfg)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:
        raise HiF4CheckpointError(f"not a Wan transformer layout: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_header(header: dict) -> tuple[dict, dict[str, Entry]]:
    """(metadata, tensor entries) of a safetensors header, fully checked: what the
    loader reads first, and what the exporter runs on its plan before writing."""
    meta = _parse_metadata(header)
    entries = _tensor_entries(header, meta)
    _check_tensor_header(entries, meta)
    return meta, entries


# --------------------------------------------------------------------------- reading

def read_hif4_header(path: str | os.PathLike) -> dict:
    """The validated metadata of a packed checkpoint, reading only its header."""
    return check_header(read_header(path, HiF4CheckpointError))[0]


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
    meta, entries = check_header(read_header(path, HiF4CheckpointError))
    try:
        with safe_open(path, framework="pt") as f:
            if set(f.keys()) != {e.file_key for e in entries.values()}:
                raise HiF4CheckpointError("the safetensors library reads another key set than the header")
            tensors = {k: f.get_tensor(e.file_key) for k, e in entries.items()}
    except HiF4CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 (safetensors raises its own types for malformed files)
        raise HiF4CheckpointError(f"not a readable safetensors file: {e}") from None
    for k, e in entries.items():
        if tensors[k].dtype != ST_DTYPES[e.dtype] or tuple(tensors[k].shape) != e.shape:
            raise HiF4CheckpointError(f"tensor {k!r} does not read back as {e.dtype} {list(e.shape)}")
    return checkpoint_from_tensors(path, meta, tensors)


def checkpoint_from_tensors(path: str, meta: dict, tensors: dict[str, Tensor]) -> HiF4Checkpoint:
    """A HiF4Checkpoint from checked metadata and its tensors (read from a file, or packed
    in memory by export.pack_in_memory): the packed layers in policy order, their masks
    and codes checked; `tensors` keeps the other tensors."""
    tensors = dict(tensors)
    layers = {}
    for n in hwan.classify_layer_names(meta["layers"])[0]:  # policy order (the JSON keys are sorted)
        info = meta["layers"][n]
        codes, mask = tensors.pop(codes_key(n)), tensors.pop(mask_key(n))
        if not (torch.isfinite(mask).all() and (mask > 0).all()):
            raise HiF4CheckpointError(f"tensor {mask_key(n)!r} has non-finite or non-positive values")
        if (codes[..., 32] == 255).any():
            raise HiF4CheckpointError(f"tensor {codes_key(n)!r} holds the E6M2 NaN scale (byte 255)")
        layers[n] = PackedLayer(PackedHiF4(codes, tuple(info["shape"]), 1, torch.float32), mask,
                                hrotation.from_meta(info["rotation"]))
    return HiF4Checkpoint(path=path, meta=meta, layers=layers, tensors=tensors)


def install_checkpoint_(model: nn.Module, ckpt: HiF4Checkpoint) -> nn.Module:
    """Load a packed checkpoint into a Wan nn.Module of the same shapes (e.g.
    hifloat4.wan_model.WanModel, possibly built on the meta device), in place: main
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
    expected = set(own) - {codes_key(n) for n in ckpt.layers}
    if expected != set(ckpt.tensors):
        raise HiF4CheckpointError(f"key mismatch: missing {few(expected - set(ckpt.tensors)) or 'none'}; "
                                  f"unexpected {few(set(ckpt.tensors) - expected) or 'none'}")
    for n in ckpt.layers:
        if (ckpt.tensors.get(n + ".bias") is None) != (modules[prefix + n].bias is None):
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
                PackedHiF4Linear.from_packed(layer.weight, layer.hif4_mask, bias, layer.rotation))
    return model
