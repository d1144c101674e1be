"""Shared fixtures: run the HiF4 kernels on every backend this machine has."""
from __future__ import annotations

import os

import pytest
import torch

# Triton decides at decoration time whether a kernel is interpreted: without CUDA the
# kernels of hifloat4.triton_kernels run (slowly, bit-exactly) in its interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hifloat4 import backend, cpu_kernels  # noqa: E402 (after the environment is set)


@pytest.fixture(params=["cpp", "triton", "torch"])
def implementation(request, monkeypatch):
    """Runs a test once per backend, forced through HIFLOAT4_BACKEND as a user would.
    On a CPU, Triton runs in its interpreter; the backends run on CPU tensors."""
    if request.param == "cpp" and cpu_kernels.load() is None:
        pytest.skip("C++ CPU kernels could not be built here (see the warning); torch path still tested")
    if request.param == "triton" and "triton" not in backend.available("cpu"):
        pytest.skip("Triton cannot run on CPU tensors here (a CUDA machine: tests/test_triton_kernels.py covers it)")
    monkeypatch.setenv(backend.ENV, request.param)
    return request.param
