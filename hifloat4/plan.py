"""How a model is quantized from a PTQ state: one decision for every caller.

`make_plan(config, fingerprint)` turns a PTQ state, a model's fingerprint
(hifloat4.wan.fingerprint: layer shapes and a content probe) and the user's choices
(`W4A4Config`) into a `Plan`: the expert, `{layer: LayerQuant}` for the layers that
run W4A4, and the layers kept in high precision. The Apply node, Save HiF4 Model,
`python -m hifloat4 export` and `hifloat4.quantize_` all call it, so they cannot
disagree about the expert, the masks (alpha, statistic, adaptive), the rotation or
which layers are kept.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from . import experts as hexperts
from . import masks as hmasks
from . import rotation as hrotation
from . import state as hstate
from . import wan as hwan
from .linear import COMPUTE_CHOICES, LayerQuant
from .spec import BYTES_PER_GROUP, GROUP_SIZE

ROTATIONS = hrotation.SETTINGS  # besides None: as calibrated


def packed_nbytes(out_features: int, in_features: int) -> int:
    """Bytes of one packed layer in a checkpoint: HiF4 codes (36 bytes per 64 values) and its float32 mask."""
    return out_features * math.ceil(in_features / GROUP_SIZE) * BYTES_PER_GROUP + 4 * in_features


@dataclass(frozen=True)
class W4A4Config:
    """What to quantize and how, on top of a PTQ state (torchao-style typed config).

    None means "as calibrated" for alpha, statistic and rotation. `statistic`:
    tail | max | none | adaptive (per layer, the statistic with the lowest measured
    error). `rotation`: "off" or "hadamard" (block `rotation_block`, fitted to each
    layer). `keep_high_precision`: the N layers whose W4A4 error measured at
    calibration is largest stay unquantized. `compute`: how the W4A4 matmuls run
    (linear.resolve_compute: auto | simulate | int8; int8 reads packed codes).
    """

    state: hstate.PTQState
    expert: str = "auto"
    alpha: float | None = None
    statistic: str | None = None
    rotation: str | None = None
    rotation_block: int = hrotation.DEFAULT_BLOCK
    keep_high_precision: int = 0
    compute: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.state, hstate.PTQState):
            raise TypeError(f"W4A4Config.state must be a PTQState, got {type(self.state).__name__}")
        if self.expert not in hexperts.EXPERTS:
            raise ValueError(f"expert must be one of {', '.join(hexperts.EXPERTS)}, got {self.expert!r}")
        a = self.alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0):
            raise ValueError(f"alpha must be None (as calibrated) or in [0, 1], got {a!r}")
        if self.statistic is not None and self.statistic not in hstate.REMASK_STATISTICS:
            raise ValueError(f"statistic must be None (as calibrated) or one of {hstate.REMASK_STATISTICS}, "
                             f"got {self.statistic!r}")
        if self.rotation is not None and self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be None (as calibrated) or one of {ROTATIONS}, got {self.rotation!r}")
        b = self.rotation_block
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= hrotation.MAX_BLOCK:
            raise ValueError(f"rotation_block must be an int in [1, {hrotation.MAX_BLOCK}], got {b!r}")
        n = self.keep_high_precision
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"keep_high_precision must be an int >= 0, got {n!r}")
        if self.compute not in COMPUTE_CHOICES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}, got {self.compute!r}")


@dataclass(frozen=True)
class Plan:
    """The outcome: which expert, the W4A4 layers, the layers kept in high precision."""

    expert: str
    layers: dict[str, LayerQuant]  # policy order
    kept: tuple[str, ...]  # most sensitive first
    shapes: dict[str, tuple[int, int]]  # (out, in) of every main layer, quantized or kept
    statistics: dict[str, str]  # the statistic each quantized layer's mask comes from
    warning: str | None = None

    def kept_values(self) -> int:
        return sum(math.prod(self.shapes[n]) for n in self.kept)

    def kept_packed_extra_bytes(self, dtype_bytes: int = 2) -> int:
        """What keeping costs in a packed file: each kept weight stays in `dtype_bytes`
        per value instead of HiF4 codes and a mask."""
        return sum(out_f * in_f * dtype_bytes - packed_nbytes(out_f, in_f)
                   for out_f, in_f in (self.shapes[n] for n in self.kept))

    def describe(self, dtype_bytes: int = 2) -> str:
        """One paragraph for the log and the node: the mask statistics in use and the
        kept layers with their cost."""
        counts = Counter(self.statistics.values())
        lines = [f"HiF4 W4A4 on {len(self.layers)} layers of the {self.expert} expert; masks: "
                 + ", ".join(f"{n} {s}" for s, n in counts.most_common())]
        if self.kept:
            mb = self.kept_packed_extra_bytes(dtype_bytes) / 1e6
            lines.append(f"kept in high precision ({len(self.kept)}, most sensitive first): {', '.join(self.kept)}; "
                         f"{self.kept_values() / 1e6:.2f} M weights run unquantized (W4A4 speed-ups do not "
                         f"apply to them); in a packed checkpoint they take {mb:.2f} MB more than as HiF4")
        return "\n".join(lines)


def _rotation(config: W4A4Config, state: hstate.PTQState) -> hrotation.Rotation | None:
    """The model-wide rotation: as calibrated, off, or Hadamard with the block the user gave
    (rounded down to a power of two; each layer then fits it to its in-features)."""
    if config.rotation is None:
        return hrotation.from_meta(state.rotation)
    return hrotation.from_setting(config.rotation, config.rotation_block)


def rank_by_sensitivity(sensitivity: Mapping[str, float]) -> list[str]:
    """Layer names, largest W4A4 error first; ties keep the given (policy) order."""
    return sorted(sensitivity, key=lambda name: -sensitivity[name])


def most_sensitive(expert: hstate.ExpertState, n: int) -> tuple[str, ...]:
    """The n layers with the largest W4A4 error measured at calibration (ties: policy order)."""
    if n == 0:
        return ()
    missing = [name for name, ls in expert.layers.items() if hmasks.sensitivity(ls) is None]
    if missing:
        raise hstate.PTQStateError(
            f"keep_high_precision needs per-layer sensitivity, which this PTQ state lacks ({len(missing)} layers, "
            f"e.g. {missing[0]}): it was made before format version {hstate.FORMAT_VERSION}. Recalibrate it with "
            "this version, or set keep_high_precision to 0.")
    if n > len(expert.layers):
        raise ValueError(f"keep_high_precision is {n}, but the expert has only {len(expert.layers)} main layers")
    return tuple(rank_by_sensitivity({name: hmasks.sensitivity(ls) for name, ls in expert.layers.items()})[:n])


def make_plan(config: W4A4Config, fingerprint: Mapping) -> Plan:
    """The Plan for the model whose fingerprint is given (hifloat4.wan.fingerprint of its
    real-valued weights). Raises ExpertMismatch (wrong model), PTQStateError (the state
    does not fit the layers, or lacks what a choice needs) or ValueError."""
    state = config.state
    candidates = {n: ex.fingerprint for n, ex in state.experts.items()}
    choice = hexperts.choose_expert(fingerprint, candidates, config.expert)
    shapes = {n: (int(s[0]), int(s[1])) for n, s in fingerprint["layers"].items()}
    hstate.validate_against_model(state, choice.name, shapes)
    main = hwan.classify_layer_names(shapes)[0]
    if set(state.experts[choice.name].layers) != set(main):
        missing = [n for n in main if n not in state.experts[choice.name].layers]
        raise hstate.PTQStateError(f"the state's {choice.name!r} expert covers {len(state.experts[choice.name].layers)} "
                                   f"layers, the model has {len(main)} main layers; missing: {', '.join(missing[:5])}")
    state, statistics = hmasks.remask(state, alpha=config.alpha, statistic=config.statistic)
    expert = state.experts[choice.name]
    kept = most_sensitive(expert, config.keep_high_precision)
    rotation = _rotation(config, state)
    layers = {n: LayerQuant(mask=ls.mask, rotation=hrotation.for_layer(rotation, shapes[n][1]))
              for n, ls in expert.layers.items() if n not in kept}
    return Plan(expert=choice.name, layers=layers, kept=kept, shapes={n: shapes[n] for n in main},
                statistics={n: statistics[choice.name][n] for n in layers}, warning=choice.warning)
