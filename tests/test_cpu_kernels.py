"""The C++ CPU kernels and the torch implementation compute the same bits."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available
from torch.utils.file_baton import FileBaton

from hifloat4 import cpu_kernels, torch_kernels
from hifloat4.format import to_groups

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def kernels():
    k = cpu_kernels.load()
    if k is None:
        pytest.skip("C++ CPU kernels could not be built here (no compiler or ninja)")
    return k


def sample(dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 1024, generator=g) * torch.exp2(torch.randint(-40, 15, (64, 1), generator=g).float())
    return to_groups(x.to(dtype), -1)[0].contiguous()


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_agrees_bit_for_bit(kernels, dtype):
    groups = sample(dtype)
    groups[3, 17] = float("nan")
    groups[5, 0] = -float("inf")
    a, b = torch.empty_like(groups), torch.empty_like(groups)
    kernels.quantize_dequantize_groups(groups, a)
    torch_kernels.quantize_groups(groups, b)
    assert torch.equal(raw(a), raw(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_agrees_byte_for_byte(kernels, dtype):
    groups = sample(dtype)
    a = torch.empty(groups.shape[0], 36, dtype=torch.uint8)
    b = torch.empty_like(a)
    assert kernels.pack_groups(groups, a) and torch_kernels.pack_groups(groups, b)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_agrees_bit_for_bit(kernels, dtype):
    data = torch.empty(sample(dtype).shape[0], 36, dtype=torch.uint8)
    kernels.pack_groups(sample(dtype), data)
    a = torch.empty(data.shape[0], 64, dtype=dtype)
    b = torch.empty_like(a)
    kernels.unpack_groups(data, a)
    torch_kernels.unpack_groups(data, b)
    assert torch.equal(raw(a), raw(b))


def test_kernel_refuses_non_contiguous_groups(kernels):
    groups = sample(torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernels.quantize_dequantize_groups(groups.t(), torch.empty_like(groups).t())


# --------------------------------------------------------------------------- build lock

def _torch_like_jit(calls: list):
    """Stands in for torch's JIT loader at the point that used to hang: it takes
    torch's FileBaton in the build folder, and fails instead of waiting forever."""
    def jit(*, name, sources, build_directory, **kwargs):
        baton = FileBaton(os.path.join(build_directory, cpu_kernels.TORCH_LOCK))
        if not baton.try_acquire():
            raise AssertionError("torch's loader would wait forever on its lock file here")
        try:
            (Path(build_directory) / f"{name}.so").write_bytes(b"")
            (Path(build_directory) / "build.ninja").write_text(f"build x: compile {sources[0]}\n")
        finally:
            baton.release()
        calls.append(name)
        return types.ModuleType(name)
    return jit


def _plant_torch_lock(build_dir: Path, age_s: float) -> Path:
    lock = build_dir / cpu_kernels.TORCH_LOCK
    lock.write_bytes(b"")
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_a_stale_torch_lock_left_by_a_killed_build_is_removed_and_the_build_runs(tmp_path):
    lock = _plant_torch_lock(tmp_path, age_s=3600)
    calls = []
    module = cpu_kernels.build("k", str(tmp_path), _torch_like_jit(calls), wait_s=5, stale_s=60)
    assert module.__name__ == "k" and calls == ["k"] and not lock.exists()


def test_a_young_torch_lock_times_out_instead_of_hanging(tmp_path):
    _plant_torch_lock(tmp_path, age_s=0)
    calls = []
    t0 = time.monotonic()
    with pytest.raises(cpu_kernels.LockTimeout, match="has existed"):
        cpu_kernels.build("k", str(tmp_path), _torch_like_jit(calls), wait_s=0.5, stale_s=60)
    assert time.monotonic() - t0 < 3 and calls == []


def test_load_falls_back_to_the_torch_implementation_with_a_warning_after_the_timeout(tmp_path, monkeypatch):
    _plant_torch_lock(tmp_path, age_s=0)
    monkeypatch.setattr(cpu_kernels, "_build_directory", lambda name: str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "LOCK_WAIT_S", 0.5)
    cpu_kernels.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="LockTimeout.*torch implementation"):
            assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()  # the next caller loads the real kernel again


ROOT = Path(__file__).resolve().parents[1]

# A builder that takes our lock and torch's, like a real build, then stays in the middle of it.
FAKE_BUILDER = """
import os, sys, time
from torch.utils.cpp_extension import is_ninja_available
from torch.utils.file_baton import FileBaton
from hifloat4 import cpu_kernels

def jit(*, build_directory, **kwargs):
    FileBaton(os.path.join(build_directory, cpu_kernels.TORCH_LOCK)).try_acquire()
    print("building", flush=True)
    time.sleep(120)

cpu_kernels.build("k", sys.argv[1], jit)
"""


@contextlib.contextmanager
def _builder_midway(build_dir: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([sys.executable, "-c", FAKE_BUILDER, str(build_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "building"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_live_holder_is_waited_for_with_one_notice_naming_it(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hifloat4")
    with _builder_midway(tmp_path) as holder, pytest.raises(cpu_kernels.LockTimeout, match="held"):
        cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=1, stale_s=60)
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waits) == 1 and f"waiting at most 1 s for process {holder.pid} on {socket.gethostname()}" in waits[0]


def test_a_lock_whose_holder_was_killed_midway_is_taken_over_at_once(tmp_path, caplog):
    with _builder_midway(tmp_path) as holder:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / cpu_kernels.TORCH_LOCK).exists()  # young: the age rule alone would time out below
    calls = []
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit(calls), wait_s=5, stale_s=60)
    assert calls == ["k"]
    said = [r.getMessage() for r in caplog.records if "took its lock over" in r.getMessage()]
    assert len(said) == 1 and f"process {holder.pid} on" in said[0]


@pytest.fixture
def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record_holder(build_dir: Path, record: str) -> None:
    (build_dir / cpu_kernels.OUR_LOCK).write_text(record)


def _holder_json(pid: int, host: str, boot: str) -> str:
    return json.dumps(cpu_kernels.Holder(pid, host, boot)._asdict())


@pytest.mark.parametrize("holder", ["on another host", "still running", "unreadable"])
def test_a_torch_lock_is_not_taken_over_unless_its_holder_is_known_dead_here(tmp_path, monkeypatch, dead_pid, holder):
    monkeypatch.setattr(cpu_kernels, "_boot_id", lambda: "this-boot")
    _record_holder(tmp_path, {
        "on another host": _holder_json(dead_pid, "another-host", "this-boot"),
        "still running": _holder_json(os.getpid(), socket.gethostname(), "this-boot"),
        "unreadable": _holder_json(dead_pid, socket.gethostname(), "this-boot")[:-5],
    }[holder])
    _plant_torch_lock(tmp_path, age_s=0)
    with pytest.raises(cpu_kernels.LockTimeout, match="has existed"):
        cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=0.5, stale_s=60)


def test_a_holder_recorded_before_this_host_rebooted_is_taken_over_though_its_pid_runs_now(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_boot_id", lambda: "this-boot")
    _record_holder(tmp_path, _holder_json(os.getpid(), socket.gethostname(), "an-earlier-boot"))
    _plant_torch_lock(tmp_path, age_s=0)
    calls = []
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit(calls), wait_s=5, stale_s=60)
    assert calls == ["k"]


# A real first load; LOCK_WAIT_S from argv: waiting longer raises LockTimeout (a warning, no build).
REAL_LOAD = """
import sys
from hifloat4 import cpu_kernels
cpu_kernels.LOCK_WAIT_S = float(sys.argv[1])
cpu_kernels.load()
"""


def _start_real_load(lock_wait_s: float, extensions_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REAL_LOAD, str(lock_wait_s)], cwd=ROOT,
                            env={**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL the leader and every process of its session, including the compilers
    ninja starts in process groups of their own (they would keep using the CPU)."""
    with contextlib.suppress(ProcessLookupError):
        leader.send_signal(signal.SIGKILL)
    leader.wait()
    found = True
    while found:
        found = False
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                state, _, _, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
                if int(session) == leader.pid and state != "Z":  # a zombie is dead already
                    os.kill(int(stat.parent.name), signal.SIGKILL)
                    found = True
        time.sleep(0.1)


def _lines_until(proc: subprocess.Popen, marker: str, timeout_s: float = 600) -> list[str]:
    """proc's output lines up to the first containing `marker` (or its end); the timer
    only guards against a hang, it asserts nothing."""
    guard = threading.Timer(timeout_s, proc.kill)
    guard.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if marker in line:
                break
    finally:
        guard.cancel()
    return lines


needs_compiler = pytest.mark.skipif(
    not (Path("/proc/self/stat").exists() and shutil.which(os.environ.get("CXX", "c++")) and is_ninja_available()),
    reason="needs Linux, a C++ compiler and ninja")


@needs_compiler
def test_a_real_build_killed_midway_lets_the_next_load_start_building_within_20_s(tmp_path):
    first = _start_real_load(cpu_kernels.LOCK_WAIT_S, tmp_path)
    try:
        lines = _lines_until(first, "building the C++ CPU kernel")
        assert "building the C++ CPU kernel" in lines[-1], lines
        while not list(tmp_path.glob("*/build.ninja")):  # torch writes it under its lock, then runs ninja
            assert first.poll() is None, first.stdout.read()
            time.sleep(0.05)
    finally:
        _kill_session(first)
    assert list(tmp_path.glob(f"*/{cpu_kernels.TORCH_LOCK}")), "the killed build left torch's lock"
    second = _start_real_load(20, tmp_path)
    try:
        lines = _lines_until(second, "building the C++ CPU kernel")
    finally:
        _kill_session(second)
    assert "building the C++ CPU kernel" in lines[-1], lines
    assert any(f"process {first.pid} on" in line and "took its lock over" in line for line in lines), lines


def test_one_log_line_says_when_a_build_starts_and_none_when_the_build_is_cached(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="hifloat4")
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=5, stale_s=60)
    assert len([r for r in caplog.records if "building the C++ CPU kernel" in r.getMessage()]) == 1
    caplog.clear()
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=5, stale_s=60)
    assert not any("building" in r.getMessage() for r in caplog.records)


def test_the_build_notice_reaches_stderr_where_logging_would_drop_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cpu_kernels.log, "level", logging.WARNING)
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=5, stale_s=60)
    assert "building the C++ CPU kernel" in capsys.readouterr().err
