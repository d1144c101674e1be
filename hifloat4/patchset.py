"""The weight patches (LoRAs) a model carried when it was calibrated, as a PTQ state
records them, and how a model's current patches differ from that record.

Why groups and digests, not file names: a ComfyUI MODEL does not know which files
its LoRAs came from (LoraLoaderModelOnly records no name on the patcher, neither in
0.3.64 nor in 0.33). What the patcher does hold, on both, is per weight a list of
(strength, patch) entries. A record is therefore one group per strength: how many
weight entries carry it and a sha256 digest of their content (each patched key, the
patch kind, tensor dtypes, shapes and leading values; the strength excluded, so a
changed strength is told apart from another LoRA). One LoRA at one strength is one
group; LoRAs stacked at the same strength share a group.

A record is a list of groups {"strength": float, "keys": int, "digest": "sha256:<hex>"},
sorted by (strength, digest); [] means "calibrated without patches". A group may also
hold "names": the LoRA file names Calibrate found at that strength in the ComfyUI graph
(nodes/comfy/lora_graph). They are shown to the user and never compared: the digest
stays the key, so a renamed file is the same LoRA and a name not found is no mismatch.
"""
from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping

MAX_GROUPS = 256  # a stranger's file cannot make a record of unbounded size
MAX_KEYS = 10**7
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_NAMES = 32  # LoRA file names per group
MAX_NAME_CHARS = 512  # a name may carry the loras/ subfolders
_FIELDS = {"strength", "keys", "digest"}
_OPTIONAL = {"names"}
_UNSHOWABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}  # control, format (bidi overrides), surrogates, line breaks


def strength_key(strength: float) -> float:
    """A strength as the record holds it: patches and graph widgets agree to 6 places."""
    return round(float(strength), 6)


def is_showable_name(name) -> bool:
    """Whether a LoRA file name may go into a record: a non-empty string of at most
    MAX_NAME_CHARS characters that cannot break or disguise the line it is shown on."""
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS
            and not any(unicodedata.category(c) in _UNSHOWABLE for c in name))


def group_patches(entries: Iterable[tuple[float, str]]) -> list[dict]:
    """The record of a model's patches from one (strength, content digest) pair per
    patch entry: one group per strength, in canonical order."""
    by_strength: dict[float, list[str]] = {}
    for strength, digest in entries:
        by_strength.setdefault(strength_key(strength), []).append(digest)
    groups = [{"strength": s, "keys": len(ds), "digest": "sha256:" + hashlib.sha256("\0".join(sorted(ds)).encode())
               .hexdigest()} for s, ds in by_strength.items()]
    return sorted(groups, key=lambda g: (g["strength"], g["digest"]))


def with_names(record: list[dict], names: Mapping[float, Iterable[str]]) -> list[dict]:
    """The record with each group's LoRA file names from `names` (strength -> names,
    as found upstream in the graph). Names at a strength no group has (a LoRA that
    patched nothing, strength 0) and names that may not be recorded are left out."""
    found: dict[float, list[str]] = {}
    for strength, ns in names.items():
        found.setdefault(strength_key(strength), []).extend(n for n in ns if is_showable_name(n))
    return [g | {"names": found[g["strength"]][:MAX_NAMES]} if found.get(g["strength"]) else dict(g) for g in record]


def check_record(record, experts: Iterable[str], error: type[Exception]) -> None:
    """Raise `error` unless `record` is {expert: [group, ...]} for exactly these experts,
    each group {"strength": finite number, "keys": int in [1, MAX_KEYS], "digest":
    "sha256:" + 64 hex digits} and optionally "names" (1 to MAX_NAMES showable names),
    at most MAX_GROUPS per expert, no group twice."""
    names = set(experts)
    if not isinstance(record, dict) or set(record) != names:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise error(f"patches must name exactly the experts {sorted(names)}, got {got}")
    for name, groups in record.items():
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise error(f"patches of {name!r} must be a list of at most {MAX_GROUPS} groups")
        for g in groups:
            if not (isinstance(g, dict) and _FIELDS <= set(g) <= _FIELDS | _OPTIONAL):
                raise error(f"patches of {name!r}: each group must be an object with exactly "
                            f"{', '.join(sorted(_FIELDS))} (and optionally {', '.join(sorted(_OPTIONAL))})")
            s, k, d = g["strength"], g["keys"], g["digest"]
            if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)):
                raise error(f"patches of {name!r}: strength must be a finite number, got {s!r}")
            if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_KEYS):
                raise error(f"patches of {name!r}: keys must be an int in [1, {MAX_KEYS}], got {k!r}")
            if not (isinstance(d, str) and _DIGEST_RE.fullmatch(d)):
                raise error(f"patches of {name!r}: digest must be 'sha256:' and 64 hex digits")
            if "names" in g and not (isinstance(g["names"], list) and 1 <= len(g["names"]) <= MAX_NAMES
                                     and all(map(is_showable_name, g["names"]))):
                raise error(f"patches of {name!r}: names must be a list of 1 to {MAX_NAMES} file names of at "
                            f"most {MAX_NAME_CHARS} characters without control characters")
        pairs = [(g["strength"], g["digest"]) for g in groups]
        if len(set(pairs)) != len(pairs):
            raise error(f"patches of {name!r}: a group appears twice")


def _named(g: Mapping) -> str:
    return f" ({', '.join(g['names'])})" if g.get("names") else ""


def describe(g: Mapping) -> str:
    """One group as the user reads it, with its file names where recorded."""
    return f"{g['keys']} patched weights at strength {g['strength']:g}{_named(g)}"


def differences(recorded: list[Mapping] | None, current: list[Mapping]) -> list[str]:
    """How `current` differs from `recorded`, one phrase per difference: a group with
    the same content at another strength ("different strength"), a recorded group not
    there ("missing"), a group not recorded ("extra"). [] when they match or when
    nothing was recorded (None: a state from before patches were recorded)."""
    if recorded is None:
        return []
    rest_rec = list(recorded)
    rest_cur = []
    for g in current:
        same = next((r for r in rest_rec if r["digest"] == g["digest"] and r["strength"] == g["strength"]), None)
        if same is not None:
            rest_rec.remove(same)
        else:
            rest_cur.append(g)
    out = []
    for g in list(rest_cur):
        was = next((r for r in rest_rec if r["digest"] == g["digest"]), None)
        if was is not None:
            rest_rec.remove(was)
            rest_cur.remove(g)
            out.append(f"different strength: {g['keys']} patched weights at {g['strength']:g}, "
                       f"calibrated at {was['strength']:g}{_named(was)}")
    out += [f"missing: {describe(r)}" for r in rest_rec]
    out += [f"extra: {describe(g)}" for g in rest_cur]
    return out


def mismatch_warning(expert: str, recorded: list[Mapping] | None, current: list[Mapping]) -> str | None:
    """The warning Apply shows when the model's weight patches (LoRAs) are not those the
    state's `expert` was calibrated with; None when they match or nothing was recorded."""
    found = differences(recorded, current)
    if not found:
        return None
    return (f"this model's LoRA / weight patches differ from those the PTQ state's {expert} expert was "
            f"calibrated with ({'; '.join(found)}). Its masks fit other weights: expect lower quality, or "
            "recalibrate with the LoRAs and strengths you generate with.")
