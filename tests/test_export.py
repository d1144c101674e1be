"""Packed HiF4 checkpoints: export (CLI and API), load, validation of untrusted files."""
from __future__ import annotations

import copy
import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hifloat4 import checkpoint as hckpt
from hifloat4 import export as hexp
from hifloat4 import quantize_, wan
from hifloat4 import state as hstate
from hifloat4.packed_linear import PackedHiF4Linear, pack_weight
from hifloat4.plan import W4A4Config, make_plan
from hifloat4.rotation import Rotation
from hifloat4.tools.tiny_wan import example_inputs, make_tiny_wan
from hifloat4.wan_model import WanModel

HIGH, LOW = "high_noise", "low_noise"
SIZE = {"dim": 128, "ffn_dim": 256, "layers": 2, "text_dim": 64}


@pytest.fixture(scope="module")
def models(tiny_calibrated):
    return tiny_calibrated(**SIZE)[0]


@pytest.fixture(scope="module")
def ptq_state(tiny_calibrated):
    return tiny_calibrated(**SIZE)[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, models, ptq_state):
    d = tmp_path_factory.mktemp("export")
    paths = {"state": d / "state.safetensors"}
    hstate.save_state(paths["state"], ptq_state)
    for name, m in models.items():
        paths[name] = d / f"{name}_bf16.safetensors"
        save_file({k: v.bfloat16() for k, v in m.state_dict().items()}, str(paths[name]))
    paths["packed"] = d / "high_hif4.safetensors"
    assert hexp.main(["--model", str(paths[HIGH]), "--state", str(paths["state"]), "--expert", HIGH,
                      "--out", str(paths["packed"])]) == 0
    return paths


def _install(path):
    """Into a float32 model (tensors cast from the file's bf16, as the fake-quant models)."""
    model = WanModel(make_tiny_wan("t2v", **SIZE).config)
    return hckpt.install_checkpoint_(model, hckpt.load_hif4_checkpoint(path)).eval()


def test_install_into_a_meta_model_keeps_the_files_dtypes_and_allocates_no_main_weights(files):
    with torch.device("meta"):
        model = WanModel(make_tiny_wan("t2v", **SIZE).config)
    hckpt.install_checkpoint_(model, hckpt.load_hif4_checkpoint(files["packed"]))
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert model.head.head.weight.dtype == torch.bfloat16 and model.blocks[0].ffn[0].bias.dtype == torch.bfloat16
    assert model.blocks[0].ffn[0].weight.dtype == torch.uint8


def _rewrite(src, dst, tensors=None, meta=None):
    """A copy of a packed checkpoint with tensors / metadata edited (tampering)."""
    with safe_open(str(src), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        m = json.loads(f.metadata()[hckpt.METADATA_KEY])
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, str(dst), metadata={hckpt.METADATA_KEY: json.dumps(m)})
    return dst


# --------------------------------------------------------------------------- round trip

@pytest.fixture(scope="module")
def kept_file(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "kept.safetensors"
    assert hexp.main(["--model", str(files[HIGH]), "--state", str(files["state"]), "--expert", HIGH,
                      "--keep-high-precision", "3", "--out", str(out)]) == 0
    return out


def test_kept_layers_are_stored_unquantized_and_listed_most_sensitive_first(kept_file, ptq_state, models):
    ck = hckpt.load_hif4_checkpoint(kept_file)
    plan = make_plan(W4A4Config(ptq_state, expert=HIGH, keep_high_precision=3), wan.fingerprint(models[HIGH]))
    assert ck.kept == list(plan.kept) and not set(ck.kept) & set(ck.layers)
    assert all(ck.tensors[n + ".weight"].dtype == torch.bfloat16 for n in ck.kept)


def test_a_file_with_kept_layers_runs_bit_identical_to_quantize_with_the_same_choice(kept_file, ptq_state, models):
    fake = quantize_(copy.deepcopy(models[HIGH]), W4A4Config(ptq_state, expert=HIGH, keep_high_precision=3))
    x, t, ctx = example_inputs(models[HIGH], text_len=8, seed=3)
    with torch.no_grad():
        assert torch.equal(_install(kept_file)(x, t, ctx), fake(x, t, ctx))


def test_the_export_report_says_what_the_kept_layers_cost(files, ptq_state, tmp_path):
    report = hexp.export_expert(hexp.SafetensorsSource(files[HIGH]),
                                W4A4Config(ptq_state, expert=HIGH, keep_high_precision=2), tmp_path / "k.safetensors")
    assert len(report.kept) == 2 and report.kept_bytes > report.kept_packed_bytes > 0
    assert all(n in report.summary() for n in report.kept) and "more than packed" in report.summary()


def test_exported_model_runs_bit_identical_to_fake_quant(files, models, ptq_state):
    fake = quantize_(copy.deepcopy(models[HIGH]), W4A4Config(ptq_state, expert=HIGH))
    packed = _install(files["packed"])
    x, t, ctx = example_inputs(models[HIGH], text_len=8, seed=3)
    with torch.no_grad():
        assert torch.equal(packed(x, t, ctx), fake(x, t, ctx))
    assert isinstance(packed.blocks[0].ffn[2], PackedHiF4Linear)
    assert isinstance(packed.head.head, torch.nn.Linear)  # boundary layers stay high precision


def test_file_layout_packed_main_weights_masks_and_unchanged_other_tensors(files, ptq_state):
    source = load_file(str(files[HIGH]))
    main = [f"blocks.{b}.{s}" for b in range(2) for s in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                                           "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                                           "cross_attn.o", "ffn.0", "ffn.2")]
    with safe_open(str(files["packed"]), "pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()[hckpt.METADATA_KEY])
        for k in keys - {n + ".weight" for n in main} - {n + ".hif4_mask" for n in main}:
            t = f.get_tensor(k)
            assert t.dtype == source[k].dtype and torch.equal(t, source[k]), k  # carried over unchanged
        layer = "blocks.1.ffn.2"
        mask = ptq_state.experts[HIGH].layers[layer].mask
        assert torch.equal(f.get_tensor(layer + ".hif4_mask"), mask.float())
        assert torch.equal(f.get_tensor(layer + ".weight"), pack_weight(source[layer + ".weight"], mask).data)
    assert keys == set(source) | {n + ".hif4_mask" for n in main}  # the codes take the weight's own key
    assert (meta["format"], meta["format_version"], meta["expert"]) == (hckpt.FORMAT_NAME, 2, HIGH)
    assert sorted(meta["layers"]) == sorted(main) and meta["weight_dtype"] == "bfloat16"
    assert list(hckpt.load_hif4_checkpoint(files["packed"]).layers) == main  # policy order
    assert meta["ptq"]["alpha"] == 0.5 and meta["ptq"]["checksum"].startswith("sha256:")
    assert meta["source"]["fingerprint"]["content_hash"] == ptq_state.experts[HIGH].fingerprint["content_hash"]
    assert hckpt.is_hif4_checkpoint(files["packed"]) and not hckpt.is_hif4_checkpoint(files[HIGH])
    assert os.stat(files["packed"]).st_mode & 0o777 == 0o644


def test_a_packed_layers_state_dict_is_what_the_file_holds(files):
    model = _install(files["packed"])
    with safe_open(str(files["packed"]), "pt") as f:
        for k, t in model.blocks[1].ffn[2].state_dict().items():
            assert torch.equal(t, f.get_tensor("blocks.1.ffn.2." + k).to(t.dtype)), k


def _as_version_1(src, dst):
    """The file as version 1 wrote it: codes under "<layer>.weight.hif4"."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()[hckpt.METADATA_KEY])
        t = {(k + ".hif4" if k[: -len(".weight")] in meta["layers"] and k.endswith(".weight") else k): f.get_tensor(k)
             for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    meta["format_version"] = 1
    del meta["kept"]  # version 2's list of main layers kept unquantized
    save_file(t, str(dst), metadata={hckpt.METADATA_KEY: json.dumps(meta)})
    return dst


def test_version_1_files_load_as_the_same_checkpoint(files, tmp_path):
    v1 = _as_version_1(files["packed"], tmp_path / "v1.safetensors")
    old, new = hckpt.load_hif4_checkpoint(v1), hckpt.load_hif4_checkpoint(files["packed"])
    assert old.meta["format_version"] == 1 and list(old.layers) == list(new.layers)
    assert all(torch.equal(old.layers[n].weight.data, new.layers[n].weight.data)
               and torch.equal(old.layers[n].hif4_mask, new.layers[n].hif4_mask) for n in new.layers)
    assert old.tensors.keys() == new.tensors.keys()
    assert hckpt.read_hif4_header(v1)["format_version"] == 1


def test_a_version_1_file_with_both_codes_and_an_unpacked_weight_is_refused(files, tmp_path):
    v1 = _as_version_1(files["packed"], tmp_path / "v1.safetensors")
    bad = _rewrite(v1, tmp_path / "bad.safetensors", _set("blocks.0.ffn.0.weight", torch.zeros(256, 128)))
    with pytest.raises(hckpt.HiF4CheckpointError, match="also carry an unpacked weight"):
        hckpt.load_hif4_checkpoint(bad)


def test_a_version_2_file_with_version_1_code_names_is_refused(files, tmp_path):
    bad = _rewrite(_as_version_1(files["packed"], tmp_path / "v1.safetensors"), tmp_path / "bad.safetensors",
                   meta=lambda m: m.update(format_version=2, kept=[]))
    with pytest.raises(hckpt.HiF4CheckpointError, match="missing tensors"):
        hckpt.load_hif4_checkpoint(bad)


def test_main_layers_shrink_to_28_percent_of_bf16(files):
    ck = hckpt.load_hif4_checkpoint(files["packed"])
    packed = sum(layer.weight.nbytes for layer in ck.layers.values())
    bf16 = sum(2 * layer.shape[0] * layer.shape[1] for layer in ck.layers.values())
    assert packed / bf16 == pytest.approx(0.28125)
    assert os.path.getsize(files["packed"]) < os.path.getsize(files[HIGH])


def test_auto_expert_picks_the_matching_one_and_prefixed_sources_work(files, tmp_path, models, ptq_state):
    prefixed = tmp_path / "full_checkpoint.safetensors"
    sd = {"model.diffusion_model." + k: v for k, v in load_file(str(files[LOW])).items()}
    sd["first_stage_model.decoder.weight"] = torch.zeros(3)  # not the transformer: ignored
    save_file(sd, str(prefixed))
    out = tmp_path / "low.safetensors"
    assert hexp.main(["--model", str(prefixed), "--state", str(files["state"]), "--out", str(out)]) == 0
    ck = hckpt.load_hif4_checkpoint(out)
    assert ck.expert == LOW and "first_stage_model.decoder.weight" not in ck.tensors
    fake = quantize_(copy.deepcopy(models[LOW]), W4A4Config(ptq_state, expert=LOW))
    x, t, ctx = example_inputs(models[LOW], text_len=8)
    with torch.no_grad():
        assert torch.equal(_install(out)(x, t, ctx), fake(x, t, ctx))


def test_rotation_of_the_state_is_packed_and_recorded(files, tmp_path, models, ptq_state):
    rotated = copy.deepcopy(ptq_state)
    rotated.rotation = {"block": 512, "seed": 7}
    state_path = hstate.save_state(tmp_path / "rot.safetensors", rotated)
    out = tmp_path / "rot_hif4.safetensors"
    assert hexp.main(["--model", str(files[HIGH]), "--state", state_path, "--out", str(out)]) == 0
    ck = hckpt.load_hif4_checkpoint(out)
    assert ck.layers["blocks.0.ffn.2"].rotation == Rotation(block=256, seed=7)  # largest power of 2 dividing 256
    assert ck.layers["blocks.0.ffn.0"].rotation == Rotation(block=128, seed=7)
    fake = quantize_(copy.deepcopy(models[HIGH]), W4A4Config(rotated, expert=HIGH))
    x, t, ctx = example_inputs(models[HIGH], text_len=8)
    with torch.no_grad():
        assert torch.equal(_install(out)(x, t, ctx), fake(x, t, ctx))


def test_fp8_scaled_sources_are_dequantized_before_packing(files, tmp_path, ptq_state):
    src = load_file(str(files[HIGH]))
    fp8 = {}
    for k, v in src.items():
        if k.endswith(".weight") and v.dim() == 2:
            scale = v.float().abs().max() / 448.0
            fp8[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            fp8[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            fp8[k] = v
    fp8["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path, out = tmp_path / "fp8.safetensors", tmp_path / "fp8_hif4.safetensors"
    save_file(fp8, str(path))
    assert hexp.main(["--model", str(path), "--state", str(files["state"]), "--expert", HIGH, "--out", str(out)]) == 0
    ck = hckpt.load_hif4_checkpoint(out)
    assert not any("scale" in k for k in ck.tensors)
    assert ck.tensors["head.head.weight"].dtype == torch.bfloat16  # other fp8 weights: dequantized
    real = fp8["blocks.0.ffn.0.weight"].float() * fp8["blocks.0.ffn.0.scale_weight"]
    mask = ptq_state.experts[HIGH].layers["blocks.0.ffn.0"].mask
    assert torch.equal(ck.layers["blocks.0.ffn.0"].weight.data, pack_weight(real, mask).data)


# --------------------------------------------------------------------------- CLI refusals

def test_cli_refuses_a_model_the_state_does_not_describe(files, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_file({k: v.bfloat16() for k, v in make_tiny_wan("t2v", seed=9, **SIZE).state_dict().items()}, str(other))
    out = str(tmp_path / "o.safetensors")
    assert hexp.main(["--model", str(other), "--state", str(files["state"]), "--out", out]) == 1
    assert "with other weights" in capsys.readouterr().err
    assert hexp.main(["--model", str(other), "--state", str(files["state"]), "--expert", HIGH, "--out", out]) == 0
    assert "weights differ" in capsys.readouterr().err  # explicit expert: warned, as Apply does


def test_cli_refuses_another_model_type_even_with_a_named_expert(files, tmp_path, capsys):
    i2v = tmp_path / "i2v.safetensors"
    save_file({k: v.bfloat16() for k, v in make_tiny_wan("i2v", **SIZE).state_dict().items()}, str(i2v))
    out = str(tmp_path / "o.safetensors")
    assert hexp.main(["--model", str(i2v), "--state", str(files["state"]), "--expert", HIGH, "--out", out]) == 1
    err = capsys.readouterr().err
    assert "made for a custom Wan2.2 T2V model" in err and "this model is a custom Wan2.2 I2V model" in err
    assert not os.path.exists(out)


def test_cli_refuses_unknown_experts_and_incomplete_states(files, tmp_path, capsys, ptq_state):
    out = str(tmp_path / "o.safetensors")
    state = str(files["state"])
    assert hexp.main(["--model", str(files[HIGH]), "--state", state, "--expert", "single", "--out", out]) == 1
    assert "no single expert" in capsys.readouterr().err
    partial = copy.deepcopy(ptq_state)
    del partial.experts[HIGH].layers["blocks.1.ffn.2"]
    path = hstate.save_state(tmp_path / "partial.safetensors", partial)
    assert hexp.main(["--model", str(files[HIGH]), "--state", path, "--expert", HIGH, "--out", out]) == 1
    assert "blocks.1.ffn.2" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_cli_refuses_to_overwrite_its_source_or_write_other_suffixes(files, tmp_path, capsys):
    link = tmp_path / "link.safetensors"
    link.symlink_to(files[HIGH])
    before = files[HIGH].read_bytes()
    assert hexp.main(["--model", str(files[HIGH]), "--state", str(files["state"]), "--out", str(link)]) == 1
    assert "--out is the --model file" in capsys.readouterr().err
    assert files[HIGH].read_bytes() == before
    x_pt = str(tmp_path / "x.pt")
    assert hexp.main(["--model", str(files[HIGH]), "--state", str(files["state"]), "--out", x_pt]) == 1
    assert "must end in .safetensors" in capsys.readouterr().err


def test_cli_refuses_a_packed_checkpoint_as_source(files, tmp_path, capsys):
    assert hexp.main(["--model", str(files["packed"]), "--state", str(files["state"]),
                      "--out", str(tmp_path / "again.safetensors")]) == 1
    assert "already a packed HiF4 checkpoint" in capsys.readouterr().err


def test_a_failed_export_leaves_neither_output_nor_temp_file(files, tmp_path):
    class Broken(hexp.SafetensorsSource):
        def real_weight(self, layer):
            if layer == "blocks.1.ffn.0":
                raise RuntimeError("disk gone")
            return super().real_weight(layer)

    state = hstate.load_state(files["state"])
    with pytest.raises(RuntimeError, match="disk gone"):
        hexp.export_expert(Broken(files[HIGH]), W4A4Config(state, expert=HIGH), tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- validation of untrusted files

def _bad(files, tmp_path, tensors=None, meta=None):
    return _rewrite(files["packed"], tmp_path / "bad.safetensors", tensors, meta)


def _drop(key):
    return lambda t: t.pop(key)


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


CASES = {
    "wrong marker": (None, _set("format", "some-other-format"), "wrong format marker"),
    "future version": (None, _set("format_version", 3), "unsupported HiF4 checkpoint version"),
    "bool version": (None, _set("format_version", True), "unsupported HiF4 checkpoint version"),
    "unknown field": (None, _set("extra_field", 1), "unknown metadata fields"),
    "missing field": (None, lambda m: m.pop("layers"), "metadata fields missing"),
    "wrong group layout": (None, _set("bytes_per_group", 32), "group layout"),
    "bad weight dtype": (None, _set("weight_dtype", "float8"), "weight_dtype"),
    "tampered layer shape": (None, lambda m: m["layers"]["blocks.0.ffn.0"].update(shape=[512, 128]),
                             r"expected U8 \[512, 2, 36\]"),
    "bad layer name": (None, lambda m: m["layers"].update({"../../etc": m["layers"]["blocks.0.ffn.0"]}),
                       "not a Wan main layer name"),
    "bad rotation": (None, lambda m: m["layers"]["blocks.0.ffn.0"].update(rotation={"block": 3, "seed": 0}),
                     "power of two"),
    "model dims lie": (None, lambda m: m["model"].update(dim=5120), "metadata says dim"),
    "missing mask": (_drop("blocks.0.ffn.0.hif4_mask"), None, "missing tensors"),
    "missing packed weight": (_drop("blocks.1.self_attn.q.weight"), None, "missing tensors"),
    "missing other tensor": (_drop("head.head.weight"), None, "not a complete Wan model"),
    "missing block layer": (_drop("blocks.1.norm3.weight"), None, "missing blocks.1.norm3.weight"),
    "extra tensor": (_set("evil.weight", torch.zeros(1000)), None, "unexpected evil.weight"),
    "extra block tensor": (_set("blocks.0.evil", torch.zeros(3)), None, "unexpected blocks.0.evil"),
    "wrong norm shape": (_set("blocks.0.norm3.weight", torch.zeros(64)), None,
                         r"blocks.0.norm3.weight' has shape \[64\]"),
    "stray packed tensor": (_set("blocks.9.ffn.0.weight", torch.zeros(1, 1, 36, dtype=torch.uint8)),
                            None, "not in the metadata"),
    "stray mask": (_set("blocks.9.ffn.0.hif4_mask", torch.ones(128)), None, "not in the metadata"),
    "packed boundary layer": (_set("head.head.weight", torch.zeros(64, 2, 36, dtype=torch.uint8)), None,
                              "not in the metadata"),
    "unpacked weight": (_set("blocks.0.ffn.0.weight", torch.zeros(256, 128)), None, r"expected U8 \[256, 2, 36\]"),
    "version 1 codes name": (_set("blocks.0.ffn.0.weight.hif4", torch.zeros(256, 2, 36, dtype=torch.uint8)), None,
                             "only floating-point"),
    "tampered packed shape": (lambda t: t.update({"blocks.0.ffn.2.weight": t["blocks.0.ffn.2.weight"][:-1]}), None,
                              r"expected U8 \[128, 4, 36\]"),
    "packed dtype": (lambda t: t.update({"blocks.0.ffn.2.weight": t["blocks.0.ffn.2.weight"].to(torch.int16)}),
                     None, "expected U8"),
    "mask dtype": (lambda t: t.update({"blocks.0.ffn.2.hif4_mask": t["blocks.0.ffn.2.hif4_mask"].half()}), None,
                   "expected F32"),
    "bias shape": (lambda t: t.update({"blocks.0.ffn.2.bias": torch.zeros(7)}), None, "blocks.0.ffn.2.bias"),
    "kept layer also packed": (None, _set("kept", ["blocks.0.ffn.0"]), "not packed"),
    "kept layer not a main layer": (None, _set("kept", ["head.head"]), "not a Wan main layer name"),
    "kept list not a list": (None, _set("kept", "blocks.0.ffn.0"), "metadata field 'kept'"),
    "integer tensor": (_set("head.modulation", torch.zeros(1, 2, 128, dtype=torch.int32)), None,
                       "only floating-point"),
    "zero mask": (lambda t: t["blocks.0.ffn.0.hif4_mask"].__setitem__(0, 0.0), None, "non-positive"),
    "nan mask": (lambda t: t["blocks.0.ffn.0.hif4_mask"].__setitem__(0, float("nan")), None,
                 "non-finite"),
    "nan scale byte": (lambda t: t["blocks.0.ffn.0.weight"].__setitem__((0, 0, 32), 255), None,
                       "NaN scale"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_rejects_tampered_checkpoints(files, tmp_path, case):
    tensors, meta, message = CASES[case]
    path = _bad(files, tmp_path, tensors, meta)
    with pytest.raises(hckpt.HiF4CheckpointError, match=message):
        hckpt.load_hif4_checkpoint(path)


def test_load_rejects_files_without_the_marker_or_with_bad_json(files, tmp_path):
    with pytest.raises(hckpt.HiF4CheckpointError, match="format marker\\) is missing"):
        hckpt.load_hif4_checkpoint(files[HIGH])
    with safe_open(str(files["packed"]), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    for raw, msg in (("{not json", "bad HiF4 metadata JSON"), ('{"format": NaN}', "bad HiF4 metadata JSON"),
                     ("[1, 2]", "not a JSON object")):
        save_file(t, str(tmp_path / "j.safetensors"), metadata={hckpt.METADATA_KEY: raw})
        with pytest.raises(hckpt.HiF4CheckpointError, match=msg):
            hckpt.load_hif4_checkpoint(tmp_path / "j.safetensors")


def test_load_rejects_non_safetensors_files_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"x": Evil()}))
    torch_file = tmp_path / "torch.safetensors"
    torch.save({"a": torch.zeros(3)}, torch_file)
    for path in (pkl, torch_file):
        with pytest.raises(hckpt.HiF4CheckpointError, match="not a safetensors file"):
            hckpt.load_hif4_checkpoint(path)
    assert not marker.exists()
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(hckpt.HiF4CheckpointError, match="only 2 bytes"):
        hckpt.load_hif4_checkpoint(tmp_path / "short.safetensors")
    with pytest.raises(hckpt.HiF4CheckpointError, match="cannot read"):
        hckpt.load_hif4_checkpoint(tmp_path)  # a directory
    with pytest.raises(hckpt.HiF4CheckpointError, match="cannot read"):
        hckpt.load_hif4_checkpoint(tmp_path / "missing.safetensors")
    assert not hckpt.is_hif4_checkpoint(pkl) and not hckpt.is_hif4_checkpoint(tmp_path)


def test_load_rejects_truncated_data(files, tmp_path):
    data = files["packed"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    with pytest.raises(hckpt.HiF4CheckpointError, match="not a (readable )?safetensors file"):
        hckpt.load_hif4_checkpoint(cut)


def test_install_refuses_a_model_of_other_shapes(files):
    with torch.device("meta"):
        model = WanModel(make_tiny_wan("t2v", dim=128, ffn_dim=384, layers=2, text_dim=64).config)
    with pytest.raises(hckpt.HiF4CheckpointError, match="no Linear of the packed shape"):
        hckpt.install_checkpoint_(model, hckpt.load_hif4_checkpoint(files["packed"]))


# --------------------------------------------------------------------------- progress and cancel

def test_export_reports_progress_from_zero_to_the_total(files, tmp_path):
    seen = []
    hexp.export_expert(hexp.SafetensorsSource(files[HIGH]), W4A4Config(hstate.load_state(files["state"]), expert=HIGH),
                       tmp_path / "p.safetensors", progress=lambda done, total: seen.append((done, total)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    assert all(a[0] <= b[0] and a[1] == b[1] for a, b in zip(seen, seen[1:]))


def test_a_cancelled_export_leaves_neither_output_nor_temp_file(files, tmp_path):
    class Cancelled(Exception):
        pass

    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 10:
            raise Cancelled

    with pytest.raises(Cancelled):
        hexp.export_expert(hexp.SafetensorsSource(files[HIGH]), W4A4Config(hstate.load_state(files["state"]), expert=HIGH),
                           tmp_path / "c.safetensors", cancel=cancel)
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_a_cli_export_exits_130_and_writes_nothing(files, tmp_path, capsys, monkeypatch):
    def printer():
        def show(done, total):
            if done > 0:
                raise KeyboardInterrupt
        return show

    monkeypatch.setattr(hexp, "_progress_printer", printer)
    out = tmp_path / "k.safetensors"
    assert hexp.main(["--model", str(files[HIGH]), "--state", str(files["state"]), "--out", str(out)]) == 130
    assert "cancelled" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_the_cli_prints_progress_with_a_percentage(files, tmp_path, capsys):
    assert hexp.main(["--model", str(files[HIGH]), "--state", str(files["state"]),
                      "--out", str(tmp_path / "o.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "Ctrl-C cancels" in err and "100.0%" in err


def test_packing_in_memory_gives_the_checkpoint_the_file_holds(files, ptq_state):
    source = hexp.SafetensorsSource(files[HIGH])
    ckpt = hexp.pack_in_memory(source, W4A4Config(ptq_state, expert=HIGH))
    on_disk = hckpt.load_hif4_checkpoint(files["packed"])
    assert list(ckpt.layers) == list(on_disk.layers) and ckpt.meta["layers"] == on_disk.meta["layers"]
    for n, layer in ckpt.layers.items():
        assert torch.equal(layer.weight.data, on_disk.layers[n].weight.data)
        assert torch.equal(layer.hif4_mask, on_disk.layers[n].hif4_mask)
    assert set(ckpt.tensors) == set(on_disk.tensors)
    assert all(torch.equal(t, on_disk.tensors[k]) for k, t in ckpt.tensors.items())


def test_packing_in_memory_reports_progress_and_stops_on_cancel(files, ptq_state):
    seen = []

    def cancel():
        if len(seen) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hexp.pack_in_memory(hexp.SafetensorsSource(files[HIGH]), W4A4Config(ptq_state, expert=HIGH),
                            progress=lambda done, total: seen.append((done, total)), cancel=cancel)
    assert seen[0][0] == 0 and all(t == seen[0][1] for _, t in seen)
