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
sorted by (strength, digest); [] means "calibrated without patches".
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping

MAX_GROUPS = 256  # a stranger's file cannot make a record of unbounded size
MAX_KEYS = 10**7
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_FIELDS = {"strength", "keys", "digest"}


def group_patches(entries: Iterable[tuple[float, str]]) -> list[dict]:
    """The record of a model's patches from one (strength, content digest) pair per
    patch entry: one group per strength, in canonical order."""
    by_strength: dict[float, list[str]] = {}
    for strength, digest in entries:
        by_strength.setdefault(round(float(strength), 6), []).append(digest)
    groups = [{"strength": s, "keys": len(ds), "digest": "sha256:" + hashlib.sha256("\0".join(sorted(ds)).encode())
               .hexdigest()} for s, ds in by_strength.items()]
    return sorted(groups, key=lambda g: (g["strength"], g["digest"]))


def check_record(record, experts: Iterable[str], error: type[Exception]) -> None:
    """Raise `error` unless `record` is {expert: [group, ...]} for exactly these experts,
    each group {"strength": finite number, "keys": int in [1, MAX_KEYS], "digest":
    "sha256:" + 64 hex digits}, at most MAX_GROUPS per expert, no group twice."""
    names = set(experts)
    if not isinstance(record, dict) or set(record) != names:
        got = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise error(f"patches must name exactly the experts {sorted(names)}, got {got}")
    for name, groups in record.items():
        if not isinstance(groups, list) or len(groups) > MAX_GROUPS:
            raise error(f"patches of {name!r} must be a list of at most {MAX_GROUPS} groups")
        for g in groups:
            if not (isinstance(g, dict) and set(g) == _FIELDS):
                raise error(f"patches of {name!r}: each group must be an object with exactly "
                            f"{', '.join(sorted(_FIELDS))}")
            s, k, d = g["strength"], g["keys"], g["digest"]
            if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s)):
                raise error(f"patches of {name!r}: strength must be a finite number, got {s!r}")
            if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= MAX_KEYS):
                raise error(f"patches of {name!r}: keys must be an int in [1, {MAX_KEYS}], got {k!r}")
            if not (isinstance(d, str) and _DIGEST_RE.fullmatch(d)):
                raise error(f"patches of {name!r}: digest must be 'sha256:' and 64 hex digits")
        pairs = [(g["strength"], g["digest"]) for g in groups]
        if len(set(pairs)) != len(pairs):
            raise error(f"patches of {name!r}: a group appears twice")


def _describe(g: Mapping) -> str:
    return f"{g['keys']} patched weights at strength {g['strength']:g}"


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
                       f"calibrated at {was['strength']:g}")
    out += [f"missing: {_describe(r)}" for r in rest_rec]
    out += [f"extra: {_describe(g)}" for g in rest_cur]
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
