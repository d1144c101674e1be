"""hifloat4.tools.calibration_check at CPU sizes: the GPU check's calibration section runs and
reports what it says (the CUDA figures come from a lent GPU)."""
from __future__ import annotations

import math

import pytest
import torch

from hifloat4.tools.calibration_check import SMALL, calibration_section


@pytest.fixture(scope="module")
def section():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return calibration_section(torch.device("cpu"), small=True)
    finally:
        torch.set_num_threads(threads)


def test_the_section_reports_the_four_figures(section):
    assert {"observed_block_over_plain", "state_build_s", "sample_bytes", "peak_extra_bytes"} <= set(section)
    assert math.isfinite(section["observed_block_over_plain"]) and section["observed_block_over_plain"] > 0
    assert 0 < section["state_build_s"] < 600
    assert section["peak_extra_bytes"] >= 0


def test_sample_bytes_count_rows_shared_by_layers_reading_one_input_once(section):
    """64 bf16 tokens per distinct input: per block x (q/k/v), attention out, cross q
    in, cross out, ffn.0 in (dim each) and ffn.2 in (ffn_dim); one context for all."""
    per_block = 5 * SMALL.dim + SMALL.ffn_dim
    assert section["sample_bytes"] == 64 * 2 * (SMALL.num_layers * per_block + SMALL.dim)
    assert section["state_build"]["layers"] == 10 * SMALL.num_layers

