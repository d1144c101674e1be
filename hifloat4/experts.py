"""Which expert of a PTQ state to use on a model: one decision for the Apply node,
Save HiF4 Model and `python -m hifloat4 export`, told in words a user knows
("made for Wan2.2 T2V-A14B high-noise; this model is Wan2.2 I2V-A14B").

- Another model *type* (T2V / I2V / TI2V, other dims: the fingerprints' layer and
  patch-embedding shapes differ) is refused even when the expert is named
  explicitly. T2V and I2V A14B have identical Linear shapes, so nothing downstream
  would notice: the masks would silently scale the wrong model's channels.
- "auto" takes the expert whose weights match the model (hifloat4.wan.match_fingerprint).
- A named expert of the same type but with other weights is taken with a warning:
  an fp8 copy of the very same expert fingerprints differently, and only the user
  knows what the file is.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import wan as hwan

HIGH, LOW, SINGLE = "high_noise", "low_noise", "single"
EXPERTS = ("auto", HIGH, LOW, SINGLE)
_LABELS = {HIGH: "high-noise", LOW: "low-noise", SINGLE: ""}
_CALIBRATE = "calibrate a PTQ state for this model (Calibrate Wan2.2 HiF4) or use one made for it"


class ExpertMismatch(ValueError):
    """The PTQ state cannot be used on this model as requested (the message says why)."""


@dataclass(frozen=True)
class ExpertChoice:
    name: str
    warning: str | None = None  # set when a named expert's weights differ from the model's


def expert_title(fp: Mapping, name: str) -> str:
    """"Wan2.2 T2V-A14B (high-noise expert)" for the expert `name` whose fingerprint is `fp`."""
    label = _LABELS.get(name, name)
    return hwan.fingerprint_title(fp) + (f" ({label} expert)" if label else "")


def state_title(candidates: Mapping[str, Mapping]) -> str:
    """What a state's experts were made for, e.g. "Wan2.2 T2V-A14B (high-noise and low-noise experts)"."""
    models = list(dict.fromkeys(hwan.fingerprint_title(fp) for fp in candidates.values()))
    labels = [_LABELS.get(n, n) for n in candidates if _LABELS.get(n, n)]
    return " / ".join(models) + (f" ({' and '.join(labels)} expert{'s' * (len(labels) > 1)})" if labels else "")


def choose_expert(fp: Mapping, candidates: Mapping[str, Mapping], requested: str) -> ExpertChoice:
    """The expert of a state (candidates: expert name -> fingerprint) to use on the model
    whose fingerprint is `fp`. Raises ExpertMismatch with a message that says what the
    state was made for, what the model is and what to do."""
    if requested not in EXPERTS:
        raise ExpertMismatch(f"expert must be one of {', '.join(EXPERTS)}, got {requested!r}")
    model = hwan.fingerprint_title(fp)
    same_type = {n: c for n, c in candidates.items() if c.get("shape_hash") == fp.get("shape_hash")}
    if requested == "auto":
        if not same_type:
            raise ExpertMismatch(f"this PTQ state was made for {state_title(candidates)}; this model is {model}. "
                                 f"Its masks do not fit another model type: {_CALIBRATE}.")
        matched = hwan.match_fingerprint(dict(fp), candidates)
        if matched is None:
            raise ExpertMismatch(
                f"this PTQ state was made for {state_title(candidates)}; this model is {model} with other weights "
                "(a fine-tune, a merge, or an fp8/re-encoded copy). For a copy of one of those experts, pick that "
                f"expert explicitly instead of auto; otherwise {_CALIBRATE}.")
        return ExpertChoice(matched)
    if requested not in candidates:
        raise ExpertMismatch(f"this PTQ state has no {requested} expert; it has: {', '.join(candidates)} "
                             f"(made for {state_title(candidates)})")
    made_for = expert_title(candidates[requested], requested)
    if requested not in same_type:
        raise ExpertMismatch(f"this PTQ state's {requested} masks were made for {made_for}; this model is "
                             f"{model}. Masks of another model type cannot be applied, even when the expert is "
                             f"picked explicitly: {_CALIBRATE}.")
    if hwan.match_fingerprint(dict(fp), {requested: candidates[requested]}) is None:
        return ExpertChoice(requested, f"this model's weights differ from {made_for}, which this PTQ state's "
                                       f"{requested} masks were calibrated on; using them as requested. Right for "
                                       "an fp8 or re-encoded copy of that expert; for other weights, calibrate a "
                                       "state for this model.")
    return ExpertChoice(requested)
