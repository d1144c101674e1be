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
    assert {"bf16", "w4a4", "packed"} <= set(result["block"]["variants"])
    assert result["block"]["w4a4_over_bf16"] > 0 and result["block"]["packed_over_bf16"] > 0


def test_the_report_has_what_users_pay(cpu_result):
    _, result = cpu_result
    assert {"bf16_ms", "w4a4_ms", "packed_ms"} <= set(result["model_call"])
    vram = result["apply_vram"]
    assert vram["main_weight_bytes_after"] / vram["main_weight_count"] == 36 / 64  # planar codes only
    assert vram["main_weight_bytes_before"] / vram["main_weight_count"] == 3  # fp8 + a bf16 Q(W/m)
    assert result["patch_s"] > 0
    first, second = result["lora"]  # the two ffn layers: in and out swapped
    assert first["shape"][1:] == second["shape"][:0:-1]
    assert len(result["lora"]) == 2 and all(r["bypass_host_ms"] > 0 and r["merge_ms_per_layer"] > 0
                                            for r in result["lora"])


def test_the_int8_path_is_measured_and_exact_where_triton_runs(cpu_result):
    _, result = cpu_result
    if "triton" not in result["backends"]:
        pytest.skip("no Triton here")
    assert "int8_gemm/bf16" not in str(result["exact"]["triton"])  # exact (True) on every fused case
    assert [r["shape"] for r in result["int8_gemm"]] == [[64, 256, 512], [64, 512, 256]]
    assert all(r["max_rel_err_vs_fp64"] <= 1e-5 for r in result["int8_gemm"])
    assert all({"BM", "BN", "num_warps"} <= set(r["tuning"]["config"]) for r in result["int8_gemm"])
    assert "int8" in result["block"]["variants"] and result["block"]["int8_rel_l2_vs_w4a4"] <= 1e-3
    assert "int8_ms" in result["model_call"]


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
