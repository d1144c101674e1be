"""Shared fixtures: run the HiF4 kernels both ways (C++ CPU kernel and pure torch)."""
from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted: without CUDA the
# kernels of hifloat4.triton_kernels run (slowly, bit-exactly) in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hifloat4 import cpu_kernels  # noqa: E402 (after the environment is set)


@pytest.fixture(params=["cpu-kernel", "torch"])
def implementation(request, monkeypatch):
    """Runs a test once with the C++ CPU kernels and once with the torch implementation."""
    if request.param == "torch":
        monkeypatch.setattr(cpu_kernels, "load", lambda: None)
    elif cpu_kernels.load() is None:
        pytest.skip("C++ CPU kernels could not be built here (see the warning); torch path still tested")
    return request.param
