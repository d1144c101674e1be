"""Files from strangers in, files for strangers out: the one validation path for every
file the project reads (PTQ states, packed checkpoints, source models, folder
listings) and the one atomic writer. Never unpickles anything.

Why each guard exists (each answers a case of a fuzz run of hostile files):
- regular files only, checked on the open descriptor (opened with O_NONBLOCK, then
  fstat), so a FIFO or a device in a model folder cannot block a reader;
- the header length is capped and checked against the file size before it is read;
- JSON is parsed with bounded size and nesting depth (a bracket scan before
  json.loads, so 100k levels cannot raise RecursionError), integers within int64,
  floats finite, no NaN/Infinity, no duplicate keys;
- the safetensors tensor table is checked exactly (entry keys, dtype, shape, offsets
  contiguous and inside the data, sizes matching) before any tensor is read, so no
  header can make a reader allocate more than the file holds.
Every problem raises the caller's subclass of HiF4FileError with a one-line reason.

Writes: temp file in the target folder, fsync, os.replace, then fsync of the folder;
a save refuses a symlink at the target name and a subfolder that leads outside its
root, and removes this module's own temp files that a killed save left behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import stat
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO

import numpy as np

log = logging.getLogger("hifloat4")

MAX_HEADER_BYTES = 4 * 2**20  # a Wan2.2-A14B header is ~0.2 MB; the cap bounds a hostile header's parse time
MAX_JSON_DEPTH = 32  # our metadata nests 6 deep; free-form user fields get some room
MAX_JSON_CONTAINERS = 100_000  # objects + arrays; an A14B header has ~4k (3 per tensor)
MAX_INT = 2**63 - 1  # JSON integers must fit int64 (seeds, shapes, offsets)
# safetensors dtype name -> bits per element (every dtype the format defines)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
SUFFIX = ".safetensors"  # every file the project reads or writes
EXPERT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # an expert's name in a state or a checkpoint
STALE_TEMP_S = 3600.0  # a temp file untouched this long belongs to a killed save (writers touch it per tensor)
_TEMP_RE = re.compile(r"\..+\.safetensors\.[a-z0-9_]{8}\.tmp")  # tempfile.mkstemp names made by atomic_file
_STRING_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_DEPTH_STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 / -1 as int8


class HiF4FileError(ValueError):
    """A file this project refuses to read or write; the message is one line naming why.
    PTQStateError and HiF4CheckpointError are its subclasses."""


def is_int(v) -> bool:
    """An integer from JSON (bool is an int to Python, but true is no number)."""
    return isinstance(v, int) and not isinstance(v, bool)


def few(names: Iterable[str]) -> str:
    """Up to four names for an error message, sorted, with the count of the rest."""
    names = sorted(names)
    return ", ".join(names[:4]) + (f" (+{len(names) - 4} more)" if len(names) > 4 else "")


# --------------------------------------------------------------------------- opening

@contextlib.contextmanager
def open_regular(path: str | os.PathLike, error: type[HiF4FileError]) -> Iterator[tuple[BinaryIO, int]]:
    """(binary file, size) of a regular file. The type is checked on the opened
    descriptor; O_NONBLOCK makes opening a FIFO return at once instead of waiting
    for a writer, so nothing here can block."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"cannot read {path}: not a regular file (a directory, FIFO or device)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def read_regular(path: str | os.PathLike, error: type[HiF4FileError], max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes`."""
    with open_regular(path, error) as (f, size):
        if size > max_bytes:
            raise error(f"{os.fspath(path)} is {size} bytes, more than the {max_bytes}-byte limit")
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise error(f"cannot read {os.fspath(path)}: {e.strerror or e}") from None
    if len(data) != size:
        raise error(f"{os.fspath(path)} changed size while being read")
    return data


def file_sha256(path: str | os.PathLike, error: type[HiF4FileError]) -> str:
    """Hex sha256 of a regular file's bytes (a FIFO or device raises `error`)."""
    h = hashlib.sha256()
    with open_regular(path, error) as (f, _):
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- JSON

def json_shape(raw: bytes) -> tuple[int, int]:
    """(deepest bracket nesting, number of objects and arrays) outside string literals;
    linear time, memory bounded per megabyte (numpy running sums), safe on any input."""
    steps = np.frombuffer(_STRING_RE.sub(b'""', raw).translate(_DEPTH_STEPS, _NOT_BRACKETS), dtype=np.int8)
    deepest, level = 0, 0
    for i in range(0, len(steps), 1 << 20):
        run = np.cumsum(steps[i:i + (1 << 20)], dtype=np.int64) + level
        deepest, level = max(deepest, int(run.max())), int(run[-1])
    return deepest, int((steps == 1).sum())


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) > MAX_INT:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} ({len(text)} characters) "
                         "is outside int64")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of the float range")
    return value


def _constant(name: str):
    raise ValueError(f"{name} is not allowed")


def _object(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError(f"duplicate keys {few(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)}")
    return obj


def loads_json(raw: str | bytes, error: type[HiF4FileError], what: str, max_bytes: int = MAX_HEADER_BYTES):
    """json.loads for untrusted text: size, depth and container count bounded, ints int64, floats
    finite, no NaN/Infinity, no duplicate keys. Problems raise `error`('<what>: <reason>')."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise error(f"{what}: {len(data)} bytes, more than the {max_bytes}-byte limit")
    depth, containers = json_shape(data)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{what}: nested {depth} levels deep, more than {MAX_JSON_DEPTH}")
    if containers > MAX_JSON_CONTAINERS:
        raise error(f"{what}: {containers} objects and arrays, more than {MAX_JSON_CONTAINERS}")
    try:
        return json.loads(data.decode("utf-8"), parse_int=_int, parse_float=_float, parse_constant=_constant,
                          object_pairs_hook=_object)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise error(f"{what}: {reason}") from None


def check_fields(meta: dict, types: Mapping[str, type | tuple[type, ...]], error: type[HiF4FileError]) -> None:
    """A metadata object has exactly these keys, each of its type (a bool is never an int
    or float here): the shared first check of every file format's metadata."""
    missing, unknown = set(types) - set(meta), set(meta) - set(types)
    if missing:
        raise error(f"metadata fields missing: {few(missing)}")
    if unknown:
        raise error(f"unknown metadata fields: {few(unknown)}")
    for key, typ in types.items():
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool):
            names = "/".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise error(f"metadata field {key!r} has type {type(meta[key]).__name__}, expected {names}")


# --------------------------------------------------------------------------- safetensors

def _check_table(header: dict, data_bytes: int, error: type[HiF4FileError]) -> None:
    """Entries exactly {dtype, shape, data_offsets}, known dtypes, offsets contiguous
    from 0 to the end of the data, each span the size its dtype and shape need."""
    meta = header.get("__metadata__", {})
    if not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise error("not a safetensors file: __metadata__ must map names to strings")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
            raise error(f"not a safetensors file: tensor {key[:80]!r} needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPE_BITS:
            raise error(f"not a safetensors file: tensor {key[:80]!r} has unsupported dtype {str(dtype)[:20]!r}")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(type(s) is int and 0 <= s for s in shape)):
            raise error(f"not a safetensors file: tensor {key[:80]!r}: shape must be a list of at most 8 non-negative ints")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise error(f"not a safetensors file: tensor {key[:80]!r}: data offsets {str(offsets)[:60]} outside the "
                        f"{data_bytes} bytes of data")
        if (offsets[1] - offsets[0]) * 8 != math.prod(shape) * DTYPE_BITS[dtype]:
            raise error(f"not a safetensors file: tensor {key[:80]!r}: {offsets[1] - offsets[0]} bytes of data for a {dtype} "
                        f"tensor of shape {shape}")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise error(f"not a safetensors file: tensor data overlaps or leaves a gap at byte {end}")
        end = stop
    if end != data_bytes:
        raise error(f"not a safetensors file: the tensors cover {end} of {data_bytes} data bytes")


def _parse_header(prefix: bytes, size: int, read, error: type[HiF4FileError], path: str) -> dict:
    if len(prefix) < 8:
        raise error(f"not a safetensors file: {path} is only {size} bytes")
    n = int.from_bytes(prefix[:8], "little")
    if n > size - 8 or n > MAX_HEADER_BYTES:
        raise error(f"not a safetensors file: header length {n} exceeds the file size "
                    f"{size} or the {MAX_HEADER_BYTES}-byte limit")
    header = loads_json(read(n), error, "not a safetensors file: unreadable header")
    if not isinstance(header, dict):
        raise error("not a safetensors file: header is not a JSON object")
    _check_table(header, size - 8 - n, error)
    return header


def read_header(path: str | os.PathLike, error: type[HiF4FileError]) -> dict:
    """The safetensors JSON header of a file, checked as described above."""
    path = os.fspath(path)
    with open_regular(path, error) as (f, size):
        try:
            return _parse_header(f.read(8), size, f.read, error, path)
        except OSError as e:
            raise error(f"cannot read {path}: {e.strerror or e}") from None


def parse_header(data: bytes, error: type[HiF4FileError], name: str) -> dict:
    """read_header for a file already in memory (`name` labels the messages)."""
    return _parse_header(data[:8], len(data), lambda n: data[8:8 + n], error, name)


# --------------------------------------------------------------------------- writing

def safe_output_path(directory: str | os.PathLike, name: str, *, what: str, suffix: str,
                     error: type[HiF4FileError]) -> str:
    """Join a user-supplied bare file name to `directory`, refusing anything that could
    point elsewhere: separators, '..', absolute or drive paths, hidden names, NUL,
    other suffixes, and an existing symlink at that name. `what` names the file in
    messages ("state", "model file")."""
    if not isinstance(name, str) or not name:
        raise error(f"{what} name must be a non-empty string")
    if "/" in name or "\\" in name or "\0" in name or os.path.isabs(name) or re.match(r"[A-Za-z]:", name):
        raise error(f"{what} name {name!r} must be a bare file name (no separators or drive)")
    if ".." in name or name.startswith("."):
        raise error(f"{what} name {name!r} must not contain '..' or start with '.'")
    if not name.endswith(suffix) or len(name) == len(suffix) or len(name) > 255:
        raise error(f"{what} name {name!r} must be a name ending in {suffix}")
    base = os.path.abspath(directory)
    path = os.path.join(base, name)
    if os.path.dirname(path) != base:
        raise error(f"{what} name {name!r} escapes {base}")
    if os.path.islink(path):
        raise error(f"{path} is a symlink; a save never writes through one")
    return path


def output_folder(root: str | os.PathLike, subfolder: str, *, what: str, error: type[HiF4FileError]) -> str:
    """root/subfolder, created if needed, refusing a subfolder that leads outside root
    (e.g. through a symlink planted inside it). `what` names the folder in messages."""
    root = os.path.abspath(root)
    folder = os.path.abspath(os.path.join(root, subfolder))

    def check() -> None:
        real_root, real = os.path.realpath(root), os.path.realpath(folder)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            raise error(f"subfolder {subfolder!r} leads outside {what} ({root}), e.g. through a symlink")

    check()
    os.makedirs(folder, exist_ok=True)
    check()  # again: a link planted while the folders were made
    return folder


def remove_stale_temps(directory: str | os.PathLike, max_age_s: float = STALE_TEMP_S) -> list[str]:
    """Delete atomic_file temp files (by name pattern) untouched for `max_age_s`:
    what a killed save leaves. Logs one line per file; returns the names removed."""
    removed = []
    now = time.time()
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if not _TEMP_RE.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > max_age_s:
                    os.unlink(entry.path)
                    removed.append(entry.name)
                    log.info("hifloat4: removed %s (%.1f MB), left by an interrupted save",
                             entry.path, st.st_size / 1e6)
    return removed


def _fsync_dir(directory: str) -> None:
    """Make a rename durable; not possible on every platform (Windows), hence best effort."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Write `path` all or nothing: a temp file in the same directory, fsync, os.replace,
    fsync of the directory; on any failure (Ctrl-C included) the temp file is removed
    and `path` is untouched. Stale temps of killed saves in that folder go first."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
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
    _fsync_dir(directory)
