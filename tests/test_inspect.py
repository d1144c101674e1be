"""Specification of `python -m hifloat4 inspect FILE [--json]`."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from safetensors.torch import save_file

from hifloat4.calibrate import CalibConfig, ExpertObservation, build_state, observe
from hifloat4.state import save_state
from hifloat4.tools import inspect_state
from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = inspect_state.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real two-expert state of a tiny model, calibrated on one forward per expert."""
    experts = {}
    for name in ("high_noise", "low_noise"):
        model = make_tiny_wan("t2v", dim=64, ffn_dim=128, layers=2, text_dim=32, expert=name)
        x, t, ctx = example_inputs(model, frames=1, height=4, width=4, text_len=8)
        with observe(model) as stats, torch.no_grad():
            model(x, t, ctx)
        experts[name] = ExpertObservation(model, stats)
    state = build_state(experts, CalibConfig(), calibration={"prompts": 1, "steps": 1, "cfg": 5.0},
                        patches={"high_noise": [{"strength": 1.0, "keys": 7, "digest": "sha256:" + "0" * 64,
                                                  "names": ["lightx2v_high.safetensors"]}],
                                 "low_noise": []})
    return save_state(tmp_path_factory.mktemp("inspect") / "good.safetensors", state)


def _damaged(good, tmp_path, edit) -> str:
    data = bytearray(open(good, "rb").read())
    path = tmp_path / "bad.safetensors"
    path.write_bytes(edit(data))
    return str(path)


def test_good_file_exits_zero_and_prints_the_layer_count(good):
    code, out, _ = _run([good])
    assert code == 0
    assert "40 layers" in out  # 2 experts x 2 blocks x 10 main layers
    assert "high_noise   20 layers" in out and "low_noise    20 layers" in out


def test_good_file_output_shows_the_method_metadata_and_checksum(good):
    _, out, _ = _run([good])
    for text in ("checksum:    OK", "hifloat4-ptq v2", "alpha 0.5", "percentile 99.9", "statistic tail",
                 "rotation:    none", '"prompts": 1'):
        assert text in out, text


def test_output_shows_the_recorded_lora_patches(good):
    _, out, _ = _run([good])
    assert "patches:     high_noise: 7 patched weights at strength 1 (lightx2v_high.safetensors); low_noise: none" \
        in out


def test_json_summary_matches_the_file(good):
    import os

    code, out, _ = _run([good, "--json"])
    summary = json.loads(out)
    assert code == 0
    assert summary["total_layers"] == 40 and summary["file_bytes"] == os.path.getsize(good)
    assert [e["name"] for e in summary["experts"]] == ["high_noise", "low_noise"]
    assert summary["total_channels"] == 2 * 2 * (9 * 64 + 128)


def test_missing_file_exits_two_with_a_message(tmp_path):
    code, out, err = _run([str(tmp_path / "nope.safetensors")])
    assert code == 2 and out == ""
    assert "cannot read" in err


def test_flipped_byte_in_the_tensor_data_exits_two_with_checksum_mismatch(good, tmp_path):
    def flip_first_value(data):
        header = int.from_bytes(data[:8], "little")
        data[8 + header] ^= 0x01  # lowest mantissa bit of the first fp32 value: still a plausible number
        return bytes(data)

    code, _, err = _run([_damaged(good, tmp_path, flip_first_value)])
    assert code == 2 and "checksum mismatch" in err


def test_truncated_file_exits_two_with_a_message(good, tmp_path):
    code, _, err = _run([_damaged(good, tmp_path, lambda d: bytes(d[: len(d) // 2]))])
    assert code == 2 and "error:" in err


def test_safetensors_file_that_is_not_a_state_exits_two(tmp_path):
    path = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(3)}, path)
    code, _, err = _run([path])
    assert code == 2 and "not a HiFloat4 PTQ state" in err
