"""Wan2.2 sampling, owned in one place: the flow-matching schedule, the two-expert
handoff (boundary sigma -> switch step), and a small deterministic sampler.

* `BOUNDARY_SIGMA`, `boundary_sigma(kind)`, `switch_step_from_sigmas`,
  `resolve_switch_step`: when the low-noise expert takes over. The ComfyUI
  Calibrate node, the demo and the evaluation all use these.
* `flow_sigmas(steps, shift)`: ComfyUI's "simple" schedule under ModelSamplingSD3.
* `sample_two_expert(...)`: flow-matching Euler, cfg with cond and uncond batched,
  high-noise expert before the switch step, low-noise after, deterministic by seed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .experts import HIGH, LOW

# Wan2.2 switches from the high-noise to the low-noise expert when the timestep
# t/1000 (= sigma for ComfyUI's flow sampling) drops below this boundary.
BOUNDARY_SIGMA = {"t2v": 0.875, "i2v": 0.9}


# --------------------------------------------------------------------------- handoff

def boundary_sigma(kind: str) -> float:
    """Boundary sigma for a Wan2.2 model kind ("t2v" / "i2v"; wan.detect_variant().kind)."""
    if kind not in BOUNDARY_SIGMA:
        raise ValueError(f"no Wan2.2 expert boundary for a {kind!r} model; "
                         f"two experts exist only for {sorted(BOUNDARY_SIGMA)}")
    return BOUNDARY_SIGMA[kind]


def switch_step_from_sigmas(sigmas: Sequence[float] | Tensor, boundary: float) -> int:
    """Steps run by the high-noise expert: those whose starting sigma is >= boundary
    (Wan2.2: `t >= boundary * 1000` selects the high-noise model). `sigmas` is the
    schedule including its final sigma, so the result is in [0, len(sigmas) - 1];
    len(sigmas) - 1 means "never switch"."""
    values = [float(s) for s in sigmas][:-1]
    return next((i for i, s in enumerate(values) if s < boundary), len(values))


def resolve_switch_step(switch_step: int, sigmas: Sequence[float], boundary: float | None) -> int:
    """The step at which the low-noise expert takes over. -1 derives it from the
    boundary sigma; either way both experts must run at least one step, because the
    calibration has to observe both."""
    if switch_step < -1:
        raise ValueError(f"switch_step must be -1 (from the boundary sigma) or a step index, got {switch_step}")
    steps = len(sigmas) - 1
    step = switch_step_from_sigmas(sigmas, boundary) if switch_step == -1 else switch_step
    if not 0 < step < steps:
        how = (f"the boundary sigma {boundary} gives step {step}" if switch_step == -1
               else f"switch_step {step} was given")
        raise ValueError(f"with {steps} steps {how}, so one expert would never run and could not be "
                         f"calibrated; use more steps or a switch_step between 1 and {steps - 1}")
    return step


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
                      cfg: float = 5.0, seed: int = 0, shift: float = 5.0, boundary: float = BOUNDARY_SIGMA["t2v"],
                      callback: Callable[[StepRecord], None] | None = None) -> Tensor:
    """Sample a Wan2.2 latent from pure noise with flow-matching Euler; returns it (fp32).

    x_0 = sigma_0 * noise (empty latent), v = guide(model(x, sigma * 1000, ctx)),
    x <- x + v * (sigma_next - sigma). `high` runs steps < switch_step, `low` the rest
    (`low=None`: a single-model Wan, `high` runs every step). `switch_step=None`
    derives it from `boundary`. `callback(StepRecord)` sees every step.
    """
    sigmas = flow_sigmas(steps, shift)
    if switch_step is None:
        switch_step = switch_step_from_sigmas(sigmas, boundary) if low is not None else steps
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
