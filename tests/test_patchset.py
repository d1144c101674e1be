"""Specification of hifloat4.patchset: the LoRA / weight-patch record of a PTQ state
and how Apply compares it with a model's patches."""
from hifloat4 import patchset


def _record(*groups):
    return patchset.group_patches((s, d) for s, digests in groups for d in digests)


LORA = ["k1", "k2", "k3"]  # content digests of one LoRA's patch entries
OTHER = ["o1", "o2"]


def test_one_lora_at_one_strength_is_one_group_counting_its_entries():
    (g,) = _record((1.0, LORA))
    assert g["strength"] == 1.0 and g["keys"] == 3 and g["digest"].startswith("sha256:")


def test_the_record_does_not_depend_on_entry_order():
    assert _record((1.0, LORA)) == _record((1.0, LORA[::-1]))


def test_the_digest_does_not_include_the_strength():
    assert _record((1.0, LORA))[0]["digest"] == _record((0.5, LORA))[0]["digest"]


def test_matching_patches_give_no_warning():
    assert patchset.mismatch_warning("high_noise", _record((1.0, LORA)), _record((1.0, LORA))) is None


def test_a_state_without_a_record_gives_no_warning():
    assert patchset.mismatch_warning("high_noise", None, _record((1.0, LORA))) is None


def test_a_missing_lora_is_named_missing():
    assert patchset.differences(_record((1.0, LORA)), []) == ["missing: 3 patched weights at strength 1"]


def test_an_extra_lora_is_named_extra():
    assert patchset.differences(_record((1.0, LORA)), _record((1.0, LORA), (0.7, OTHER))) == \
        ["extra: 2 patched weights at strength 0.7"]


def test_a_lora_at_another_strength_is_named_a_different_strength():
    assert patchset.differences(_record((1.0, LORA)), _record((0.5, LORA))) == \
        ["different strength: 3 patched weights at 0.5, calibrated at 1"]


def test_another_lora_at_the_same_strength_is_missing_plus_extra():
    assert patchset.differences(_record((1.0, LORA)), _record((1.0, OTHER))) == \
        ["missing: 3 patched weights at strength 1", "extra: 2 patched weights at strength 1"]


def test_calibrated_without_patches_warns_about_a_lora_now():
    text = patchset.mismatch_warning("low_noise", [], _record((1.0, LORA)))
    assert "low_noise expert" in text and "extra: 3 patched weights at strength 1" in text


# --------------------------------------------------------------------------- LoRA file names (information only)

def _named(record, names):
    return patchset.with_names(record, names)


def test_names_attach_to_the_group_of_their_strength():
    record = _named(_record((1.0, LORA), (0.5, OTHER)), {1.0: ["lightning.safetensors"]})
    assert [g.get("names") for g in record] == [None, ["lightning.safetensors"]]


def test_names_at_a_strength_without_patches_are_left_out():
    assert "names" not in _named(_record((1.0, LORA)), {0.0: ["unused.safetensors"]})[0]


def test_names_that_may_not_be_recorded_are_left_out_when_attaching():
    (g,) = _named(_record((1.0, LORA)), {1.0: ["bad\nname", "good.safetensors", ""]})
    assert g["names"] == ["good.safetensors"]


def test_names_do_not_change_what_counts_as_a_mismatch():
    named = _named(_record((1.0, LORA)), {1.0: ["renamed.safetensors"]})
    assert patchset.differences(named, _record((1.0, LORA))) == []


def test_a_missing_lora_is_named_by_its_file_where_recorded():
    recorded = _named(_record((1.0, LORA)), {1.0: ["lightning_high.safetensors"]})
    assert patchset.differences(recorded, []) == \
        ["missing: 3 patched weights at strength 1 (lightning_high.safetensors)"]


def test_a_different_strength_names_the_calibrated_file():
    recorded = _named(_record((1.0, LORA)), {1.0: ["lightning_high.safetensors"]})
    assert patchset.differences(recorded, _record((0.5, LORA))) == \
        ["different strength: 3 patched weights at 0.5, calibrated at 1 (lightning_high.safetensors)"]


def test_stacked_loras_at_one_strength_share_the_group_names():
    (g,) = _named(_record((1.0, LORA + OTHER)), {1.0: ["a.safetensors", "b.safetensors"]})
    assert patchset.describe(g) == "5 patched weights at strength 1 (a.safetensors, b.safetensors)"
