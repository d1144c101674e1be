"""The C++ CPU kernels and the torch implementation compute the same bits."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
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


def test_a_build_lock_held_by_a_process_that_is_then_killed_is_released(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(tmp_path / cpu_kernels.OUR_LOCK)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(cpu_kernels.LockTimeout, match="held"):
            cpu_kernels.build("k", str(tmp_path), _torch_like_jit([]), wait_s=0.3, stale_s=60)
    finally:
        holder.kill()
        holder.wait()
    calls = []
    cpu_kernels.build("k", str(tmp_path), _torch_like_jit(calls), wait_s=5, stale_s=60)
    assert calls == ["k"]


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
