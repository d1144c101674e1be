"""Masks from a PTQ state's stored statistics: which statistic a layer's mask comes
from, and the mask itself. hifloat4.state is the file format; this is the policy.

Masks are always derived from the *stored* (storage-dtype) statistics and stored in
fp16, so re-deriving a mask with the settings it was made with reproduces it bit for
bit, and another alpha or statistic needs no recalibration (`remask`).

"adaptive" picks, per layer, the CANDIDATES statistic with the lowest output error
measured at calibration (`adaptive_choice`); `remask` makes that choice once and
returns it with the masks, so a plan labels each layer with the decision it used.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

from torch import Tensor

from .smoothing import STATISTICS, MaskConfig, activation_statistic, channel_mask
from .state import (CANDIDATES, FIELD_DTYPES, FORMAT_VERSION, REMASK_STATISTICS, ExpertState, LayerState, PTQState,
                    PTQStateError)


def _mask(wmax: Tensor, act: Tensor | None, alpha: float, statistic: str) -> Tensor:
    """The stored (fp16) mask from stored statistics; `act` is unused for "none"."""
    mask = channel_mask(wmax.float(), None if act is None else act.float(),
                        MaskConfig(alpha=alpha, statistic=statistic))
    return mask.to(FIELD_DTYPES["mask"])


def _statistic_mask(ls: LayerState, alpha: float, statistic: str) -> Tensor:
    """The stored mask of a tail / max / none statistic from the layer's stored statistics
    (hifloat4.smoothing.activation_statistic says which statistic that is)."""
    config = MaskConfig(alpha=alpha, statistic=statistic)
    return _mask(ls.wmax, activation_statistic(ls, config), alpha, statistic)


def _stored(t: Tensor, f: str) -> Tensor:
    return t.detach().cpu().to(FIELD_DTYPES[f])


def make_layer_state(wmax: Tensor, absmax: Tensor, tail: Tensor, *, alpha: float, statistic: str,
                     tails: Tensor | None = None, errors: Tensor | None = None) -> LayerState:
    """LayerState: statistics rounded to their storage dtype, then the mask derived
    from the rounded values (hifloat4.smoothing.channel_mask) and stored in fp16, so
    remask with the same settings reproduces it bit for bit."""
    stored = LayerState(mask=None, absmax=_stored(absmax, "absmax"), tail=_stored(tail, "tail"),  # mask: below
                        wmax=_stored(wmax, "wmax"), tails=None if tails is None else _stored(tails, "tails"),
                        errors=None if errors is None else _stored(errors, "errors"))
    return dataclasses.replace(stored, mask=_statistic_mask(stored, alpha, statistic))


def _require(ls: LayerState, field: str, what: str) -> None:
    if getattr(ls, field) is None:
        raise PTQStateError(f"{what} needs the per-layer {field} that calibration records since PTQ format "
                            f"version {FORMAT_VERSION}; this state (version 1) lacks them: recalibrate with "
                            f"this version")


def candidate_mask(ls: LayerState, candidate: str, alpha: float) -> Tensor:
    """The stored-precision mask a CANDIDATES statistic gives this layer at `alpha`."""
    if candidate not in CANDIDATES:
        raise PTQStateError(f"candidate must be one of {CANDIDATES}, got {candidate!r}")
    _require(ls, "tails", f"statistic {candidate!r}")
    if candidate == "max":
        return _statistic_mask(ls, alpha, "max")
    return _mask(ls.wmax, ls.tails[CANDIDATES.index(candidate)], alpha, "tail")


def sensitivity(ls: LayerState) -> float | None:
    """How much W4A4 hurts this layer as calibrated: its relative output error on the
    calibration sample (errors[0]); None for a version 1 state."""
    return None if ls.errors is None else float(ls.errors[0])


def adaptive_choice(ls: LayerState) -> str:
    """The CANDIDATES statistic with the lowest measured output error (ties: the earlier one)."""
    _require(ls, "errors", "the adaptive statistic")
    errors = ls.errors[1:].tolist()
    return CANDIDATES[errors.index(min(errors))]


class Remasked(NamedTuple):
    """A state with its masks, and the statistic each layer's mask comes from."""

    state: PTQState
    statistics: dict[str, dict[str, str]]  # expert -> layer -> "tail" / "max" / "none" or a CANDIDATES name


def _layer_statistics(expert: ExpertState, statistic: str) -> dict[str, str]:
    """The statistic each layer's mask comes from under a state-wide `statistic`: that
    statistic, or for "adaptive" each layer's adaptive_choice."""
    return {n: adaptive_choice(ls) if statistic == "adaptive" else statistic for n, ls in expert.layers.items()}


def _layer_mask(ls: LayerState, statistic: str, alpha: float) -> Tensor:
    """The mask of a tail / max / none statistic or of a CANDIDATES percentile."""
    return _statistic_mask(ls, alpha, statistic) if statistic in STATISTICS else candidate_mask(ls, statistic, alpha)


def remask(state: PTQState, alpha: float | None = None, statistic: str | None = None) -> Remasked:
    """The state's masks for another alpha and/or statistic (None: as calibrated),
    re-derived from the stored statistics and weight absmax: no recalibration needed.
    With neither given the stored masks are kept as they are.

    "adaptive" gives each layer the mask of its `adaptive_choice` at `alpha` (the
    choice was measured at the calibrated alpha and rotation). The recorded errors
    are kept: they describe the calibration, not the new masks.
    """
    new_alpha = state.alpha if alpha is None else alpha
    new_statistic = state.statistic if statistic is None else statistic
    if new_statistic not in REMASK_STATISTICS:
        raise PTQStateError(f"statistic must be one of {REMASK_STATISTICS}, got {new_statistic!r}")
    chosen = {name: _layer_statistics(ex, new_statistic) for name, ex in state.experts.items()}
    if alpha is None and statistic is None:
        return Remasked(state, chosen)
    experts = {
        name: ExpertState(layers={ln: dataclasses.replace(ls, mask=_layer_mask(ls, chosen[name][ln], new_alpha))
                                  for ln, ls in ex.layers.items()},
                          fingerprint=ex.fingerprint)
        for name, ex in state.experts.items()}
    return Remasked(dataclasses.replace(state, experts=experts, alpha=float(new_alpha), statistic=new_statistic),
                    chosen)
