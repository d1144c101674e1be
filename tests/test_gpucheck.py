"""`python -m hifloat4 gpucheck` works on CPU (small sizes, CPU backends and Triton's
interpreter) before any GPU is lent."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest

from hifloat4 import backend, torch_kernels
from hifloat4.tools import gpucheck


def run_check(*args: str) -> tuple[int, dict]:
    """Exit code and the one RESULT line's JSON of a CPU run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gpucheck.main(["--device", "cpu", *args])
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1
    return code, json.loads(lines[0].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def cpu_result():
    """One full run on CPU (Triton in the interpreter is slow: run it once)."""
    return run_check()


def test_every_cpu_backend_is_exact_and_the_check_passes(cpu_result):
    code, result = cpu_result
    assert code == 0 and result["ok"]
    assert result["vectors"] != "missing"
    assert set(result["exact"]) == set(result["backends"]) and "torch" in result["backends"]
    assert all(v is True for v in result["exact"].values())


def test_the_report_has_throughput_and_block_ratios(cpu_result):
    _, result = cpu_result
    assert all(result["act_quant"][b]["copy_fraction"] > 0 for b in result["backends"])
    assert set(result["block"]["variants"]) == {"bf16", "w4a4", "packed"}
    assert result["block"]["w4a4_over_bf16"] > 0 and result["block"]["packed_over_bf16"] > 0


def test_a_backend_computing_wrong_bits_fails_the_check(monkeypatch):
    real = backend.kernels

    def off_by_one_ulp(groups, out):
        torch_kernels.quantize_groups(groups, out)
        out.view(-1)[:1] = out.view(-1)[:1].nextafter(out.new_full((1,), float("inf")))

    monkeypatch.setattr(backend, "kernels", lambda device: dataclasses.replace(real(device), quantize_groups=off_by_one_ulp))
    code, result = run_check("--backend", "torch")
    assert code == 1 and not result["ok"]
    assert result["backends"] == ["torch"]
    assert isinstance(result["exact"]["torch"], list) and result["exact"]["torch"]
