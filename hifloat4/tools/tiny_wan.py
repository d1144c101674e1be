"""Small initialised Wan2.2 experts and example inputs, for the tools and the tests.

`make_tiny_wan` builds a hifloat4.wan_model.WanModel and fills it with the recipe
of the comfy harness (shared/comfy_harness/make_tiny_models.py): trained-DiT-like
normal weights plus residual-stream outlier channels, FFN hidden outlier units and
heavy weight columns, so activations have the outlier channels real DiTs have.
With the defaults (dim 256, ffn 512, 4 layers, text_dim 4096, seed 0) the tensors
equal the harness's tiny_wan2.2_*.safetensors files before their fp16 cast.

text_dim defaults to the real 4096 (umT5-XXL width): it costs ~1M parameters at
this size, and keeps the state dict loadable by ComfyUI's WanModel and identical
to the harness models.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..wan_model import WanConfig, WanModel

VARIANT_CHANNELS = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}
VARIANT_EXPERTS = {
    "t2v": ("high_noise", "low_noise"),
    "i2v": ("high_noise", "low_noise"),
    "ti2v": ("single",),
}
# Seed offsets of the harness files (seed * 1000 + offset), one per expert.
_SEED_OFFSETS = {
    ("t2v", "high_noise"): 1,
    ("t2v", "low_noise"): 2,
    ("i2v", "high_noise"): 3,
    ("i2v", "low_noise"): 4,
    ("ti2v", "single"): 5,
}


def init_like_harness(model: nn.Module, seed: int, outlier_channels: int = 3,
                      outlier_scale: float = 8.0) -> None:
    """Fill every parameter in state-dict order with the harness recipe (in place).

    Normal weights with std 1/sqrt(fan_in); `outlier_channels` residual channels
    written `outlier_scale`x larger by patch_embedding/attn.o/ffn.2 (massive
    activations at every LayerNorm'd block input), as many ffn.0 rows scaled up
    (outlier channels at ffn.2's input), and that many 4x heavier input columns
    in every Linear weight. Modulations ~N(0, 1/dim), qk/norm3 gains ~1, biases small.
    """
    g = torch.Generator().manual_seed(seed)
    dim = model.patch_embedding.weight.shape[0]
    resid = torch.randperm(dim, generator=g)[:outlier_channels]
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in model.state_dict(keep_vars=True).items():
            shape = tuple(p.shape)
            if name.endswith("modulation"):
                t = torch.randn(shape, generator=g) / math.sqrt(dim)
            elif name.endswith(("norm_q.weight", "norm_k.weight", "norm3.weight")):
                t = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith(".bias"):
                t = 0.02 * torch.randn(shape, generator=g)
            else:
                t = torch.randn(shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:])))
                if len(shape) == 2 and outlier_channels > 0 and shape[1] > 8:
                    cols = torch.randperm(shape[1], generator=g)[:outlier_channels]
                    t[:, cols] *= 4.0
                if name == "patch_embedding.weight" or name.endswith(
                        ("self_attn.o.weight", "cross_attn.o.weight", "ffn.2.weight")):
                    t[resid] *= outlier_scale
                if name.endswith("ffn.0.weight"):
                    rows = torch.randperm(shape[0], generator=g)[:outlier_channels]
                    t[rows] *= outlier_scale
            params[name].copy_(t)


def make_tiny_wan(variant: str = "t2v", *, dim: int = 256, ffn_dim: int = 512, layers: int = 4,
                  text_dim: int = 4096, num_heads: int | None = None, seed: int = 0,
                  outlier_channels: int = 3, outlier_scale: float = 8.0, expert: str | None = None,
                  img_dim: int | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> WanModel:
    """Build an initialised tiny Wan2.2 model in eval mode without gradients.

    variant: "t2v" (in/out 16), "i2v" (in 36, out 16), "ti2v" (in/out 48).
    expert: "high_noise"/"low_noise" for t2v/i2v (default high_noise), "single" for
    ti2v (the default). Experts of a pair share shapes and differ in weights: the
    init seed is seed * 1000 + a per-(variant, expert) offset, as in the harness.
    """
    if variant not in VARIANT_CHANNELS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_CHANNELS)}, got {variant!r}")
    experts = VARIANT_EXPERTS[variant]
    expert = experts[0] if expert is None else expert
    if expert not in experts:
        raise ValueError(f"{variant} has experts {experts}, got {expert!r}")
    in_dim, out_dim = VARIANT_CHANNELS[variant]
    cfg = WanConfig(in_dim=in_dim, out_dim=out_dim, dim=dim, ffn_dim=ffn_dim, num_layers=layers,
                    num_heads=num_heads, text_dim=text_dim, img_dim=img_dim)
    model = WanModel(cfg)
    init_like_harness(model, seed * 1000 + _SEED_OFFSETS[(variant, expert)], outlier_channels, outlier_scale)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def example_inputs(model: WanModel, *, batch: int = 1, frames: int = 2, height: int = 8, width: int = 8,
                   text_len: int = 64, timestep: float = 500.0, seed: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Deterministic (x [B,in_dim,T,H,W], t [B], context [B,L,text_dim]) for a forward;
    context is scaled like umT5 features (std 0.2), as the harness does."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    dtype = model.patch_embedding.weight.dtype
    device = model.patch_embedding.weight.device
    x = torch.randn(batch, cfg.in_dim, frames, height, width, generator=g)
    ctx = 0.2 * torch.randn(batch, text_len, cfg.text_dim, generator=g)
    t = torch.full((batch,), float(timestep))
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype)
