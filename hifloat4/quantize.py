"""`quantize_(model, config)`: the library's one entry point (torchao-style), in place.

Two typed configs say what to do:
* `W4A4Config` (hifloat4.plan): a PTQ state plus the user's choices; the model's
  fingerprint picks the expert, and `plan.make_plan` decides masks, rotation and the
  layers kept in high precision, exactly as the ComfyUI nodes and `export` do.
* `LayersConfig`: an explicit `{layer: LayerQuant}` map (evaluation, benchmarks).
`packed=True` stores weights as 4.5-bit HiF4 codes (PackedHiF4Linear) instead of
HiF4-valued bf16 (HiF4Linear); the outputs are bit-identical. The config's `compute`
(auto | simulate | int8, linear.resolve_compute) says how packed layers multiply; int8
reads the codes, so it needs packed=True.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from . import wan as hwan
from .linear import COMPUTE_CHOICES, HiF4Linear, LayerQuant
from .packed_linear import PackedHiF4Linear
from .plan import W4A4Config, make_plan

log = logging.getLogger("hifloat4")


@dataclass(frozen=True)
class LayersConfig:
    """Quantize exactly these layers (names as in model.named_modules()) this way."""

    layers: Mapping[str, LayerQuant]
    compute: str = "auto"


def quantize_(model: nn.Module, config: W4A4Config | LayersConfig, *, packed: bool = False) -> nn.Module:
    """Replace the model's chosen nn.Linear layers by W4A4 HiF4 layers, in place; returns
    the model. Every named layer must exist and be an nn.Linear; nothing is changed
    otherwise."""
    if isinstance(config, W4A4Config):
        plan = make_plan(config, hwan.fingerprint(model))
        if plan.warning:
            log.warning("HiF4: %s", plan.warning)
        log.info("%s", plan.describe())
        prefix = hwan.find_prefix(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
        layers = {prefix + n: q for n, q in plan.layers.items()}
    elif isinstance(config, LayersConfig):
        layers = dict(config.layers)
    else:
        raise TypeError(f"config must be a W4A4Config or a LayersConfig, got {type(config).__name__}")
    modules = dict(model.named_modules())
    problems = [n for n in layers if not isinstance(modules.get(n), nn.Linear)]
    if problems:
        raise ValueError(f"not nn.Linear layers of this model: {problems[:5]}{' ...' if len(problems) > 5 else ''}")
    if config.compute not in COMPUTE_CHOICES:
        raise ValueError(f"compute must be one of {', '.join(COMPUTE_CHOICES)}, got {config.compute!r}")
    if config.compute == "int8" and not packed:
        raise ValueError("compute='int8' multiplies the packed HiF4 codes: quantize with packed=True")
    for name, quant in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = (PackedHiF4Linear.from_linear(modules[name], quant, config.compute) if packed
                 else HiF4Linear(modules[name], quant))
        setattr(parent, child, layer)
    return model
