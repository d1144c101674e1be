"""`python -m hifloat4 eval --quick`: runs end to end, writes its tables, results.json and
plots, and degrades gracefully without the optional extra (the real model, matplotlib)."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hifloat4 import rotation
from hifloat4.tools.eval import cli, methods, real_model, report

ROOT = Path(__file__).resolve().parents[1]
HAVE_REAL_MODEL = all(importlib.util.find_spec(m) is not None for m in (real_model.MODULE, "sentence_transformers"))
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _run(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        rc = cli.main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One full --quick run with whatever is installed here."""
    out = tmp_path_factory.mktemp("eval_quick")
    rc, text = _run(["--quick", "--out", str(out)])
    return rc, text, out, _strict_json(out / "results.json")


def test_quick_run_exits_0_and_prints_every_section(quick):
    rc, text, _, _ = quick
    assert rc == 0
    for heading in ("== 1. Tiny Wan2.2", "== 2. Real pretrained transformer", "== 3. HiF4 vs other 4-bit formats",
                    "== verdicts"):
        assert heading in text
    assert "report.txt" in text


def test_results_json_is_strict_json_with_all_three_parts(quick):
    _, _, out, results = quick
    assert {"meta", "tiny_wan", "real_model", "formats", "verdicts"} <= set(results)
    assert (out / "report.txt").read_text().startswith("\n== 1.")


def test_tiny_wan_part_measures_none_max_and_tail_with_and_without_rotation(quick):
    ms = quick[3]["tiny_wan"]["methods"]
    for key in ("none", "max a0.5", "tail p99.9 a0.5", "none +rot", "tail p99.9 a0.5 +rot"):
        r = ms[key]
        assert 0 < r["final_latent_rel_err"] < 1 and 0 < r["denoiser_rel_err"] < 1
        assert r["layers"] and all(isinstance(v["sqnr_db"], float) for v in r["layers"].values())


def test_calibration_size_sweep_covers_every_size(quick):
    w = quick[3]["tiny_wan"]
    sizes = [str(k) for k in w["config"]["calib_sizes"]]
    assert all(list(per) == sizes for per in w["calib_size"].values())


def test_formats_part_reports_every_format_on_gaussians_and_activations(quick):
    fm = quick[3]["formats"]
    assert set(fm["formats"]) == {"HiF4", "NVFP4", "NVFP4 (no tensor scale)", "MXFP4", "INT4 g32 bf16"}
    assert all(len(v) == len(fm["gaussian"]["HiF4"]) for v in fm["gaussian"].values())
    assert "tiny Wan" in fm["activations"]


@pytest.mark.skipif(not HAVE_REAL_MODEL, reason="optional extra .[eval] not installed")
def test_real_model_part_reports_cosine_per_method_when_installed(quick):
    r = quick[3]["real_model"]
    assert r["status"] == "ok"
    assert all(0.5 < v["cos_mean"] <= 1.0 for v in r["methods"].values())
    assert "all-MiniLM-L6-v2" in quick[3]["formats"]["activations"]


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib (optional extra .[eval]) not installed")
def test_plots_are_written_when_matplotlib_is_installed(quick):
    out = quick[2]
    for name in report.PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_real_model_package_is_skipped_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, real_model.MODULE, None)  # import fails as if not installed
    rc, text = _run(["--quick", "--no-plots", "--out", str(tmp_path)])
    assert rc == 0
    r = _strict_json(tmp_path / "results.json")["real_model"]
    assert r["status"] == "skipped"
    assert real_model.MODULE in r["reason"] and "pip install" in r["reason"]
    assert "real-model part skipped" in text and "== 3. HiF4 vs other 4-bit formats" in text


def test_missing_matplotlib_skips_plots_but_still_prints_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    rc, text = _run(["--quick", "--skip-real-model", "--out", str(tmp_path)])
    assert rc == 0
    assert "plots skipped: matplotlib is not installed" in text
    assert "== 1. Tiny Wan2.2" in text
    assert not list(tmp_path.glob("*.png"))
    assert (tmp_path / "results.json").exists()


def test_held_out_sentences_are_never_calibration_ones():
    assert not set(real_model.CALIBRATION) & set(real_model.HELD_OUT)
    assert len(real_model.SENTENCES) == len(set(real_model.SENTENCES)) >= 40


def test_full_method_grid_is_none_max_and_tail_at_3_percentiles_x_3_alphas_with_and_without_rotation():
    grid = methods.method_grid((99, 99.9, 99.99), (0.3, 0.5, 0.7))
    assert len(grid) == 2 * (1 + 3 + 9)
    assert len({m.key for m in grid}) == len(grid)


def test_rotation_rows_can_be_limited_to_some_alphas():
    grid = methods.method_grid((99, 99.9, 99.99), (0.3, 0.5, 0.7), rotation_alphas=(0.5,))
    rotated = [m.key for m in grid if m.rotation]
    assert rotated == ["none +rot", "max a0.5 +rot", "tail p99 a0.5 +rot", "tail p99.9 a0.5 +rot",
                       "tail p99.99 a0.5 +rot"]
    assert len(grid) == 13 + 5


def test_rotated_methods_give_each_layer_the_shipped_rotation_rule():
    stats = {f"l{k}": methods.LayerStats(wmax=torch.ones(k), absmax=torch.ones(k), tails={99.9: torch.ones(k)})
             for k in (384, 1536)}
    layers = methods.layer_map(stats, methods.Method("tail", 0.5, 99.9, rotation=True))
    shipped = rotation.hadamard(rotation.DEFAULT_BLOCK)
    assert {n: q.rotation for n, q in layers.items()} == {f"l{k}": rotation.for_layer(shipped, k) for k in (384, 1536)}
    assert layers["l384"].rotation.block == 128 and layers["l1536"].rotation.block == 512


def test_command_line_dispatches_eval():
    proc = subprocess.run([sys.executable, "-m", "hifloat4", "eval", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_tiny_wan_part_reports_error_against_kept_layers_for_all_three_orders(quick):
    k = quick[3]["tiny_wan"]["keep_sensitive"]
    assert k["n"][0] == 0 and len(k["n"]) >= 3
    for order in ("sensitive", "random", "position"):
        assert len(k[order]) == len(k["n"]) and k[order][0] == k["sensitive"][0]
    assert all(len(runs) == len(k["seeds"]) for runs in k["random_runs"])


def test_both_parts_report_adaptive_against_the_fixed_statistic_with_its_choices(quick):
    results = quick[3]
    parts = ["tiny_wan"] + (["real_model"] if results["real_model"].get("status") == "ok" else [])
    for part in parts:
        a = results[part]["adaptive"]
        assert len(a["methods"]) == 2 and "adaptive" in a["methods"]
        assert set(a["choices"]) <= {"p99", "p99.9", "p99.99", "max"} and sum(a["choices"].values()) > 0


def test_verdicts_say_whether_sensitive_beats_random_and_position(quick):
    text = quick[1]
    assert "keeping the N most sensitive layers vs N random ones" in text
    assert "keeping the N most sensitive layers vs the first N in block order" in text


def test_massive_part_reports_the_three_errors_for_every_method_with_and_without_rotation(quick):
    from hifloat4.tools.eval import massive

    m = quick[3]["massive"]
    cfg = massive.quick_config()
    assert list(m["methods"]) == [massive.key(x) for x in massive.methods(cfg.percentiles, cfg.alphas)]
    assert {"none", "adaptive a0.5", "tail p99.9 a0.5 +rot", "adaptive a0.5 +rot"} <= set(m["methods"])
    for r in m["methods"].values():
        for metric in ("ordinary_rel_err", "massive_rel_err", "final_latent_rel_err"):
            assert 0 < r[metric] < 10
    assert m["config"]["sinks_per_call"] < m["config"]["tokens_per_call"] * 0.001  # p99.9 drops them all


def test_massive_part_prints_its_table_premise_and_verdicts(quick):
    text = quick[1]
    assert "== 4. Token-wise massive activations" in text
    assert "p99.9 / sink" in text and "massive tokens rel err" in text
    assert "settings that beat the paper's default (tail p99.9 a0.5) by the pre-set rule" in text
