"""The weight patches (LoRAs) of a MODEL as a PTQ state records them
(hifloat4.patchset): what Calibrate stores and what Apply compares.

ComfyUI facts relied on (0.3.64 and 0.33): `ModelPatcher.patches` maps a weight key
to a list of (strength_patch, patch, strength_model, offset, function) entries;
LoraLoaderModelOnly adds one entry per LoRA weight with its strength as
strength_patch; a patch is a weight adapter (`.name`, `.weights`) or a
(kind, tensors) tuple. Neither version records the LoRA's file name on the patcher
(0.33 attaches only the last LoRA's safetensors metadata): names come from the graph
instead (lora_graph), as information next to the digests.
Weight hooks (CreateHookLora) are not weight patches and are not recorded.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping

import torch

from hifloat4 import patchset

from .weights import is_hif4_patch

PROBE = 64  # leading values hashed per tensor: tells LoRAs apart without reading gigabytes


def _parts(value) -> Iterator[bytes]:
    """A patch's content as bytes: tensor dtype, shape and leading values; scalars by repr."""
    if isinstance(value, torch.Tensor):
        head = value.detach().reshape(-1)[:PROBE].to("cpu", torch.float32).contiguous()
        yield f"T{value.dtype}{tuple(value.shape)}".encode() + head.numpy().tobytes()
    elif isinstance(value, (tuple, list)):
        yield f"[{len(value)}".encode()
        for v in value:
            yield from _parts(v)
    elif hasattr(value, "weights") and hasattr(value, "name"):  # a weight adapter
        yield f"A{value.name}".encode()
        yield from _parts(value.weights)
    elif value is None or isinstance(value, (bool, int, float, str)):
        yield repr(value).encode()
    else:
        yield f"O{type(value).__qualname__}".encode()


def _entry_digest(key: str, entry: tuple) -> str:
    _strength, patch, strength_model, offset, function = entry
    h = hashlib.sha256(f"{key}\0{strength_model!r}\0{offset!r}\0{getattr(function, '__qualname__', None)}\0".encode())
    for part in _parts(patch):
        h.update(part)
    return h.hexdigest()


def patch_record(model, names: Mapping[float, list[str]] | None = None) -> list[dict]:
    """hifloat4.patchset's record of this MODEL's weight patches other than HiF4's own,
    with the LoRA file names by strength (lora_graph.loras_upstream) where given."""
    record = patchset.group_patches((float(e[0]), _entry_digest(key, e))
                                    for key, entries in model.patches.items() for e in entries if not is_hif4_patch(e))
    return patchset.with_names(record, names or {})


def mismatch_warning(model, state, expert: str) -> str | None:
    """Apply's warning when this MODEL's patches differ from those `expert` was calibrated with."""
    recorded = None if state.patches is None else state.patches.get(expert)
    return patchset.mismatch_warning(expert, recorded, patch_record(model))
