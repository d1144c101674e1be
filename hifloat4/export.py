"""Shareable HiF4 checkpoints: one Wan2.2 expert in a `.safetensors` file whose main
Linear weights are packed HiF4 (4.5 bits per value) with the PTQ masks embedded.

`python -m hifloat4 export --model MODEL.safetensors --state STATE.safetensors
 --expert high_noise --out OUT.safetensors`

File layout and validation: hifloat4.checkpoint (the codes under "<layer>.weight",
the mask as "<layer>.hif4_mask"). Main layers are packed from their real-valued
weight; every other tensor is carried over unchanged (dtype and values), biases of
main layers included; fp8 "scaled" sources are dequantized (main layers before
packing, other fp8 weights stored as bf16), their scale keys and the `scaled_fp8`
marker dropped.

Writing streams one tensor at a time (the header is planned from shapes first), so a
28 GB expert is never in memory: peak is about one main layer in float32. The file
is written to a temporary name in the target directory, fsynced and renamed; progress
and cancel hooks let a UI show a bar and stop it (nothing is left behind). The
exporter runs the loader's header check (checkpoint.check_header) on what it plans
to write before writing.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from torch import Tensor

from . import experts as hexperts
from . import rotation as hrotation
from . import state as hstate
from . import wan as hwan
from .checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    ST_DTYPES,
    ST_NAMES,
    SUFFIX,
    WEIGHT_DTYPES,
    HiF4Checkpoint,
    HiF4CheckpointError,
    check_header,
    checkpoint_from_tensors,
    codes_key,
    mask_key,
    read_hif4_header,
)
from .linear import MASK_NAME
from .packed_linear import pack_weight
from .plan import ROTATIONS, W4A4Config, make_plan, packed_nbytes
from .safefile import HiF4FileError, atomic_file, few, read_header
from .spec import BYTES_PER_GROUP, GROUP_SIZE


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
    kept: list[str] = field(default_factory=list)  # main layers stored unquantized, most sensitive first
    kept_bytes: int = 0  # their weights as stored
    kept_packed_bytes: int = 0  # what they would have taken as HiF4 codes + masks
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        pct = 100.0 * self.codes_bytes / max(1, self.main_bf16_bytes)
        lines = [f"exported the {self.expert!r} expert of {self.variant} -> {self.path}",
                 f"  {self.layers} main layers packed: {_size(self.main_bf16_bytes)} as bf16 -> "
                 f"{_size(self.codes_bytes)} HiF4 codes ({pct:.2f}%) + {_size(self.mask_bytes)} masks"]
        if self.kept:
            lines.append(f"  {len(self.kept)} most sensitive main layers kept unquantized ({', '.join(self.kept)}): "
                         f"{_size(self.kept_bytes)}, {_size(self.kept_bytes - self.kept_packed_bytes)} more "
                         "than packed")
        lines.append(f"  other tensors: {_size(self.other_bytes)}; file: {_size(self.file_bytes)}")
        return "\n".join(lines)


def _ptq_summary(config: W4A4Config) -> dict:
    """The PTQ state the file was made from (its settings and checksum) and the choices
    made on top of it (null: as calibrated)."""
    state = config.state
    _, meta = hstate.encode_state(state)
    checksum = json.loads(meta[hstate.METADATA_KEY])["checksum"]
    return {"format": hstate.FORMAT_NAME, "format_version": hstate.format_version(state), "method": state.method,
            "alpha": state.alpha, "percentile": state.percentile, "statistic": state.statistic,
            "rotation": state.rotation, "model_family": state.model_family, "model_variant": state.model_variant,
            "calibration": state.calibration, "tool_version": state.tool_version, "checksum": checksum,
            "choices": {"alpha": config.alpha, "statistic": config.statistic, "rotation": config.rotation,
                        "rotation_block": config.rotation_block,
                        "keep_high_precision": config.keep_high_precision}}


@dataclass
class ExportPlan:
    """What an export writes: the tensors in file order (each produced on demand), the
    metadata, and what the report needs."""

    specs: list[_Spec]
    metadata: dict[str, str]
    meta: dict
    plan_expert: str
    warning: str | None
    variant: hwan.WanVariant
    linears: dict[str, tuple[int, int]]
    layers: list[str]
    kept: list[str]


def plan_export(source: ModelSource, config: W4A4Config, pack_device: torch.device | str | None = None) -> ExportPlan:
    """Decide one expert's packed checkpoint: `hifloat4.plan.make_plan(config, ...)` decides
    the expert, masks and rotation (what the Apply node runs); main layers are packed from
    their real weight (on `pack_device`, default where the source puts it), every other
    tensor is carried over unchanged. The header is checked as a loader will check it."""
    shapes = source.shapes()
    try:
        variant = hwan.detect_variant(shapes)
    except hwan.NotWanError as e:
        raise HiF4CheckpointError(f"{source.name}: {e}") from None
    linears = hwan.linear_shapes(shapes)
    clash = [k for k in shapes if k.endswith("." + MASK_NAME)]
    if clash:
        raise HiF4CheckpointError(f"the model already has HiF4 tensors ({few(clash)})")
    fp = hwan.fingerprint(shapes, get_weight=lambda n: source.real_weight(n) if n in linears else None)
    try:
        plan = make_plan(config, fp)
    except (hexperts.ExpertMismatch, hstate.PTQStateError) as e:
        raise HiF4CheckpointError(str(e)) from None
    layers = plan.layers
    rotations = {n: q.rotation for n, q in layers.items()}

    def packed(n: str) -> Tensor:
        weight = source.real_weight(n)
        if pack_device is not None:
            weight = weight.to(pack_device)
        return pack_weight(weight, layers[n].mask, rotations[n]).data.to("cpu")

    specs: list[_Spec] = []
    codes = {codes_key(n): n for n in layers}  # kept layers' weights are carried over as they are
    masks = {mask_key(n): n for n in layers}
    for key in sorted(set(shapes) | set(masks)):
        if key in codes:
            n = codes[key]
            out_f, in_f = linears[n]
            specs.append(_Spec(key, torch.uint8, (out_f, math.ceil(in_f / GROUP_SIZE), BYTES_PER_GROUP),
                               lambda n=n: packed(n), work=out_f * in_f))
        elif key in masks:
            n = masks[key]
            specs.append(_Spec(key, torch.float32, (linears[n][1],), lambda n=n: layers[n].mask.float()))
        else:
            specs.append(_Spec(key, source.stored_dtype(key), tuple(shapes[key]), lambda key=key: source.tensor(key)))
    meta = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "hif4_spec": config.state.hif4_spec,
        "group_size": GROUP_SIZE, "bytes_per_group": BYTES_PER_GROUP, "expert": plan.expert,
        "weight_dtype": _dtype_name(source.weight_dtype()),
        "model": {"family": variant.family, "variant": variant.variant, "kind": variant.kind, "dim": variant.dim,
                  "ffn_dim": variant.ffn_dim, "layers": variant.layers, "in_dim": variant.in_dim,
                  "out_dim": variant.out_dim, "text_dim": variant.text_dim},
        "layers": {n: {"shape": list(linears[n]),
                       "rotation": hrotation.to_meta(rotations[n])}
                   for n in layers},
        "kept": list(plan.kept),
        "source": {"name": source.name, "fingerprint": fp, "expert_requested": config.expert,
                   "expert_matched": plan.warning is None},
        "ptq": _ptq_summary(config),
        "tool_version": hstate.tool_version(),
    }
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    checked, _ = check_header(_plan_header(specs, metadata))  # what a loader will check, before producing anything
    return ExportPlan(specs, metadata, checked, plan.expert, plan.warning, variant, linears, list(layers),
                      list(plan.kept))


def export_expert(source: ModelSource, config: W4A4Config, out_path: str | os.PathLike,
                  progress: Callable[[int, int], None] | None = None,
                  cancel: Callable[[], None] | None = None) -> ExportReport:
    """Write `plan_export(source, config)` to `out_path`. `progress(done, total)` and
    `cancel()` as in write_safetensors_streaming: a cancel (or Ctrl-C) leaves no file behind."""
    out_path = os.fspath(out_path)
    if not out_path.endswith(SUFFIX):
        raise HiF4CheckpointError(f"output {out_path!r} must end in {SUFFIX}")
    p = plan_export(source, config)
    size = write_safetensors_streaming(out_path, p.specs, p.metadata, progress, cancel)
    read_hif4_header(out_path)  # the written header parses and validates
    codes = {codes_key(n) for n in p.layers}
    masks = {mask_key(n) for n in p.layers}
    codes_bytes = sum(s.nbytes for s in p.specs if s.key in codes)
    mask_bytes = sum(s.nbytes for s in p.specs if s.key in masks)
    kept_keys = {codes_key(n) for n in p.kept}
    kept_bytes = sum(s.nbytes for s in p.specs if s.key in kept_keys)
    return ExportReport(
        path=out_path, expert=p.plan_expert, variant=p.variant.describe(), layers=len(p.layers),
        main_bf16_bytes=2 * sum(math.prod(p.linears[n]) for n in p.layers), codes_bytes=codes_bytes,
        mask_bytes=mask_bytes, other_bytes=sum(s.nbytes for s in p.specs) - codes_bytes - mask_bytes - kept_bytes,
        file_bytes=size, kept=p.kept, kept_bytes=kept_bytes,
        kept_packed_bytes=sum(packed_nbytes(*p.linears[n]) for n in p.kept),
        warnings=[p.warning] if p.warning else [])


def pack_in_memory(source: ModelSource, config: W4A4Config, pack_device: torch.device | str | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], None] | None = None) -> HiF4Checkpoint:
    """`plan_export`'s checkpoint without a file: the tensors produced into host memory (the
    main layers packed on `pack_device`), assembled as the loader assembles a file. What the
    Apply node runs when it keeps weights packed."""
    p = plan_export(source, config, pack_device)
    work = [s.work or math.prod(s.shape) for s in p.specs]
    total, done = sum(work), 0
    if progress is not None:
        progress(0, total)
    tensors = {}
    for s, w in zip(p.specs, work):
        if cancel is not None:
            cancel()
        t = s.produce()
        if t.dtype != s.dtype or tuple(t.shape) != s.shape:
            raise HiF4CheckpointError(f"{s.key}: produced {t.dtype} {tuple(t.shape)}, planned {s.dtype} {s.shape}")
        tensors[s.key] = t.detach().to("cpu")
        done += w
        if progress is not None:
            progress(done, total)
    return checkpoint_from_tensors(f"<in memory: {source.name}>", p.meta, tensors)


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
                    "for the 'Load HiF4 Diffusion Model' node or hifloat4.checkpoint.install_checkpoint_.")
    p.add_argument("--model", required=True, help="the expert's .safetensors (bf16/fp16/fp32 or fp8 scaled)")
    p.add_argument("--state", required=True, help="a PTQ state .safetensors calibrated on this model")
    p.add_argument("--expert", default="auto",
                   help="which expert of the state: auto (match the model's fingerprint, default), "
                        "high_noise, low_noise, single")
    p.add_argument("--out", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--alpha", type=float, default=None, help="re-derive masks with this alpha (default: as calibrated)")
    p.add_argument("--statistic", choices=hstate.REMASK_STATISTICS, default=None,
                   help="re-derive masks from this statistic; adaptive: per layer, the one with the lowest error "
                        "measured at calibration (default: as calibrated)")
    p.add_argument("--rotation", choices=ROTATIONS, default=None,
                   help="block Hadamard rotation after the mask (default: as calibrated)")
    p.add_argument("--rotation-block", type=int, default=hrotation.DEFAULT_BLOCK,
                   help="Hadamard block size with --rotation hadamard")
    p.add_argument("--keep-high-precision", type=int, default=0, metavar="N",
                   help="leave the N layers with the largest W4A4 error measured at calibration unquantized")
    a = p.parse_args(argv)
    if not logging.getLogger().handlers:  # the kernel-build notice and other one-line notes
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if os.path.exists(a.out) and os.path.exists(a.model) and os.path.samefile(a.out, a.model):
            raise HiF4CheckpointError("--out is the --model file; write the checkpoint elsewhere")
        config = W4A4Config(hstate.load_state(a.state), expert=a.expert, alpha=a.alpha, statistic=a.statistic,
                            rotation=a.rotation, rotation_block=a.rotation_block,
                            keep_high_precision=a.keep_high_precision)
        t0 = time.perf_counter()
        report = export_expert(SafetensorsSource(a.model), config, a.out, progress=_progress_printer())
    except (HiF4FileError, ValueError, OSError) as e:
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
