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


@pytest.fixture(scope="session")
def tiny_calibrated():
    """A factory: `tiny_calibrated(experts=(...), **size)` -> (models, state): tiny T2V
    Wan2.2 experts of that size (make_tiny_wan's keywords), weights rounded to bf16 (what
    a checkpoint holds), and a PTQ state calibrated (CalibConfig defaults) on one forward
    per expert. Built once per size and experts for the whole session: copy before changing."""
    from hifloat4.calibrate import CalibConfig, calibrate
    from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan

    built: dict = {}

    def make(experts: tuple[str, ...] = ("high_noise", "low_noise"), **size):
        key = (tuple(experts), tuple(sorted(size.items())))
        if key not in built:
            models = {e: make_tiny_wan("t2v", expert=e, **size) for e in experts}
            with torch.no_grad():
                for m in models.values():
                    for p in m.parameters():
                        p.copy_(p.bfloat16().float())

            def run() -> None:
                for m in models.values():
                    m(*example_inputs(m, text_len=8))

            built[key] = models, calibrate(models, run, CalibConfig())
        return built[key]

    return make
