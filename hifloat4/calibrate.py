"""Plain-PyTorch calibration: observe the main Linear inputs while a sampling loop
runs, then turn the statistics into a PTQ state.

The pieces are separate so that each caller uses only what it needs:
* `observe(model, names, percentile)` - a context manager putting forward pre-hooks
  on Linear layers that feed `ChannelStats`; the hooks are removed in `finally`.
* `build_state({expert: (module, stats)}, config)` - weight absmax, channel masks,
  fingerprints and metadata -> `PTQState` (the ComfyUI node samples through ComfyUI
  and builds its state from the same stats/smoothing/state functions).
* `calibrate(experts, run, config)` - both of the above around a callable `run()`
  that drives the models (e.g. `sample_two_expert` over a few prompts).
The sampler that drives the models in the demo and tests is hifloat4.sampling.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import rotation as hrotation
from . import wan
from .experts import HIGH, LOW  # the expert names live in one place
from .rotation import Rotation
from .smoothing import MaskConfig, Statistic, weight_absmax
from .state import ExpertState, PTQState, make_layer_state
from .stats import ChannelStats

# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class CalibConfig:
    """How statistics become masks. Defaults are the paper's: p99.9 tail, alpha 0.5."""

    percentile: float = 99.9
    alpha: float = 0.5
    statistic: Statistic = "tail"
    rotation: Rotation | None = None

    def __post_init__(self) -> None:
        self.mask_config()  # validates alpha and statistic with MaskConfig's own checks
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 100.0:
            raise ValueError(f"CalibConfig.percentile must be in (0, 100], got {p!r}")
        if self.rotation is not None and not isinstance(self.rotation, Rotation):
            raise ValueError(f"CalibConfig.rotation must be a Rotation or None, got {self.rotation!r}")

    def mask_config(self) -> MaskConfig:
        return MaskConfig(alpha=self.alpha, statistic=self.statistic)


# --------------------------------------------------------------------------- observation

def _resolve_linears(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Linear]:
    """Wan-relative layer names -> the nn.Linear modules (a key prefix such as
    "diffusion_model." is found the way hifloat4.wan finds it)."""
    modules = dict(model.named_modules())
    prefix = wan.find_prefix(n for n, m in modules.items() if isinstance(m, nn.Linear))
    found, bad = {}, []
    for name in names:
        m = modules.get(prefix + name)
        if isinstance(m, nn.Linear):
            found[name] = m
        else:
            bad.append(name)
    if bad:
        raise ValueError(f"not nn.Linear layers of this model: {bad[:5]}{' ...' if len(bad) > 5 else ''}")
    return found


@contextlib.contextmanager
def observe(model: nn.Module, layer_names: Sequence[str] | None = None,
            percentile: float = 99.9) -> Iterator[dict[str, ChannelStats]]:
    """Collect ChannelStats of each named Linear's input while the block runs.

    `layer_names` default to the Wan main layers (`wan.main_linear_names`). Each
    forward call is one `ChannelStats.update` (so cond+uncond batched together
    form one call). The hooks are removed on exit, also when the block raises.
    """
    names = wan.main_linear_names(model) if layer_names is None else list(layer_names)
    linears = _resolve_linears(model, names)
    stats = {n: ChannelStats(m.in_features, percentile, device=m.weight.device) for n, m in linears.items()}
    handles = []
    try:
        for name, module in linears.items():
            handles.append(module.register_forward_pre_hook(_observer(stats[name])))
        yield stats
    finally:
        for h in handles:
            h.remove()


def _observer(stats: ChannelStats):
    def hook(module: nn.Module, args: tuple) -> None:
        stats.update(args[0].detach())
    return hook


# --------------------------------------------------------------------------- state

def expert_state(model: nn.Module, stats: Mapping[str, ChannelStats], config: CalibConfig) -> ExpertState:
    """Masks of one expert: wmax from the model's weights, a_c from its statistics.

    Built with `state.make_layer_state` (statistics rounded to their storage dtypes,
    the mask derived from the rounded values), so `state.remask` with the same
    settings reproduces the masks bit for bit (the clamp is MaskConfig's, fixed).
    """
    empty = [n for n, s in stats.items() if s.calls == 0]
    if empty:
        raise ValueError(f"{len(empty)} layer(s) never saw an input during calibration (e.g. {empty[0]}): "
                         f"was this expert ever called?")
    linears = _resolve_linears(model, list(stats))
    layers = {}
    for name in wan.main_linear_names(model):  # policy order, whatever order the stats came in
        if name not in stats:
            continue
        st = stats[name]
        layers[name] = make_layer_state(weight_absmax(linears[name].weight.detach()), st.absmax, st.tail,
                                        alpha=config.alpha, statistic=config.statistic)
    if set(layers) != set(stats):
        raise ValueError(f"statistics for layers that are not Wan main layers: {sorted(set(stats) - set(layers))[:5]}")
    return ExpertState(layers=layers, fingerprint=wan.fingerprint(model))


def build_state(experts: Mapping[str, tuple[nn.Module, Mapping[str, ChannelStats]]], config: CalibConfig,
                calibration: Mapping | None = None, extra: Mapping | None = None) -> PTQState:
    """PTQState from each expert's model and statistics.

    `calibration` (settings such as prompts, steps, cfg, seed, switch step) is stored
    as given, plus per-expert forward calls and tokens observed.
    """
    if not experts:
        raise ValueError("no experts to build a state from")
    variants = {name: wan.detect_variant(model) for name, (model, _) in experts.items()}
    kinds = {(v.family, v.variant) for v in variants.values()}
    if len(kinds) > 1:
        described = "; ".join(f"{n}: {v.describe()}" for n, v in variants.items())
        raise ValueError(f"experts are different models ({described})")
    family, variant = kinds.pop()
    calib = dict(calibration or {})
    calib["observed"] = {name: {"calls": max((s.calls for s in stats.values()), default=0),
                                "tokens": max((s.tokens for s in stats.values()), default=0)}
                         for name, (_, stats) in experts.items()}
    return PTQState(
        experts={name: expert_state(model, stats, config) for name, (model, stats) in experts.items()},
        alpha=float(config.alpha), percentile=float(config.percentile), statistic=config.statistic,
        rotation=hrotation.to_meta(config.rotation), model_family=family, model_variant=variant,
        calibration=calib, extra=dict(extra or {}))


def calibrate(experts: Mapping[str, nn.Module], run: Callable[[], None], config: CalibConfig = CalibConfig(),
              calibration: Mapping | None = None) -> PTQState:
    """Observe every expert's main layers while `run()` drives them, then build the state."""
    with contextlib.ExitStack() as stack:
        stats = {name: stack.enter_context(observe(model, percentile=config.percentile))
                 for name, model in experts.items()}
        with torch.no_grad():
            run()
    return build_state({name: (model, stats[name]) for name, model in experts.items()}, config, calibration)
