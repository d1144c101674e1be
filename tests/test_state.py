"""Specification of hifloat4.state: the PTQ state file and its validation."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hifloat4 import masks, wan
from hifloat4 import state as st
from hifloat4.state import (ExpertState, LayerState, PTQState, PTQStateError, load_state, safe_state_path, save_state,
                            state_nbytes, validate_against_model)
from hifloat4.tools.tiny_wan import make_tiny_wan
from hifloat4.wan_model import WanConfig, WanModel

EXPERTS = ("high_noise", "low_noise")


def _layer(channels: int, gen: torch.Generator) -> LayerState:
    absmax = torch.rand(channels, generator=gen) * 10 + 0.1
    tail = absmax * (0.2 + 0.8 * torch.rand(channels, generator=gen))
    wmax = torch.rand(channels, generator=gen) + 0.01
    tails = absmax * (0.2 + 0.8 * torch.rand(3, channels, generator=gen)).sort(dim=0).values
    errors = 0.05 + 0.1 * torch.rand(5, generator=gen)
    return masks.make_layer_state(wmax, absmax, tail, alpha=0.5, statistic="tail", tails=tails, errors=errors)


def _v1(state: PTQState) -> PTQState:
    """The same state as format version 1 had it: no tails, no errors."""
    experts = {e: ExpertState({ln: dataclasses.replace(ls, tails=None, errors=None) for ln, ls in ex.layers.items()},
                              ex.fingerprint) for e, ex in state.experts.items()}
    return dataclasses.replace(state, experts=experts)


def _state(models) -> PTQState:
    gen = torch.Generator().manual_seed(0)
    experts = {}
    for name, model in models.items():
        shapes = wan.linear_shapes(model)
        experts[name] = ExpertState(
            layers={ln: _layer(shapes[ln][1], gen) for ln in wan.main_linear_names(model)},
            fingerprint=wan.fingerprint(model))
    return PTQState(experts=experts, alpha=0.5, percentile=99.9, statistic="tail", rotation=None,
                    model_family="wan2.2", model_variant="custom",
                    calibration={"prompts": 2, "steps": 4, "sampler": "euler", "scheduler": "simple", "cfg": 5.0,
                                 "resolution": [64, 64], "frames": 5, "seed": 0, "switch_step": 2})


@pytest.fixture(scope="module")
def models():
    return {e: make_tiny_wan("t2v", dim=128, ffn_dim=256, layers=2, text_dim=64, expert=e) for e in EXPERTS}


@pytest.fixture(scope="module")
def state(models):
    return _state(models)


@pytest.fixture
def saved(tmp_path, state):
    return save_state(tmp_path / "calib.safetensors", state)


def _rewrite(src, dst, tensors_fn=lambda t: t, meta_fn=lambda m: m, rechecksum=True):
    """Write a modified copy of a state file, by default with a fresh checksum so that
    the validation under test, not the checksum, is what must catch the change."""
    tensors = load_file(src)
    with safe_open(src, "pt") as f:
        meta = json.loads(f.metadata()[st.METADATA_KEY])
    tensors, meta = tensors_fn(dict(tensors)), meta_fn(meta)
    if rechecksum:
        meta["checksum"] = st.compute_checksum(tensors, meta)
    save_file(tensors, dst, metadata={st.METADATA_KEY: json.dumps(meta)})
    return dst


def _set(mapping, key, value):
    mapping[key] = value
    return mapping


def _bad_copy(saved, tmp_path, **kw):
    return _rewrite(saved, os.path.join(tmp_path, "bad.safetensors"), **kw)


MASK_KEY = "high_noise/blocks.0.self_attn.q/mask"


# --------------------------------------------------------------------------- round trip

def test_round_trip_preserves_every_tensor(saved, state):
    loaded = load_state(saved)
    for e, ex in state.experts.items():
        for ln, ls in ex.layers.items():
            for f in st.TENSOR_FIELDS + st.V2_FIELDS:
                got = getattr(loaded.experts[e].layers[ln], f)
                assert got.dtype == getattr(ls, f).dtype and torch.equal(got, getattr(ls, f)), f


def test_round_trip_preserves_metadata(saved, state):
    loaded = load_state(saved)
    for f in ("alpha", "percentile", "statistic", "rotation", "model_family", "model_variant", "calibration",
              "hif4_spec", "method", "tool_version", "extra"):
        assert getattr(loaded, f) == getattr(state, f), f
    assert loaded.experts["low_noise"].fingerprint == state.experts["low_noise"].fingerprint


def test_round_trip_preserves_expert_and_layer_order(saved, state):
    loaded = load_state(saved)
    assert loaded.expert_names == list(EXPERTS)
    assert list(loaded.experts["high_noise"].layers) == list(state.experts["high_noise"].layers)


def test_rotation_settings_round_trip(tmp_path, state):
    rotated = dataclasses.replace(state, rotation={"block": 64, "seed": 3})
    assert load_state(save_state(tmp_path / "r.safetensors", rotated)).rotation == {"block": 64, "seed": 3}


def test_tensor_keys_follow_expert_layer_field_scheme(saved):
    keys = set(load_file(saved))
    assert MASK_KEY in keys and "low_noise/blocks.1.ffn.2/wmax" in keys
    assert "low_noise/blocks.1.ffn.2/tails" in keys and "high_noise/blocks.0.ffn.0/errors" in keys
    assert len(keys) == 2 * 20 * 6


def test_metadata_is_one_json_key_with_format_name_and_version(saved):
    with safe_open(saved, "pt") as f:
        metadata = f.metadata()
    assert list(metadata) == [st.METADATA_KEY]
    meta = json.loads(metadata[st.METADATA_KEY])
    assert (meta["format"], meta["format_version"], meta["method"]) == (
        "hifloat4-ptq", 2, "tail-aware-smoothquant")
    assert meta["hif4_spec"] == st.HIF4_SPEC_ID and meta["checksum"].startswith("sha256:")


def test_saving_twice_gives_identical_bytes(tmp_path, state):
    a = save_state(tmp_path / "a.safetensors", state)
    b = save_state(tmp_path / "b.safetensors", state)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_state_nbytes_counts_seven_16_bit_values_per_channel_and_five_errors_per_layer(state):
    layers = [ls for ex in state.experts.values() for ls in ex.layers.values()]
    assert state_nbytes(state) == sum(ls.channels for ls in layers) * 7 * 2 + len(layers) * 5 * 4


def test_a14b_pair_state_is_under_an_eighth_of_a_percent_of_the_bf16_model():
    """Version 1 (masks + statistics, 8 bytes per channel) was 0.067%; version 2's tails
    add 6 bytes per channel and the errors 20 bytes per layer: 0.117% (64 MiB)."""
    with torch.device("meta"):
        model = WanModel(WanConfig(dim=5120, ffn_dim=13824, num_layers=40, num_heads=40))
    shapes = wan.linear_shapes(model)
    names = wan.main_linear_names(model)
    per_expert = sum(shapes[n][1] for n in names) * 7 * 2 + len(names) * 5 * 4
    assert per_expert == sum(st.layer_nbytes(shapes[n][1]) for n in names)
    model_bytes = 2 * sum(p.numel() for p in model.parameters())
    assert 2 * per_expert < 0.00125 * 2 * model_bytes


# --------------------------------------------------------------------------- saving

def test_save_is_atomic_and_leaves_no_temp_file(tmp_path, state):
    save_state(tmp_path / "s.safetensors", state)
    assert os.listdir(tmp_path) == ["s.safetensors"]


def test_failed_save_keeps_the_old_file_and_removes_the_temp_file(tmp_path, state, monkeypatch):
    path = save_state(tmp_path / "s.safetensors", state)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, dataclasses.replace(state, alpha=0.7))
    assert os.listdir(tmp_path) == ["s.safetensors"]
    assert open(path, "rb").read() == before


def test_save_refuses_a_non_safetensors_suffix(tmp_path, state):
    with pytest.raises(PTQStateError, match=".safetensors"):
        save_state(tmp_path / "s.pt", state)


def test_save_refuses_an_invalid_state(tmp_path, state):
    bad = dataclasses.replace(state, alpha=1.5)
    with pytest.raises(PTQStateError, match="alpha"):
        save_state(tmp_path / "s.safetensors", bad)
    assert os.listdir(tmp_path) == []


def test_save_refuses_tensors_of_the_wrong_storage_dtype(tmp_path, state):
    ex = state.experts["high_noise"]
    ln = next(iter(ex.layers))
    layers = dict(ex.layers, **{ln: dataclasses.replace(ex.layers[ln], mask=ex.layers[ln].mask.float())})
    bad = dataclasses.replace(state, experts=dict(state.experts, high_noise=ExpertState(layers, ex.fingerprint)))
    with pytest.raises(PTQStateError, match="dtype"):
        save_state(tmp_path / "s.safetensors", bad)


def test_save_refuses_metadata_that_is_not_json(tmp_path, state):
    with pytest.raises(PTQStateError, match="JSON"):
        save_state(tmp_path / "s.safetensors", dataclasses.replace(state, calibration={"cfg": float("nan")}))


# --------------------------------------------------------------------------- safe names

@pytest.mark.parametrize("name", [
    "../evil.safetensors", "..", "a/b.safetensors", "a\\b.safetensors", "/etc/x.safetensors",
    "C:x.safetensors", ".hidden.safetensors", "x.safetensors\0", "x.pt", ".safetensors", "", "x..safetensors",
])
def test_safe_state_path_rejects_path_tricks(tmp_path, name):
    with pytest.raises(PTQStateError):
        safe_state_path(tmp_path, name)


def test_safe_state_path_joins_a_bare_name(tmp_path):
    assert safe_state_path(tmp_path, "wan22_t2v.safetensors") == os.path.join(tmp_path, "wan22_t2v.safetensors")


# --------------------------------------------------------------------------- fuzz-ish loading

def test_missing_file_raises_state_error(tmp_path):
    with pytest.raises(PTQStateError, match="cannot read"):
        load_state(tmp_path / "nope.safetensors")


def test_truncated_file_raises_state_error(tmp_path, saved):
    data = open(saved, "rb").read()
    for cut in (3, 100, len(data) - 4):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(PTQStateError, match="safetensors"):
            load_state(path)


def test_random_bytes_raise_state_error(tmp_path):
    gen = torch.Generator().manual_seed(1)
    for i in range(20):
        path = tmp_path / f"r{i}.safetensors"
        path.write_bytes(bytes(torch.randint(0, 256, (int(torch.randint(0, 4000, (1,), generator=gen)),),
                                             generator=gen, dtype=torch.uint8).tolist()))
        with pytest.raises(PTQStateError):
            load_state(path)


def test_header_with_huge_length_raises_state_error(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    with pytest.raises(PTQStateError, match="header length"):
        load_state(path)


def test_header_that_is_not_json_raises_state_error(tmp_path):
    path = tmp_path / "nojson.safetensors"
    path.write_bytes((5).to_bytes(8, "little") + b"{oops")
    with pytest.raises(PTQStateError, match="unreadable header"):
        load_state(path)


def test_tensor_offsets_beyond_the_data_raise_state_error(tmp_path, saved):
    data = bytearray(open(saved, "rb").read())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6
    raw = json.dumps(header).encode()
    path = tmp_path / "offsets.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data[8 + n:]))
    with pytest.raises(PTQStateError):
        load_state(path)


def test_plain_safetensors_model_file_is_not_a_state(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(PTQStateError, match="not a HiFloat4 PTQ state"):
        load_state(path)


def test_tampered_tensor_fails_the_checksum(tmp_path, saved):
    data = bytearray(open(saved, "rb").read())
    data[-4] ^= 0x01  # lowest mantissa bit of the last fp32 value: still a valid statistic
    path = tmp_path / "flip.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(PTQStateError, match="checksum mismatch"):
        load_state(path)


def test_tampered_metadata_fails_the_checksum(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "alpha", 0.75), rechecksum=False)
    with pytest.raises(PTQStateError, match="checksum mismatch"):
        load_state(path)


def test_metadata_that_is_not_json_is_rejected(tmp_path, saved):
    path = str(tmp_path / "bad.safetensors")
    save_file(load_file(saved), path, metadata={st.METADATA_KEY: "{not json"})
    with pytest.raises(PTQStateError, match="bad metadata JSON"):
        load_state(path)


def test_nan_in_metadata_json_is_rejected(tmp_path, saved):
    path = str(tmp_path / "bad.safetensors")
    with safe_open(saved, "pt") as f:
        text = f.metadata()[st.METADATA_KEY]
    save_file(load_file(saved), path, metadata={st.METADATA_KEY: text.replace('"alpha":0.5', '"alpha":NaN')})
    with pytest.raises(PTQStateError, match="bad metadata JSON"):
        load_state(path)


def test_wrong_format_name_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "format", "other-ptq"))
    with pytest.raises(PTQStateError, match="wrong format name"):
        load_state(path)


def test_newer_format_version_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "format_version", 3))
    with pytest.raises(PTQStateError, match="unsupported format version 3"):
        load_state(path)


def test_missing_metadata_field_is_named(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: {k: v for k, v in m.items() if k != "percentile"})
    with pytest.raises(PTQStateError, match="missing: percentile"):
        load_state(path)


def test_unknown_metadata_field_is_named(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "colour", "blue"))
    with pytest.raises(PTQStateError, match="unknown metadata fields: colour"):
        load_state(path)


def test_wrong_metadata_type_is_named(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "calibration", "lots"))
    with pytest.raises(PTQStateError, match="'calibration' has type str"):
        load_state(path)


def test_unknown_statistic_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "statistic", "median"))
    with pytest.raises(PTQStateError, match="statistic"):
        load_state(path)


def test_malformed_rotation_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "rotation", {"block": 0, "seed": 1}))
    with pytest.raises(PTQStateError, match="rotation"):
        load_state(path)


def test_tampered_fingerprint_is_rejected(tmp_path, saved):
    def edit(m):
        m["experts"][0]["fingerprint"]["layers"]["blocks.0.ffn.0"] = [256, 64]
        return m
    with pytest.raises(PTQStateError, match="fingerprint shape_hash"):
        load_state(_bad_copy(saved, tmp_path, meta_fn=edit))


def test_extra_tensor_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: _set(t, "high_noise/blocks.0.ffn.0/extra", torch.ones(128).half()))
    with pytest.raises(PTQStateError, match="unexpected tensors: high_noise/blocks.0.ffn.0/extra"):
        load_state(path)


def test_missing_tensor_is_named(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: {k: v for k, v in t.items() if k != MASK_KEY})
    with pytest.raises(PTQStateError, match=f"missing tensors: {MASK_KEY}"):
        load_state(path)


def test_tensors_of_an_unnamed_expert_are_rejected(tmp_path, saved):
    def rename(t):
        return {k.replace("low_noise/", "middle/"): v for k, v in t.items()}
    with pytest.raises(PTQStateError, match="experts not named in metadata: middle"):
        load_state(_bad_copy(saved, tmp_path, tensors_fn=rename))


def test_metadata_expert_without_tensors_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: {k: v for k, v in t.items() if k.startswith("high")})
    with pytest.raises(PTQStateError, match="missing tensors: low_noise/"):
        load_state(path)


def test_tensor_of_the_wrong_storage_dtype_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: _set(t, MASK_KEY, t[MASK_KEY].float()))
    with pytest.raises(PTQStateError, match="dtype"):
        load_state(path)


def test_wrong_length_tensor_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: _set(t, MASK_KEY, t[MASK_KEY][:-1].clone()))
    with pytest.raises(PTQStateError, match=r"shape \(127,\), expected \(128,\)"):
        load_state(path)


def test_two_dimensional_tensor_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: _set(t, MASK_KEY, t[MASK_KEY].reshape(2, 64).clone()))
    with pytest.raises(PTQStateError, match="shape"):
        load_state(path)


def _element(key: str, index: tuple, value: float):
    def edit(t):
        x = t[key].clone()
        x[index] = value
        t[key] = x
        return t
    return edit


def _with_value(key, value):
    return _element(key, (5,), value)


def test_nan_mask_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=_with_value(MASK_KEY, float("nan")))
    with pytest.raises(PTQStateError, match="NaN/Inf"):
        load_state(path)


def test_infinite_statistic_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=_with_value("low_noise/blocks.1.ffn.2/absmax", float("inf")))
    with pytest.raises(PTQStateError, match="NaN/Inf"):
        load_state(path)


def test_zero_mask_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=_with_value(MASK_KEY, 0.0))
    with pytest.raises(PTQStateError, match="non-positive mask"):
        load_state(path)


def test_negative_statistic_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=_with_value("high_noise/blocks.0.ffn.0/wmax", -1.0))
    with pytest.raises(PTQStateError, match="negative statistics"):
        load_state(path)


def test_tail_above_absmax_is_rejected(tmp_path, saved):
    key = "high_noise/blocks.0.ffn.0/tail"
    path = _bad_copy(saved, tmp_path, tensors_fn=_with_value(key, 1e6))
    with pytest.raises(PTQStateError, match="tail statistic exceeds absmax"):
        load_state(path)


def test_layer_not_in_fingerprint_is_rejected(tmp_path, saved):
    def edit(m):
        m["experts"][0]["layers"][0] = "blocks.9.self_attn.q"
        return m

    def move(t):
        return {k.replace("high_noise/blocks.0.self_attn.q/", "high_noise/blocks.9.self_attn.q/"): v
                for k, v in t.items()}
    with pytest.raises(PTQStateError, match="not in its fingerprint: blocks.9.self_attn.q"):
        load_state(_bad_copy(saved, tmp_path, tensors_fn=move, meta_fn=edit))


def test_expert_name_with_a_slash_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m["experts"][0], "name", "a/b") and m)
    with pytest.raises(PTQStateError, match="bad expert name"):
        load_state(path)


TAILS_KEY, ERRORS_KEY = "high_noise/blocks.0.ffn.0/tails", "high_noise/blocks.0.ffn.0/errors"


def _with_tensor(key, value):
    return lambda t: _set(t, key, value)


def _tails_with(row: int, value: float):
    return _element(TAILS_KEY, (row, 5), value)


@pytest.mark.parametrize("edit, message", [
    (_with_tensor(TAILS_KEY, torch.ones(3, 128)), "dtype"),
    (_with_tensor(ERRORS_KEY, torch.ones(5, dtype=torch.float16)), "dtype"),
    (_with_tensor(TAILS_KEY, torch.ones(128, dtype=torch.bfloat16)), "shape"),
    (_with_tensor(TAILS_KEY, torch.ones(4, 128, dtype=torch.bfloat16)), "shape"),
    (_with_tensor(ERRORS_KEY, torch.ones(4)), "shape"),
    (_element(ERRORS_KEY, (2,), float("nan")), "NaN/Inf"),
    (_with_value(ERRORS_KEY[:-6] + "absmax", float("inf")), "NaN/Inf"),
    (_tails_with(2, float("inf")), "NaN/Inf"),
    (_element(ERRORS_KEY, (0,), -0.5), "negative errors"),
    (_tails_with(0, -1.0), "negative statistics"),
    (_tails_with(0, 1e6), "not ordered"),
    (_tails_with(1, 0.0), "not ordered"),
    (_tails_with(2, 1e6), "not ordered"),
], ids=["tails fp32", "errors fp16", "tails 1-D", "tails 4 rows", "errors 4", "errors NaN", "absmax inf",
        "tails inf", "errors negative", "tails negative", "p99 above p99.9", "p99.9 below p99", "p99.99 above absmax"])
def test_bad_tails_or_errors_are_rejected(tmp_path, saved, edit, message):
    with pytest.raises(PTQStateError, match=message):
        load_state(_bad_copy(saved, tmp_path, tensors_fn=edit))


def test_tampered_errors_fail_the_checksum(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=_element(ERRORS_KEY, (4,), 0.0), rechecksum=False)
    with pytest.raises(PTQStateError, match="checksum mismatch"):
        load_state(path)


def test_a_version_2_file_without_errors_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, tensors_fn=lambda t: {k: v for k, v in t.items() if k != ERRORS_KEY})
    with pytest.raises(PTQStateError, match="missing tensors: high_noise/blocks.0.ffn.0/errors"):
        load_state(path)


# --------------------------------------------------------------------------- format version 1

def _version_1_file(saved, tmp_path, keep=()):
    """The saved state rewritten in version 1's layout: no tails/errors tensors (except `keep`)."""
    return _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "format_version", 1),
                     tensors_fn=lambda t: {k: v for k, v in t.items()
                                           if k in keep or not k.endswith(("/tails", "/errors"))})


@pytest.fixture
def version_1(tmp_path, saved):
    return load_state(_version_1_file(saved, tmp_path))


def test_a_version_1_file_loads_with_no_tails_and_no_errors(version_1, state):
    ls, want = version_1.experts["low_noise"].layers["blocks.1.ffn.2"], state.experts["low_noise"].layers["blocks.1.ffn.2"]
    assert (ls.tails, ls.errors) == (None, None)
    assert all(torch.equal(getattr(ls, f), getattr(want, f)) for f in st.TENSOR_FIELDS)


def test_a_version_1_file_carrying_tails_is_rejected(tmp_path, saved):
    with pytest.raises(PTQStateError, match=r"unexpected tensors: high_noise/blocks.0.ffn.0/tails \(format version 1\)"):
        load_state(_version_1_file(saved, tmp_path, keep=(TAILS_KEY,)))


def test_a_version_1_state_saves_as_version_1_and_loads_again(tmp_path, version_1):
    path = save_state(tmp_path / "v1.safetensors", version_1)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()[st.METADATA_KEY])["format_version"] == 1
    assert load_state(path).experts["high_noise"].layers["blocks.0.ffn.0"].errors is None


def test_a_state_with_errors_on_some_layers_only_is_refused(tmp_path, state, version_1):
    mixed = dataclasses.replace(version_1, experts={**version_1.experts, "low_noise": state.experts["low_noise"]})
    with pytest.raises(PTQStateError, match="both tails and errors"):
        save_state(tmp_path / "mixed.safetensors", mixed)


def test_missing_features_name_what_a_version_1_state_lacks(version_1, state):
    assert st.missing_features(state) == []
    missing = st.missing_features(version_1)
    assert any("sensitivity" in m for m in missing) and any("adaptive" in m for m in missing)


def test_remask_adaptive_on_a_version_1_state_says_to_recalibrate(version_1):
    with pytest.raises(PTQStateError, match="lacks them: recalibrate with this version"):
        masks.remask(version_1, statistic="adaptive")


def test_adaptive_statistic_in_a_version_1_file_is_rejected(tmp_path, saved):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(_set(m, "format_version", 1), "statistic", "adaptive"),
                     tensors_fn=lambda t: {k: v for k, v in t.items() if not k.endswith(("/tails", "/errors"))})
    with pytest.raises(PTQStateError, match="statistic must be one of"):
        load_state(path)


def test_sensitivity_is_the_first_error_and_none_in_version_1(state, version_1):
    ls = state.experts["high_noise"].layers["blocks.0.ffn.0"]
    assert masks.sensitivity(ls) == float(ls.errors[0])
    assert masks.sensitivity(version_1.experts["high_noise"].layers["blocks.0.ffn.0"]) is None


# --------------------------------------------------------------------------- adaptive statistic

def _with_errors(ls: LayerState, errors) -> LayerState:
    return dataclasses.replace(ls, errors=torch.tensor(errors, dtype=torch.float32))


@pytest.mark.parametrize("errors, choice", [
    ([0.1, 0.30, 0.20, 0.25, 0.40], "p99.9"),
    ([0.1, 0.30, 0.20, 0.25, 0.10], "max"),
    ([0.1, 0.05, 0.20, 0.25, 0.40], "p99"),
    ([0.1, 0.20, 0.20, 0.10, 0.10], "p99.99"),  # a tie goes to the earlier candidate
])
def test_adaptive_choice_is_the_candidate_with_the_lowest_error(state, errors, choice):
    assert masks.adaptive_choice(_with_errors(state.experts["high_noise"].layers["blocks.0.ffn.0"], errors)) == choice


def test_adaptive_choice_of_a_version_1_layer_raises(version_1):
    with pytest.raises(PTQStateError, match="errors"):
        masks.adaptive_choice(version_1.experts["high_noise"].layers["blocks.0.ffn.0"])


def test_candidates_and_error_keys_are_in_the_documented_order():
    assert st.CANDIDATES == ("p99", "p99.9", "p99.99", "max")
    assert st.ERROR_KEYS == ("calibrated", "p99", "p99.9", "p99.99", "max")
    assert st.REMASK_STATISTICS == ("tail", "max", "none", "adaptive")


def test_remask_adaptive_gives_each_layer_the_mask_of_its_chosen_statistic(state):
    new, chosen = masks.remask(state, alpha=0.4, statistic="adaptive")
    smoothing = pytest.importorskip("hifloat4.smoothing")
    for e, ex in state.experts.items():
        for ln, ls in ex.layers.items():
            choice = masks.adaptive_choice(ls)
            assert chosen[e][ln] == choice
            act = ls.absmax if choice == "max" else ls.tails[st.CANDIDATES.index(choice)]
            want = smoothing.channel_mask(ls.wmax.float(), act.float(), smoothing.MaskConfig(alpha=0.4))
            assert torch.equal(new.experts[e].layers[ln].mask, want.half()), (e, ln)
    assert len({c for ex in chosen.values() for c in ex.values()}) > 1
    assert (new.statistic, new.alpha) == ("adaptive", 0.4)


def test_an_adaptive_state_saves_and_loads_and_remasks_again(tmp_path, state):
    new = load_state(save_state(tmp_path / "a.safetensors", masks.remask(state, statistic="adaptive").state))
    assert new.statistic == "adaptive"
    again = masks.remask(new, alpha=new.alpha, statistic=new.statistic).state
    assert all(torch.equal(again.experts[e].layers[ln].mask, ls.mask)
               for e, ex in new.experts.items() for ln, ls in ex.layers.items())


# --------------------------------------------------------------------------- model checks

def test_validate_against_model_accepts_the_calibrated_model(state, models):
    validate_against_model(state, "high_noise", wan.linear_shapes(models["high_noise"]))
    validate_against_model(state, "low_noise", models["low_noise"])


def test_validate_against_model_names_a_layer_with_other_width(state):
    other = make_tiny_wan("t2v", dim=128, ffn_dim=192, layers=2, text_dim=64)
    with pytest.raises(PTQStateError, match="'blocks.0.ffn.2'.*192 input channels, state has 256"):
        validate_against_model(state, "high_noise", other)


def test_validate_against_model_names_a_missing_layer(state):
    shorter = make_tiny_wan("t2v", dim=128, ffn_dim=256, layers=1, text_dim=64)
    with pytest.raises(PTQStateError, match="'blocks.1.self_attn.q'.*not a Linear of the model"):
        validate_against_model(state, "high_noise", shorter.state_dict())


def test_validate_against_model_rejects_an_unknown_expert(state, models):
    with pytest.raises(PTQStateError, match="no expert 'single'"):
        validate_against_model(state, "single", models["high_noise"])


# --------------------------------------------------------------------------- remask

def test_remask_recomputes_masks_from_stored_statistics(state):
    smoothing = pytest.importorskip("hifloat4.smoothing")
    new = masks.remask(state, alpha=0.3, statistic="max").state
    ls = new.experts["low_noise"].layers["blocks.1.ffn.2"]
    want = smoothing.channel_mask(ls.wmax.float(), ls.absmax.float(), smoothing.MaskConfig(alpha=0.3, statistic="max"))
    assert torch.equal(ls.mask, want.half())
    assert (new.alpha, new.statistic) == (0.3, "max")


def test_remask_with_statistic_none_gives_unit_masks(state):
    pytest.importorskip("hifloat4.smoothing")
    new = masks.remask(state, statistic="none").state
    assert all(torch.equal(ls.mask, torch.ones_like(ls.mask))
               for ex in new.experts.values() for ls in ex.layers.values())


def test_remask_keeps_statistics_and_leaves_the_original_untouched(state):
    pytest.importorskip("hifloat4.smoothing")
    before = state.experts["high_noise"].layers["blocks.0.self_attn.q"].mask.clone()
    new = masks.remask(state, alpha=0.9).state
    old_l, new_l = state.experts["high_noise"].layers["blocks.0.self_attn.q"], \
        new.experts["high_noise"].layers["blocks.0.self_attn.q"]
    assert torch.equal(old_l.mask, before) and not torch.equal(new_l.mask, before)
    assert torch.equal(new_l.tail, old_l.tail) and torch.equal(new_l.wmax, old_l.wmax)


def test_remasked_state_saves_and_loads(tmp_path, state):
    pytest.importorskip("hifloat4.smoothing")
    new = masks.remask(state, alpha=0.25).state
    assert load_state(save_state(tmp_path / "re.safetensors", new)).alpha == 0.25


def test_remask_names_the_statistic_of_every_layer(state):
    _, chosen = masks.remask(state, statistic="max")
    assert chosen == {e: {ln: "max" for ln in ex.layers} for e, ex in state.experts.items()}


def test_remask_with_neither_choice_keeps_the_stored_masks_and_names_their_statistic(state):
    same, chosen = masks.remask(state)
    assert same is state
    assert chosen == {e: {ln: "tail" for ln in ex.layers} for e, ex in state.experts.items()}


def test_remask_rejects_an_unknown_statistic(state):
    with pytest.raises(PTQStateError, match="statistic"):
        masks.remask(state, statistic="median")


# --------------------------------------------------------------------------- recorded weight patches (LoRAs)

DIGEST = "sha256:" + "ab" * 32
PATCHES = {"high_noise": [{"strength": 1.0, "keys": 40, "digest": DIGEST}], "low_noise": []}


@pytest.fixture
def with_patches(tmp_path, state):
    return save_state(tmp_path / "lora.safetensors", dataclasses.replace(state, patches=PATCHES))


def test_recorded_patches_round_trip(with_patches):
    assert load_state(with_patches).patches == PATCHES


def test_recorded_lora_file_names_round_trip(tmp_path, state):
    named = {"high_noise": [{"strength": 1.0, "keys": 40, "digest": DIGEST,
                             "names": ["loras/wan2.2 lightx2v (high) é.safetensors"]}], "low_noise": []}
    path = save_state(tmp_path / "named.safetensors", dataclasses.replace(state, patches=named))
    assert load_state(path).patches == named


def test_a_state_without_a_patch_record_loads_with_none(saved):
    with safe_open(saved, "pt") as f:
        assert "patches" not in json.loads(f.metadata()[st.METADATA_KEY])
    assert load_state(saved).patches is None


@pytest.mark.parametrize("patches, message", [
    ("lora", "'patches' has type str"),
    ({"high_noise": []}, "exactly the experts"),
    ({"high_noise": [], "low_noise": [], "extra": []}, "exactly the experts"),
    ({"high_noise": {}, "low_noise": []}, "must be a list"),
    ({"high_noise": [{"strength": 1.0, "digest": DIGEST}], "low_noise": []}, "exactly digest, keys, strength"),
    ({"high_noise": [{"strength": "1", "keys": 1, "digest": DIGEST}], "low_noise": []}, "finite number"),
    ({"high_noise": [{"strength": True, "keys": 1, "digest": DIGEST}], "low_noise": []}, "finite number"),
    ({"high_noise": [{"strength": 1.0, "keys": 0, "digest": DIGEST}], "low_noise": []}, "keys must be an int"),
    ({"high_noise": [{"strength": 1.0, "keys": 1.5, "digest": DIGEST}], "low_noise": []}, "keys must be an int"),
    ({"high_noise": [{"strength": 1.0, "keys": 1, "digest": "md5:00"}], "low_noise": []}, "64 hex digits"),
    ({"high_noise": [{"strength": 1.0, "keys": 1, "digest": DIGEST}] * 2, "low_noise": []}, "appears twice"),
    ({"high_noise": [{"strength": float(i), "keys": 1, "digest": DIGEST} for i in range(300)], "low_noise": []},
     "at most 256 groups"),
    ({"high_noise": [{"strength": 1.0, "keys": 1, "digest": DIGEST, "note": "x"}], "low_noise": []},
     "optionally names"),
    *[({"high_noise": [{"strength": 1.0, "keys": 1, "digest": DIGEST, "names": names}], "low_noise": []},
       "names must be a list") for names in (
        "lora.safetensors", [], [7], [""], ["a" * 513], ["a.safetensors"] * 33,
        ["lora\nrm -rf.safetensors"], ["\x1b[2Jlora.safetensors"], ["evil\u202efig.safetensors"],
        ["\ud800.safetensors"], ["line\u2028break.safetensors"])],
])
def test_hostile_patch_records_are_rejected(tmp_path, saved, patches, message):
    path = _bad_copy(saved, tmp_path, meta_fn=lambda m: _set(m, "patches", patches))
    with pytest.raises(PTQStateError, match=message):
        load_state(path)


def test_save_refuses_an_invalid_patch_record(tmp_path, state):
    with pytest.raises(PTQStateError, match="exactly the experts"):
        save_state(tmp_path / "x.safetensors", dataclasses.replace(state, patches={"single": []}))
