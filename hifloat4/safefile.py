"""Reading safetensors files from strangers: the defensive pieces shared by PTQ states
(state.py) and packed checkpoints (export.py). Never unpickles anything."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

MAX_HEADER_BYTES = 64 * 2**20  # a real header is kilobytes; refuse to parse absurd ones


def few(names: Iterable[str]) -> str:
    """Up to four names for an error message, sorted, with the count of the rest."""
    names = sorted(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


def reject_constant(name: str):
    """json.loads(parse_constant=...): NaN and Infinity are not valid metadata."""
    raise ValueError(f"{name} is not allowed")


def read_header(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The safetensors JSON header, parsed defensively (length bounds, a JSON object).

    Every problem raises `error` with a message naming it.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(f"not a safetensors file: {path} is only {size} bytes")
            n = int.from_bytes(prefix, "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise error(f"not a safetensors file: header length {n} exceeds the file size "
                            f"{size} or the {MAX_HEADER_BYTES}-byte limit")
            raw = f.read(n)
    except OSError as e:
        raise error(f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise error(f"not a safetensors file: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise error("not a safetensors file: header is not a JSON object")
    return header
