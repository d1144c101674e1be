"""One backend choice per device, forced by HIFLOAT4_BACKEND, never a silent fallback."""
from __future__ import annotations

import pytest
import torch

import hifloat4
from hifloat4 import backend, cpu_kernels


@pytest.fixture
def env(monkeypatch):
    def set_(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv(backend.ENV, raising=False)
        else:
            monkeypatch.setenv(backend.ENV, value)
    return set_


def test_auto_picks_the_cpp_kernel_on_cpu(env):
    if cpu_kernels.load() is None:
        pytest.skip("C++ CPU kernels could not be built here")
    env(None)
    assert backend.for_device("cpu") == "cpp"


def test_auto_falls_back_to_torch_on_cpu_when_the_kernel_cannot_be_built(env, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    env("auto")
    assert backend.for_device("cpu") == "torch"


def test_auto_uses_torch_on_devices_without_a_kernel(env):
    env(None)
    assert backend.for_device("meta") == "torch"


def test_forced_torch_runs_anywhere(env):
    env("torch")
    assert backend.for_device("cpu") == backend.for_device("meta") == "torch"


def test_forced_cpp_on_a_non_cpu_device_raises(env):
    env("cpp")
    with pytest.raises(backend.BackendError, match="CPU tensors only"):
        backend.for_device("meta")


def test_forced_cpp_that_cannot_be_built_raises_instead_of_falling_back(env, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    env("cpp")
    with pytest.raises(backend.BackendError, match="could not be built"):
        hifloat4.quantize_dequantize(torch.ones(64))


def test_forced_triton_on_cpu_without_the_interpreter_raises(env, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    env("triton")
    with pytest.raises(backend.BackendError, match="Triton runs on CUDA"):
        hifloat4.quantize_dequantize(torch.ones(64))


def test_an_unknown_backend_name_is_refused(env):
    env("cuda-magic")
    with pytest.raises(backend.BackendError, match="not one of auto, cpp, triton, torch"):
        backend.for_device("cpu")


def test_the_backend_name_is_case_and_space_insensitive(env):
    env(" Torch ")
    assert backend.for_device("cpu") == "torch"
