"""Shared fixtures: run the HiF4 kernels on every CPU backend (C++ kernel and pure torch)."""
from __future__ import annotations

import pytest

from hifloat4 import backend, cpu_kernels


@pytest.fixture(params=["cpp", "torch"])
def implementation(request, monkeypatch):
    """Runs a test once per backend, forced through HIFLOAT4_BACKEND as a user would."""
    if request.param == "cpp" and cpu_kernels.load() is None:
        pytest.skip("C++ CPU kernels could not be built here (see the warning); torch path still tested")
    monkeypatch.setenv(backend.ENV, request.param)
    return request.param
