"""Hostile files: every reader (PTQ state, packed checkpoint, export source, inspect,
export CLI, the marker check and folder listing) refuses them with the project's own
error (a HiF4FileError), in bounded time and memory; saves stay inside their folder.
The cases of a fuzz run of hostile files, plus hypothesis for the fuzzable ones."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import stat
import time
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hifloat4 import checkpoint as hckpt
from hifloat4 import export as hexp
from hifloat4 import safefile
from hifloat4 import state as hstate
from hifloat4.plan import W4A4Config
from hifloat4.safefile import HiF4FileError
from hifloat4.tools import inspect_state

SIZE = {"dim": 128, "ffn_dim": 256, "layers": 2, "text_dim": 64}
HIGH = "high_noise"
SECONDS = 5  # "bounded time": every refusal below must come well within this
FUZZ = settings(max_examples=40, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


@contextlib.contextmanager
def deadline(seconds: float = SECONDS):
    """Fail (instead of hanging the suite) if the block runs longer than `seconds`."""
    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_calibrated):
    d = tmp_path_factory.mktemp("hostile")
    models, state = tiny_calibrated((HIGH,), **SIZE)
    model = models[HIGH]
    paths = {"state": d / "state.safetensors", "model": d / "model.safetensors", "packed": d / "packed.safetensors"}
    hstate.save_state(paths["state"], state)
    save_file({k: v.bfloat16() for k, v in model.state_dict().items()}, str(paths["model"]))
    hexp.export_expert(hexp.SafetensorsSource(paths["model"]), W4A4Config(state, expert=HIGH), paths["packed"])
    return paths


def _raw(path, header: bytes, data: bytes = b"") -> str:
    """A file with this exact safetensors framing: length, header bytes, data."""
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)
    return str(path)


def _readers(files, tmp_path):
    """Every way the project reads a file the user points it at, as (name, call)."""
    out = str(tmp_path / "out.safetensors")
    return {
        "state": hstate.load_state,
        "packed": hckpt.load_hif4_checkpoint,
        "packed header": hckpt.read_hif4_header,
        "export source": hexp.SafetensorsSource,
        "inspect": lambda p: inspect_state.main([p]),
        "export --model": lambda p: hexp.main(["--model", p, "--state", str(files["state"]), "--out", out]),
        "export --state": lambda p: hexp.main(["--model", str(files["model"]), "--state", p, "--out", out]),
    }


def assert_refused_everywhere(files, tmp_path, path, capsys=None):
    """Each reader refuses `path` with a HiF4FileError (CLIs: exit code), within SECONDS."""
    for name, read in _readers(files, tmp_path).items():
        with deadline():
            if name == "inspect":
                assert read(str(path)) == 2, name
            elif name.startswith("export --"):
                assert read(str(path)) == 1, name
            else:
                with pytest.raises(HiF4FileError):
                    read(str(path))
    with deadline():
        assert not hckpt.is_hif4_checkpoint(path)
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- the cases

def test_a_header_nested_100k_levels_deep_is_refused_by_every_reader(files, tmp_path):
    path = _raw(tmp_path / "deep.safetensors", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert_refused_everywhere(files, tmp_path, path)


@pytest.mark.parametrize("key", [hstate.METADATA_KEY, hckpt.METADATA_KEY])
def test_metadata_json_nested_100k_levels_deep_is_refused(files, tmp_path, key):
    path = str(tmp_path / "deep_meta.safetensors")
    save_file({"x": torch.zeros(1, dtype=torch.float16)}, path, metadata={key: "[" * 100_000 + "]" * 100_000})
    with deadline():
        with pytest.raises(HiF4FileError, match="nested 100000 levels deep"):
            (hstate.load_state if key == hstate.METADATA_KEY else hckpt.load_hif4_checkpoint)(path)


def test_a_fifo_is_refused_by_every_reader_without_blocking(files, tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    assert_refused_everywhere(files, tmp_path, path)
    with deadline(), pytest.raises(HiF4FileError, match="not a regular file"):
        safefile.file_sha256(path, HiF4FileError)


def _renamed_block(src, dst, block: int):
    """A packed checkpoint whose block 1 is renamed to `block` (tensors and metadata)."""
    with safe_open(str(src), "pt") as f:
        tensors = {k.replace("blocks.1.", f"blocks.{block}."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()[hckpt.METADATA_KEY])
    meta["layers"] = {k.replace("blocks.1.", f"blocks.{block}."): v for k, v in meta["layers"].items()}
    save_file(tensors, str(dst), metadata={hckpt.METADATA_KEY: json.dumps(meta)})
    return str(dst)


def _bounded(call, exc=HiF4FileError, match=None, megabytes=64):
    """`call` raises `exc` within SECONDS while Python allocates under `megabytes`."""
    tracemalloc.start()
    try:
        with deadline(), pytest.raises(exc, match=match):
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < megabytes * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_a_block_index_of_10_to_the_12_is_refused_without_a_huge_allocation(files, tmp_path):
    path = _renamed_block(files["packed"], tmp_path / "far.safetensors", 10**12)
    _bounded(lambda: hckpt.load_hif4_checkpoint(path), match="block index")


def test_a_source_model_with_block_index_10_to_the_12_is_refused_by_export(files, tmp_path):
    tensors = {k.replace("blocks.1.", "blocks.1000000000000."): v for k, v in load_file(files["model"]).items()}
    path = str(tmp_path / "far_model.safetensors")
    save_file(tensors, path)
    state = hstate.load_state(files["state"])
    _bounded(lambda: hexp.export_expert(hexp.SafetensorsSource(path), W4A4Config(state), tmp_path / "o.safetensors"),
             match="incomplete Wan blocks")
    assert hexp.main(["--model", path, "--state", str(files["state"]), "--out", str(tmp_path / "o.safetensors")]) == 1
    assert not (tmp_path / "o.safetensors").exists()


def _state_with(files, tmp_path, edit, rechecksum=True) -> str:
    """A copy of the good state with its metadata edited (and the checksum redone, so
    only the edit is wrong). `edit(meta)` may return raw JSON text to store instead."""
    with safe_open(str(files["state"]), "pt") as f:
        meta = json.loads(f.metadata()[hstate.METADATA_KEY])
    tensors = load_file(files["state"])
    text = edit(meta)
    if text is None:
        if rechecksum:
            meta["checksum"] = hstate.compute_checksum(tensors, meta)
        text = json.dumps(meta)
    path = str(tmp_path / "edited.safetensors")
    save_file(tensors, path, metadata={hstate.METADATA_KEY: text})
    return path


BIG = "1" * 400  # a 400-digit integer


@pytest.mark.parametrize("field", ["alpha", "percentile", "probe"])
def test_a_400_digit_integer_is_refused_by_load_inspect_and_export(files, tmp_path, field):
    def edit(meta):
        text = json.dumps(meta)
        if field == "probe":
            probe = meta["experts"][0]["fingerprint"]["probe"]
            return text.replace(json.dumps(probe), json.dumps(probe).replace(repr(probe[0]), BIG, 1), 1)
        return text.replace(f'"{field}": {json.dumps(meta[field])}', f'"{field}": {BIG}')
    path = _state_with(files, tmp_path, edit)
    with safe_open(path, "pt") as f:
        assert BIG in f.metadata()[hstate.METADATA_KEY]
    with deadline():
        with pytest.raises(hstate.PTQStateError, match="outside int64"):
            hstate.load_state(path)
        assert inspect_state.main([path]) == 2
        assert hexp.main(["--model", str(files["model"]), "--state", path,
                          "--out", str(tmp_path / "o.safetensors")]) == 1


def test_a_400_digit_integer_in_a_header_shape_is_refused(files, tmp_path):
    header = b'{"x":{"dtype":"F32","shape":[' + BIG.encode() + b'],"data_offsets":[0,4]}}'
    assert_refused_everywhere(files, tmp_path, _raw(tmp_path / "big.safetensors", header, b"\0" * 4))


@pytest.mark.parametrize("rotation, message", [
    ({"block": 3, "seed": 0}, "power of two"),
    ({"block": 512, "seed": -1}, "seed"),
    ({"block": 512, "seed": 2**64}, "outside int64"),
    ({"block": 512, "seed": 2**63}, "outside int64"),
    ({"block": 2**20, "seed": 0}, "larger than"),
    ({"block": 512}, "rotation"),
])
def test_bad_rotation_parameters_are_refused_at_load_and_by_inspect(files, tmp_path, rotation, message):
    path = _state_with(files, tmp_path, lambda m: m.update(rotation=rotation))
    with pytest.raises(hstate.PTQStateError, match=message):
        hstate.load_state(path)
    assert inspect_state.main([path]) == 2


@pytest.mark.parametrize("seed", [-1, 2**63 - 1 + 1, True])
def test_bad_rotation_seeds_in_a_packed_checkpoint_are_refused(files, tmp_path, seed):
    with safe_open(str(files["packed"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()[hckpt.METADATA_KEY])
    meta["layers"]["blocks.0.ffn.0"]["rotation"] = {"block": 64, "seed": seed}
    path = str(tmp_path / "seed.safetensors")
    save_file(tensors, path, metadata={hckpt.METADATA_KEY: json.dumps(meta)})
    with pytest.raises(hckpt.HiF4CheckpointError, match="seed|int64"):
        hckpt.load_hif4_checkpoint(path)


def test_an_extra_tensor_in_a_packed_checkpoint_is_refused_before_any_tensor_is_read(files, tmp_path):
    with safe_open(str(files["packed"]), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = f.metadata()
    tensors["evil.weight"] = torch.zeros(16 * 2**20 // 4)  # 16 MiB of junk
    path = str(tmp_path / "evil.safetensors")
    save_file(tensors, path, metadata=metadata)
    read = []
    real = hckpt.safe_open
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hckpt, "safe_open", lambda *a, **k: read.append(a) or real(*a, **k))
        with pytest.raises(hckpt.HiF4CheckpointError, match="unexpected evil.weight"):
            hckpt.load_hif4_checkpoint(path)
    assert read == []


@pytest.mark.parametrize("which", ["state", "packed"])
def test_extra_safetensors_metadata_keys_are_refused(files, tmp_path, which):
    src = files[which]
    with safe_open(str(src), "pt") as f:
        metadata = dict(f.metadata(), note="not covered by any checksum")
    path = str(tmp_path / "extra_meta.safetensors")
    save_file(load_file(src), path, metadata=metadata)
    with pytest.raises(HiF4FileError, match="unknown safetensors metadata keys: note"):
        (hstate.load_state if which == "state" else hckpt.load_hif4_checkpoint)(path)


def test_duplicate_json_keys_are_refused(files, tmp_path):
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert_refused_everywhere(files, tmp_path, _raw(tmp_path / "dup.safetensors", header, b"\0" * 4))


@pytest.mark.parametrize("entry", [
    b'{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4]}',  # shape larger than its data
    b'{"dtype":"F32","shape":[1],"data_offsets":[0,400000000000]}',  # offsets beyond the file
    b'{"dtype":"F32","shape":[1],"data_offsets":[4,8]}',  # a gap
    b'{"dtype":"X9","shape":[1],"data_offsets":[0,4]}',  # unknown dtype
    b'{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}',  # unknown field
    b'{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}',  # float overflow
])
def test_a_tensor_table_that_does_not_describe_the_data_is_refused(files, tmp_path, entry):
    assert_refused_everywhere(files, tmp_path, _raw(tmp_path / "table.safetensors", b'{"x":' + entry + b"}", b"\0" * 8))


_FILL = {  # headers of the largest allowed size made of one thing, the slowest cases for the parser
    "integers": lambda n: b"[" + b"1," * (n // 2 - 1) + b"1]",
    "empty lists": lambda n: b"[" + b"[]," * (n // 3 - 1) + b"1]",
    "keys": lambda n: b"{" + b",".join(b'"%d":0' % i for i in range(n // 12)) + b"}",
    "strings": lambda n: b"[" + b'"ab\\"cd",' * (n // 10 - 1) + b"1]",
}


@pytest.mark.parametrize("kind", list(_FILL))
def test_a_header_of_the_maximum_size_is_parsed_or_refused_in_bounded_time(files, tmp_path, kind):
    header = _FILL[kind](safefile.MAX_HEADER_BYTES - 16)
    path = _raw(tmp_path / "big_header.safetensors", header)
    with deadline():
        with pytest.raises(HiF4FileError):
            hstate.load_state(path)


# --------------------------------------------------------------------------- listings

def test_a_listing_skips_bad_files_and_logs_each_once(files, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="hifloat4")
    os.mkfifo(tmp_path / "pipe.safetensors")
    _raw(tmp_path / "deep.safetensors", b"[" * 100_000 + b"]" * 100_000)
    entries = [("good.safetensors", str(files["packed"])), ("plain.safetensors", str(files["model"])),
               ("pipe.safetensors", str(tmp_path / "pipe.safetensors")),
               ("deep.safetensors", str(tmp_path / "deep.safetensors")), ("gone.safetensors", None)]
    with deadline():
        assert hckpt.hif4_checkpoint_names(entries) == ["good.safetensors"]
        assert hckpt.hif4_checkpoint_names(entries) == ["good.safetensors"]
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 2 and any("pipe" in m for m in skipped) and any("deep" in m for m in skipped)


# --------------------------------------------------------------------------- saves

def test_a_save_does_not_follow_a_symlinked_subfolder_out_of_its_folder(tmp_path):
    root, outside = tmp_path / "calib_states", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "hif4").symlink_to(outside)
    with pytest.raises(hstate.PTQStateError, match="leads outside"):
        safefile.output_folder(root, "hif4", what="calib_states", error=hstate.PTQStateError)
    assert safefile.output_folder(root, "sub/dir", what="calib_states", error=hstate.PTQStateError) == \
        str(root / "sub" / "dir")


def test_a_save_refuses_a_symlink_at_the_target_name(files, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"precious")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x_00001.safetensors").symlink_to(outside)
    with pytest.raises(hckpt.HiF4CheckpointError, match="symlink"):
        safefile.safe_output_path(tmp_path / "d", "x_00001.safetensors", what="model file", suffix=".safetensors",
                                  error=hckpt.HiF4CheckpointError)
    hstate.save_state(tmp_path / "d" / "x_00001.safetensors", hstate.load_state(files["state"]))
    assert outside.read_bytes() == b"precious"  # the link itself was replaced, nothing written through it


def test_output_path_errors_name_what_is_written(tmp_path):
    with pytest.raises(hckpt.HiF4CheckpointError, match="model file name '../x.safetensors'"):
        safefile.safe_output_path(tmp_path, "../x.safetensors", what="model file", suffix=".safetensors",
                                  error=hckpt.HiF4CheckpointError)
    with pytest.raises(hstate.PTQStateError, match="state name"):
        hstate.safe_state_path(tmp_path, "../x.safetensors")


def test_a_save_removes_stale_temps_of_killed_saves_and_keeps_everything_else(files, tmp_path):
    old = tmp_path / ".wan_00001.safetensors.k3j_9xq2.tmp"
    fresh = tmp_path / ".wan_00002.safetensors.a1b2c3d4.tmp"  # a save in progress elsewhere
    foreign = tmp_path / ".notes.txt.abcdefgh.tmp"
    for p in (old, fresh, foreign):
        p.write_bytes(b"x" * 100)
    hour_ago = time.time() - 2 * safefile.STALE_TEMP_S
    for p in (old, foreign):
        os.utime(p, (hour_ago, hour_ago))
    hstate.save_state(tmp_path / "new.safetensors", hstate.load_state(files["state"]))
    assert sorted(os.listdir(tmp_path)) == sorted([fresh.name, foreign.name, "new.safetensors"])


def test_a_save_fsyncs_the_folder_after_the_rename(files, tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd))
    hstate.save_state(tmp_path / "s.safetensors", hstate.load_state(files["state"]))
    assert synced == [False, True]  # the file, then its folder


# --------------------------------------------------------------------------- fuzzing

@FUZZ
@given(st.binary(max_size=256))
def test_any_header_bytes_are_read_or_refused_with_the_projects_error(tmp_path_factory, header):
    path = _raw(tmp_path_factory.mktemp("fuzz") / "f.safetensors", header)
    with deadline():
        try:
            safefile.read_header(path, HiF4FileError)
        except HiF4FileError:
            pass


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20)


def _state_loads_or_is_refused(path) -> None:
    """Any outcome but PTQStateError (or a hang past the deadline) fails the test."""
    with deadline():
        try:
            hstate.load_state(path)
        except hstate.PTQStateError:
            pass


@FUZZ
@given(field=st.sampled_from(["alpha", "percentile", "rotation", "statistic", "format_version", "experts",
                              "calibration"]), value=_JSON)
def test_any_metadata_value_is_loaded_or_refused_with_the_projects_error(files, tmp_path_factory, field, value):
    def edit(meta):
        meta[field] = value
        return json.dumps(meta, allow_nan=True)  # NaN / Infinity / huge ints reach the loader as written
    path = _state_with(files, tmp_path_factory.mktemp("fuzz"), edit)
    _state_loads_or_is_refused(path)


@FUZZ
@given(depth=st.integers(0, 200_000), opener=st.sampled_from([b"[", b'{"k":']))
def test_json_of_any_depth_is_parsed_or_refused_in_bounded_time(depth, opener):
    closer = b"]" if opener == b"[" else b"}"
    with deadline():
        try:
            value = safefile.loads_json(opener * depth + b"0" + closer * depth, HiF4FileError, "fuzz")
            assert depth <= safefile.MAX_JSON_DEPTH and value is not None
        except HiF4FileError as e:
            assert depth > safefile.MAX_JSON_DEPTH and "levels deep" in str(e)


@FUZZ
@given(offset=st.integers(0, 4095), byte=st.integers(0, 255))
def test_a_state_with_any_byte_changed_is_loaded_or_refused(files, tmp_path_factory, offset, byte):
    data = bytearray(files["state"].read_bytes())
    offset %= len(data)
    data[offset] = byte
    path = tmp_path_factory.mktemp("fuzz") / "flip.safetensors"
    path.write_bytes(bytes(data))
    _state_loads_or_is_refused(path)


@FUZZ
@given(dtype=st.sampled_from(["F32", "F16", "U8", "BOOL", "F4", "X9"]),
       shape=st.lists(st.integers(0, 4) | st.integers(-2, 2**70), max_size=3),
       begin=st.just(0) | st.integers(-2, 2**70), size=st.none() | st.integers(-2, 64),
       extra=st.just(0) | st.integers(-2, 8))
def test_a_tensor_table_is_accepted_only_when_safetensors_reads_it_too(tmp_path_factory, dtype, shape, begin, size,
                                                                      extra):
    """size None: the span the dtype and shape need; extra: data bytes beyond the span."""
    bits = safefile.DTYPE_BITS.get(dtype, 32)
    if size is None:
        size = min(math.prod(shape) * bits // 8, 2**40) if all(s >= 0 for s in shape) else 0
    entry = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}
    data = max(0, min(begin + size + extra, 4096))
    path = _raw(tmp_path_factory.mktemp("fuzz") / "t.safetensors", json.dumps({"x": entry}).encode(), b"\0" * data)
    with deadline():
        try:
            header = safefile.read_header(path, HiF4FileError)
        except HiF4FileError:
            return
    event("accepted")
    assert header["x"] == entry
    if dtype != "F4":  # torch has no 4-bit dtype to read it into
        with safe_open(path, "pt") as f:
            assert list(f.get_tensor("x").shape) == shape
