"""Specification of `python -m hifloat4 demo` (run in-process with --quick)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from hifloat4.state import load_state
from hifloat4.tools import demo

METRICS = ("denoiser_rel_err", "denoiser_rel_err_high", "denoiser_rel_err_low", "final_latent_rel_err",
           "mean_layer_sqnr_db")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = demo.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("demo") / "state.safetensors")
    code, out, err = _run(["--quick", "--out", path])
    return {"code": code, "out": out, "err": err, "path": path}


@pytest.fixture(scope="module")
def result(quick):
    last = quick["out"].strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    return json.loads(last[len("RESULT "):])


def test_quick_demo_exits_zero(quick):
    assert quick["code"] == 0, quick["err"]


def test_result_line_is_the_last_line_and_reports_every_method_with_finite_numbers(result):
    assert set(result["methods"]) == set(demo.METHODS)
    for method, numbers in result["methods"].items():
        assert set(numbers) == set(METRICS), method
        assert all(math.isfinite(v) for v in numbers.values()), method


def test_w4a4_changes_the_output_but_keeps_it_close(result):
    for numbers in result["methods"].values():
        assert 0 < numbers["denoiser_rel_err"] < 0.5
        assert 0 < numbers["final_latent_rel_err"] < 0.5


def test_reported_state_size_is_the_size_of_the_saved_file(quick, result):
    import os

    assert result["size"]["state_file_bytes"] == os.path.getsize(quick["path"])
    assert result["size"]["state_pct"] == pytest.approx(
        100 * result["size"]["state_file_bytes"] / result["size"]["model_bf16_bytes"])


def test_saved_state_is_valid_and_holds_both_experts_with_the_calibration_settings(quick, result):
    state = load_state(quick["path"])
    assert state.expert_names == ["high_noise", "low_noise"]
    assert (state.percentile, state.alpha, state.statistic) == (99.9, 0.5, "tail")
    assert state.calibration["steps"] == result["config"]["steps"]
    assert state.calibration["switch_step"] == result["config"]["switch_step"]


def test_every_phase_is_timed(result):
    assert {"build", "calibrate", "save_load", "quantize", "evaluate", "total"} <= set(result["timings_s"])


def test_output_states_plainly_whether_tail_aware_beat_max(quick, result):
    assert result["tail_vs_max"] in ("better", "worse", "tie", "mixed")
    beat = "tail-aware BEATS max" in quick["out"]
    assert beat == (result["tail_vs_max"] == "better")
    assert beat or "tail-aware does NOT" in quick["out"]


def test_progress_goes_to_stderr_and_the_table_to_stdout(quick):
    assert "[demo] calibrate" in quick["err"] and "[demo]" not in quick["out"]
    assert "tail-aware + Hadamard" in quick["out"]


@pytest.mark.parametrize("tail, other, verdict", [
    ((0.10, 0.20), (0.12, 0.25), "better"),
    ((0.12, 0.25), (0.10, 0.20), "worse"),
    ((0.100, 0.200), (0.101, 0.199), "tie"),
    ((0.08, 0.30), (0.10, 0.20), "mixed"),
])
def test_compare_reports_ties_within_the_margin_and_mixed_results(tail, other, verdict):
    as_metrics = lambda pair: {"denoiser_rel_err": pair[0], "final_latent_rel_err": pair[1]}  # noqa: E731
    assert demo.compare(as_metrics(tail), as_metrics(other)) == verdict


def test_too_few_steps_for_both_experts_is_refused_with_a_message():
    code, _, err = _run(["--quick", "--steps", "1"])
    assert code == 2 and "one expert would never run" in err


def test_out_path_must_be_a_safetensors_file(tmp_path):
    code, _, err = _run(["--quick", "--out", str(tmp_path / "state.pt")])
    assert code == 2 and ".safetensors" in err


def test_result_reports_final_error_against_kept_layers_for_sensitive_and_random_orders(result):
    keep = result["keep_sensitive"]
    assert set(keep) == {"n", "sensitive", "random"}
    assert keep["n"][0] == 0 and sum(n > 0 for n in keep["n"]) >= 3
    assert len(keep["sensitive"]) == len(keep["random"]) == len(keep["n"])
    assert keep["sensitive"][0] == keep["random"][0] == pytest.approx(result["methods"]["tail"]["final_latent_rel_err"])
    assert all(0 <= v < 0.5 for v in keep["sensitive"] + keep["random"])


def test_output_states_plainly_whether_keeping_sensitive_layers_beat_random_ones(quick):
    assert "keeping the N most sensitive layers vs N random ones" in quick["out"]
