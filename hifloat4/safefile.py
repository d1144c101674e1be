"""Reading safetensors files from strangers: the defensive pieces shared by PTQ states
(state.py) and packed checkpoints (export.py). Never unpickles anything."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

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


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write `path` all or nothing: a temp file in the same directory, fsync, then
    os.replace; on any failure the temp file is removed and `path` is untouched."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                               prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
