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
* `layers_from_state(state, expert)` - the `LayerQuant` map for `linear.quantize_`.
* `sample_two_expert(...)` - a small Wan2.2 sampler (flow-matching Euler, ComfyUI's
  "simple" schedule under ModelSamplingSD3 shift, cfg with cond and uncond batched,
  high-noise expert before the switch step, low-noise after), deterministic by seed.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import wan
from .experts import HIGH, LOW  # the expert names live in one place
from .linear import LayerQuant
from .rotation import Rotation
from .smoothing import MaskConfig, Statistic, weight_absmax
from .state import ExpertState, PTQState, make_layer_state
from .stats import ChannelStats

WAN22_BOUNDARY = {"t2v": 0.875, "i2v": 0.9}  # sigma at which Wan2.2-A14B hands over to the low-noise expert


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

def _rotation_meta(rotation: Rotation | None) -> dict | None:
    return None if rotation is None else {"block": rotation.block, "seed": rotation.seed}


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
        rotation=_rotation_meta(config.rotation), model_family=family, model_variant=variant,
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


def state_rotation(state: PTQState) -> Rotation | None:
    """The Rotation a state's metadata describes (None without one)."""
    return None if state.rotation is None else Rotation(block=int(state.rotation["block"]),
                                                        seed=int(state.rotation["seed"]))


def layers_from_state(state: PTQState, expert: str) -> dict[str, LayerQuant]:
    """{layer: LayerQuant(mask, rotation)} of one expert, ready for linear.quantize_."""
    if expert not in state.experts:
        raise KeyError(f"state has no expert {expert!r}; it has {state.expert_names}")
    rotation = state_rotation(state)
    return {name: LayerQuant(mask=ls.mask, rotation=rotation) for name, ls in state.experts[expert].layers.items()}


# --------------------------------------------------------------------------- sampling

def flow_sigmas(steps: int, shift: float = 5.0) -> Tensor:
    """(steps + 1,) float64 sigmas of ComfyUI's "simple" scheduler on ModelSamplingSD3(shift):
    s_i = 1 - floor(i * 1000 / steps) / 1000 (linear from 1 towards 0 on the model's
    1000-step grid), sigma = shift * s / (1 + (shift - 1) * s), and a final 0."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an int in [1, 1000], got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    s = torch.tensor([(1000 - math.floor(i * (1000 / steps))) / 1000 for i in range(steps)], dtype=torch.float64)
    sigmas = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def switch_step_from_boundary(sigmas: Sequence[float] | Tensor, boundary: float = 0.875) -> int:
    """Index of the first step whose starting sigma is below `boundary` (Wan2.2 runs the
    high-noise expert while t >= boundary * 1000). `sigmas` includes the final sigma,
    so the result is in [0, len(sigmas) - 1]; len(sigmas) - 1 means "never switch"."""
    values = [float(s) for s in sigmas][:-1]
    return next((i for i, s in enumerate(values) if s < boundary), len(values))


@dataclass
class StepRecord:
    """What the sampler saw at one step (handed to `callback`)."""

    step: int
    sigma: float
    sigma_next: float
    expert: str  # HIGH or LOW
    x: Tensor  # the latent entering the step
    model_output: Tensor  # raw velocity of the batched call: [cond; uncond] (cond only when cfg == 1)
    velocity: Tensor  # the guided velocity the Euler step uses
    extras: dict = field(default_factory=dict)


def denoiser_batch(x: Tensor, sigma: float, context: Tensor, negative_context: Tensor | None,
                   cfg: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x, timestep, context) of one model call: cond and uncond batched when cfg != 1.
    The timestep is ComfyUI's Wan timestep, sigma * 1000."""
    b = x.shape[0]
    ctx = context.expand(b, *context.shape[1:]) if context.shape[0] == 1 else context
    if cfg != 1.0:
        if negative_context is None:
            raise ValueError("cfg != 1 needs a negative context")
        neg = negative_context.expand(b, *negative_context.shape[1:]) if negative_context.shape[0] == 1 \
            else negative_context
        x, ctx = torch.cat([x, x]), torch.cat([ctx, neg.to(ctx.dtype)])
    t = torch.full((x.shape[0],), float(sigma) * 1000.0, dtype=torch.float32, device=x.device)
    return x, t, ctx


def guide(model_output: Tensor, cfg: float) -> Tensor:
    """uncond + cfg * (cond - uncond) from a [cond; uncond] batch (identity when cfg == 1)."""
    if cfg == 1.0:
        return model_output
    cond, uncond = model_output.chunk(2)
    return uncond + cfg * (cond - uncond)


def expert_call(model: nn.Module, x: Tensor, sigma: float, context: Tensor, negative_context: Tensor | None,
                cfg: float) -> Tensor:
    """The raw batched model output at one step (the quantity the demo compares)."""
    xb, t, ctx = denoiser_batch(x, sigma, context, negative_context, cfg)
    return model(xb, t, ctx).float()


def initial_noise(latent_shape: Sequence[int], seed: int) -> Tensor:
    """Standard normal noise from a CPU generator: the same on every machine for a seed."""
    return torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(seed)))


@torch.no_grad()
def sample_two_expert(high: nn.Module, low: nn.Module | None, latent_shape: Sequence[int], context: Tensor,
                      negative_context: Tensor | None, steps: int, switch_step: int | None = None,
                      cfg: float = 5.0, seed: int = 0, shift: float = 5.0, boundary: float = 0.875,
                      callback: Callable[[StepRecord], None] | None = None) -> Tensor:
    """Sample a Wan2.2 latent from pure noise with flow-matching Euler; returns it (fp32).

    x_0 = sigma_0 * noise (empty latent), v = guide(model(x, sigma * 1000, ctx)),
    x <- x + v * (sigma_next - sigma). `high` runs steps < switch_step, `low` the rest
    (`low=None`: a single-model Wan, `high` runs every step). `switch_step=None`
    derives it from `boundary`. `callback(StepRecord)` sees every step.
    """
    sigmas = flow_sigmas(steps, shift)
    if switch_step is None:
        switch_step = switch_step_from_boundary(sigmas, boundary) if low is not None else steps
    if not 0 <= switch_step <= steps:
        raise ValueError(f"switch_step must be in [0, {steps}], got {switch_step}")
    if low is None and switch_step < steps:
        raise ValueError("switch_step < steps needs a low-noise expert")
    device = next(high.parameters()).device
    x = initial_noise(latent_shape, seed).to(device) * float(sigmas[0])
    context = context.to(device)
    negative_context = None if negative_context is None else negative_context.to(device)
    for i in range(steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        name, model = (HIGH, high) if i < switch_step else (LOW, low)
        out = expert_call(model, x, sigma, context, negative_context, cfg)
        v = guide(out, cfg)
        if callback is not None:
            callback(StepRecord(i, sigma, sigma_next, name, x, out, v))
        x = x + v * (sigma_next - sigma)
    return x
