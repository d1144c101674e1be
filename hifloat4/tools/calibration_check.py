"""The GPU check's `calibration` section: what calibrating a Wan2.2-A14B
expert costs, measured rather than estimated.

  observed_block_over_plain  time of one Wan block's forward with a LayerObservation on
                             each main layer (what the ComfyUI observers and
                             hifloat4.calibrate.observe feed) over the same forward
                             without; A14B at 480p on CUDA (32,760 tokens x 2 for cfg,
                             dim 5120, ffn 13824, 512 text tokens), small sizes on CPU
  state_build_s              hifloat4.calibrate.expert_state for one expert at real
                             layer shapes (40 blocks x 10 main layers on CUDA; small on CPU)
  sample_bytes               memory that expert's token samples hold (rows shared by
                             layers reading one input counted once)
  peak_extra_bytes           the observed block's peak memory above the plain block's
On CUDA the observed forward also runs once under torch.cuda.set_sync_debug_mode("error")
(`sync_free`: True, or what synchronised); the CPU has no such mode.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .. import wan
from ..calibrate import CalibConfig, ExpertObservation, LayerObservation, expert_state
from ..sensitivity import held_bytes
from ..wan_model import WanBlock, WanConfig, WanModel, rope_angles
from .bench import best_seconds, peak_forward_bytes

# A block's main layers and which input each reads: q/k/v of self-attention one normed
# x, k/v of cross-attention the text context (the same tensor in every block).
_INPUTS = {"self_attn.q": "x", "self_attn.k": "x", "self_attn.v": "x", "self_attn.o": "attn",
           "cross_attn.q": "xc", "cross_attn.k": "context", "cross_attn.v": "context",
           "cross_attn.o": "cross", "ffn.0": "xf", "ffn.2": "hidden"}
MAIN_LINEARS = wan.MAIN_SUFFIXES
assert set(_INPUTS) == set(MAIN_LINEARS)
A14B = WanConfig(dim=5120, ffn_dim=13824, num_layers=40, text_dim=4096)
SMALL = WanConfig(dim=256, ffn_dim=512, num_layers=2, num_heads=2, text_dim=64)


def _observed(block: nn.Module, config: CalibConfig) -> tuple[dict[str, LayerObservation], list]:
    """A LayerObservation on each main Linear of `block`, fed by a forward pre-hook, as the
    ComfyUI observers feed theirs; returns them and the hook handles."""
    observations, handles = {}, []
    for name in MAIN_LINEARS:
        linear = block.get_submodule(name)
        obs = LayerObservation(linear.in_features, config, device=linear.weight.device)
        handles.append(linear.register_forward_pre_hook(lambda m, args, obs=obs: obs.update(args[0])))
        observations[name] = obs
    return observations, handles


def _sync_free(fn: Callable[[], object]) -> bool | str:
    """True when fn() (already warmed up) queues its CUDA work without a host sync."""
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        fn()
    except RuntimeError as e:
        return f"synchronised: {e}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return True


def observed_block(device: torch.device, cfg: WanConfig, grid: tuple[int, int, int], batch: int,
                   text_len: int, repeat: int) -> dict:
    """One bf16 Wan block with and without observers: time ratio, extra peak memory and,
    on CUDA, whether the observed forward is free of host syncs."""
    torch.manual_seed(0)
    with torch.device(device):
        block = WanBlock(cfg).to(torch.bfloat16).eval()
        x = torch.randn(batch, grid[0] * grid[1] * grid[2], cfg.dim, dtype=torch.bfloat16)
        e0 = torch.randn(batch, 6, cfg.dim, dtype=torch.bfloat16) * 0.1
        context = torch.randn(batch, text_len, cfg.dim, dtype=torch.bfloat16)
        angles = rope_angles(grid, cfg.head_dim, device=device)
    forward = lambda: block(x, e0, angles, context, None)  # noqa: E731
    with torch.no_grad():
        plain_s = best_seconds(forward, repeat, device)
        plain_peak = peak_forward_bytes(forward, device)
        _, handles = _observed(block, CalibConfig())
        try:
            observed_s = best_seconds(forward, repeat, device)
            observed_peak = peak_forward_bytes(forward, device)
            sync_free = _sync_free(forward) if device.type == "cuda" else "not applicable on cpu"
        finally:
            for h in handles:
                h.remove()
    return {"observed_block_over_plain": observed_s / plain_s, "plain_ms": plain_s * 1e3,
            "observed_ms": observed_s * 1e3, "peak_extra_bytes": observed_peak - plain_peak,
            "sync_free": sync_free}


def _observed_expert(device: torch.device, cfg: WanConfig, calls: int, tokens: int,
                     config: CalibConfig) -> ExpertObservation:
    """An expert's observations as a calibration leaves them, at cfg's layer shapes: each
    layer saw `calls` calls of `tokens` random bf16 tokens, the inputs shared as in Wan
    (q/k/v one x, every block's cross-attention k/v one context). The model is a meta
    WanModel (names and shapes only); each layer's weight is a random bf16 tensor of its
    shape (one per shape, reused: the build's work does not depend on the values)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    names = wan.main_linear_names(model)
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    g = torch.Generator(device).manual_seed(0)
    weights = {s: torch.randn(s, generator=g, device=device).to(torch.bfloat16) for s in set(shapes.values())}
    layers = {n: LayerObservation(shapes[n][1], config, device=device) for n in names}
    for _ in range(calls):
        context = torch.randn(tokens, cfg.dim, generator=g, device=device).to(torch.bfloat16)
        for b in range(cfg.num_layers):
            inputs: dict[str, Tensor] = {"context": context}
            for layer in MAIN_LINEARS:
                name, kind = f"blocks.{b}.{layer}", _INPUTS[layer]
                if kind not in inputs:
                    inputs[kind] = torch.randn(tokens, shapes[name][1], generator=g, device=device).to(torch.bfloat16)
                layers[name].update(inputs[kind])
    return ExpertObservation(model, layers, weight=lambda n: weights[shapes[n]], fingerprint={})


def state_build(device: torch.device, cfg: WanConfig, config: CalibConfig = CalibConfig()) -> dict:
    """Seconds of one expert_state for one expert (after a one-block warm-up that compiles
    the kernels) and the bytes its token samples hold."""
    per_call = 16
    ex = _observed_expert(device, cfg, calls=-(-config.sample_tokens // per_call), tokens=per_call, config=config)
    first = {n: o for n, o in ex.layers.items() if n.startswith("blocks.0.")}
    expert_state(ExpertObservation(ex.model, first, ex.weight, ex.fingerprint), config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    expert_state(ex, config)  # ends with the errors' transfer to the host: nothing left queued
    state_s = time.perf_counter() - start
    return {"state_build_s": state_s, "sample_bytes": held_bytes(o.sample for o in ex.layers.values()),
            "layers": len(ex.layers)}


def calibration_section(device: torch.device, small: bool) -> dict:
    """The four figures, then the details they come from."""
    if small:
        block = observed_block(device, WanConfig(dim=256, ffn_dim=512, num_layers=1, num_heads=2),
                               (2, 4, 4), batch=2, text_len=16, repeat=2)
        build = state_build(device, SMALL)
    else:  # Wan2.2-A14B at 480p, 81 frames: 21 x 30 x 52 = 32,760 tokens, x 2 for cfg
        block = observed_block(device, WanConfig(dim=5120, ffn_dim=13824, num_layers=1),
                               (21, 30, 52), batch=2, text_len=512, repeat=3)
        build = state_build(device, A14B)
    return {"observed_block_over_plain": block.pop("observed_block_over_plain"),
            "state_build_s": build.pop("state_build_s"), "sample_bytes": build.pop("sample_bytes"),
            "peak_extra_bytes": block.pop("peak_extra_bytes"), "block": block, "state_build": build}
