"""C++ CPU kernels for HiF4 (csrc/hif4_cpu.cpp), built on first use with torch's JIT.

Why: the torch implementation (torch_kernels.py) needs ~50 tensor ops per chunk; on a CPU
their per-op overhead dominates, and one C++ pass per group has none (`python -m hifloat4
bench` measures both on a machine). Building needs a C++ compiler and ninja; where
either is missing the torch implementation (same bits, tested against each
other) is used and a warning says why. Built once per machine, then cached by
torch (TORCH_EXTENSIONS_DIR).

Locking. torch's JIT loader guards a build with a `lock` file in the build folder
and waits forever while it exists, so a process killed mid-build used to hang every
later load (and with it packing, export and the nodes). Here a build runs under our
own lock, an OS file lock (flock) the kernel releases when its holder dies, waited
on for at most LOCK_WAIT_S. Its file records the holder (PID, host name, boot id)
while held and is emptied on release, so a record found on taking the lock names a
process that died holding it. Under that lock a torch `lock` file can only be a
leftover of a killed build (or of a builder that does not take our lock, e.g. an
older version of this plugin): if the recorded holder ran on this host and is gone
(no such PID, or the host has rebooted since), it is removed at once; otherwise (no
record, or a holder on another machine sharing the disk, whose PID means nothing
here) once it is STALE_LOCK_S old. Past the wait the torch implementation is used,
with a warning. Each wait says once what it waits for and for how long at most.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

SOURCE = Path(__file__).with_name("csrc") / "hif4_cpu.cpp"
LOCK_WAIT_S = 300.0  # a build takes about a minute on 2 cores; waiting longer than this means trouble
STALE_LOCK_S = 180.0  # a torch lock file this old, under our lock, was left by a killed build (holder unknown)
POLL_S = 0.2
OUR_LOCK = "hifloat4.lock"
TORCH_LOCK = "lock"  # torch.utils.file_baton.FileBaton's file in the build folder
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: new at each boot

log = logging.getLogger("hifloat4")


class LockTimeout(RuntimeError):
    """The build lock could not be had in time; the torch implementation is used."""


class Holder(NamedTuple):
    """Who holds our lock. A PID names a process only on its own host and boot."""
    pid: int
    host: str
    boot: str  # "" where the OS has no boot id: then only the PID tells


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _me() -> Holder:
    return Holder(os.getpid(), socket.gethostname(), _boot_id())


def _read_holder(fd: int) -> Holder | None:
    """The holder recorded in the lock file; None if it is empty (released cleanly)
    or unreadable (then only the age rule applies)."""
    try:
        fields = json.loads(os.pread(fd, 4096, 0))
        holder = Holder(fields["pid"], fields["host"], fields["boot"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = type(holder.pid) is int and 0 < holder.pid < 2**31
    return holder if ok and isinstance(holder.host, str) and isinstance(holder.boot, str) else None


def _write_holder(fd: int, holder: Holder | None) -> None:
    os.ftruncate(fd, 0)
    if holder is not None:
        os.pwrite(fd, json.dumps(holder._asdict()).encode(), 0)


def _who(holder: Holder | None) -> str:
    return "an unknown process" if holder is None else f"process {holder.pid} on {holder.host}"


def _is_gone(holder: Holder) -> bool:
    """Whether `holder` is known to have died: it ran on this host, and this host has
    rebooted since or has no process with its PID. False where that cannot be told
    (another host; no safe PID probe: os.kill(pid, 0) terminates on Windows)."""
    me = _me()
    if holder.host != me.host:
        return False
    if holder.boot and me.boot and holder.boot != me.boot:
        return True
    if os.name != "posix":
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        return False
    return False


@contextlib.contextmanager
def _file_lock(path: str, wait_s: float) -> Iterator[Holder | None]:
    """An exclusive flock on `path`, waited for at most `wait_s`, with this process
    recorded in the file while held. Yields the holder a previous owner left recorded
    (it died holding the lock), or None. A no-op yielding None where flock does not
    exist: there only the stale-file age rule applies."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield None
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    _notice(f"hifloat4: waiting at most {wait_s:.0f} s for {_who(_read_holder(fd))}, "
                            f"which holds {path} (building the C++ CPU kernel)")
                    told = True
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"another process has held {path} for over {wait_s:.0f} s") from None
                time.sleep(POLL_S)
        left = _read_holder(fd)
        _write_holder(fd, _me())
        try:
            yield left
        finally:
            _write_holder(fd, None)
    finally:
        os.close(fd)  # also releases the lock


def _clear_torch_lock(build_dir: str, deadline: float, stale_s: float, left: Holder | None) -> None:
    """Remove torch's lock file at once if `left`, the holder that died holding our
    lock, ran on this host and is gone; else wait for the file to go and remove it
    once it is `stale_s` old."""
    lock = os.path.join(build_dir, TORCH_LOCK)
    if left is not None and _is_gone(left):
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)
        log.warning("hifloat4: %s died while building the C++ CPU kernel in %s; took its lock over",
                    _who(left), build_dir)
        return
    told = False
    while True:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return
        if age >= stale_s:
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
            log.warning("hifloat4: removed %s, %.0f s old, left by an interrupted kernel build", lock, age)
            return
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{lock} has existed for {age:.0f} s (a build in progress elsewhere?)")
        if not told:
            at_most = min(stale_s - age, deadline - time.monotonic())
            _notice(f"hifloat4: waiting at most {at_most:.0f} s for {lock} (left by {_who(left)}) to go; "
                    f"it is removed once {stale_s:.0f} s old")
            told = True
        time.sleep(POLL_S)


def _notice(message: str) -> None:
    """One line a person sees: the log where logging shows INFO (ComfyUI, the export
    CLI), else stderr (a script without logging set up would drop it)."""
    if log.isEnabledFor(logging.INFO):
        log.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def _needs_build(build_dir: str, name: str) -> bool:
    """Whether ninja is about to compile: no library yet, an older one, or one built
    from a source at another path (only for the one-line notice; ninja decides)."""
    library = Path(build_dir) / (name + (".pyd" if sys.platform == "win32" else ".so"))
    try:
        return (library.stat().st_mtime < SOURCE.stat().st_mtime
                or str(SOURCE) not in (Path(build_dir) / "build.ninja").read_text(errors="replace"))
    except OSError:
        return True


def build(name: str, build_dir: str, jit_load: Callable[..., ModuleType], *,
          wait_s: float | None = None, stale_s: float | None = None) -> ModuleType:
    """jit_load(name=..., build_directory=build_dir, ...) of SOURCE under our lock,
    after clearing a torch lock left by a killed build; raises LockTimeout after `wait_s`
    (default LOCK_WAIT_S; `stale_s` default STALE_LOCK_S)."""
    wait_s = LOCK_WAIT_S if wait_s is None else wait_s
    stale_s = STALE_LOCK_S if stale_s is None else stale_s
    deadline = time.monotonic() + wait_s
    os.makedirs(build_dir, exist_ok=True)
    with _file_lock(os.path.join(build_dir, OUR_LOCK), wait_s) as left:
        _clear_torch_lock(build_dir, deadline, stale_s, left)
        if _needs_build(build_dir, name):
            _notice(f"hifloat4: building the C++ CPU kernel in {build_dir} (first use: about a minute on 2 cores)")
        return jit_load(name=name, sources=[str(SOURCE)], build_directory=build_dir,
                        extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def _build_directory(name: str) -> str:
    """Where torch would build `name` (so existing caches are reused)."""
    from torch.utils import cpp_extension

    get = getattr(cpp_extension, "_get_build_directory", None)
    if get is not None:
        return get(name, verbose=False)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return os.path.join(root, name)


@functools.lru_cache(maxsize=None)
def load() -> ModuleType | None:
    """The compiled extension, or None (with one warning) if it cannot be built here."""
    try:
        import torch
        from torch.utils.cpp_extension import load as jit_load

        # One build per torch installation and plugin copy: two venvs or two checkouts
        # sharing torch's extension cache under one name would rebuild it in turn
        # (ninja sees another source path) and wait on each other's lock.
        tag = hashlib.sha256(f"{torch.__file__}:{torch.__version__}:{SOURCE}".encode()).hexdigest()[:10]
        name = f"hifloat4_cpu_v1_{tag}"
        return build(name, _build_directory(name), jit_load)
    except Exception as e:  # no compiler, no ninja, read-only cache dir, lock timeout...
        warnings.warn(f"hifloat4: C++ CPU kernels unavailable ({type(e).__name__}: {e}); "
                      "using the torch implementation (same results, slower)", RuntimeWarning, stacklevel=2)
        return None
