"""A tiny Wan2.2 expert with token-wise massive activations (for `python -m hifloat4 eval`).

Why: Tail-Aware HiFloat4's premise is that a few tokens carry activations 100-1000x
the median in a few fixed channels ("massive activations", documented for large
transformers and DiTs), so the max of a channel is set by them and a percentile is
not. The harness init of `make_tiny_wan` has channel-wise outliers only (every
token is large in the outlier channels), where tail and max masks nearly coincide.
`add_massive_tokens` turns a harness-initialised WanModel into one whose blocks see
massive tokens, built the way a real DiT can produce them:

* sink tokens: a learned absolute position embedding that is non-zero at two fixed
  token positions per sample only (`sink_positions`: the first token and the centre
  token of the first latent frame), added right after the patch embedding (as DiTs
  with learned position embeddings or register tokens do). It writes `register` into
  `channels` residual-stream channels, so those tokens enter every block massive;
* quiet massive channels: ordinary tokens are small there (the writers into them,
  patch embedding, attention output projections and ffn.2, have those rows scaled
  by `quiet`; adaLN shift and scale leave them alone), as in LLMs, where the
  massive dimensions are ordinary-sized for ordinary tokens;
* a massive FFN unit per block: one hidden unit of ffn.0 reads the massive
  channels with weight `unit_gain`, so at the sinks its GELU output, the ffn.2
  input, is ~300 while it is O(1) on ordinary tokens: the down-projection inputs
  that carry the largest token-wise outliers in real transformers.

After LayerNorm a token's value is bounded by sqrt(dim / channels) (8 here, ~50 for
Wan2.2-A14B's dim 5120), so the q/k/v/ffn.0 inputs see the sinks at ~8 against ~0.07
for ordinary tokens; ffn.2 inputs and the residual stream see 100-1000x and more.
The layer names, shapes and state-dict keys stay those of the harness model (the
position embedding is a non-persistent buffer), and every weight stays bf16-exact
(`quiet` is a power of two, `register` and `unit_gain` are bf16 numbers).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..wan_model import WanModel

MODULATED = (0, 1, 3, 4)  # adaLN chunks shift1, scale1, shift2, scale2 (gates 2 and 5 untouched)


@dataclass(frozen=True)
class MassiveSpec:
    """How massive the sink tokens are (fixed before any evaluation result was seen)."""

    channels: int = 2  # residual-stream channels carrying the massive values
    register: float = 200.0  # the position embedding's value in each of them at the sink positions
    quiet: float = 0.125  # ordinary tokens' scale in those channels (a power of two: bf16-exact)
    unit_gain: float = 20.0  # ffn.0 weight from each massive channel into the massive hidden unit
    seed: int = 23  # which channels and units


@dataclass(frozen=True)
class MassiveLayout:
    """Where one model's massive activations live."""

    channels: tuple[int, ...]  # residual-stream channels
    units: tuple[int, ...]  # per block: the ffn hidden unit (an ffn.2 input channel)


def sink_positions(grid: Sequence[int]) -> list[int]:
    """The sink tokens' indices in a sample's token sequence of a (frames, height, width)
    patch grid: the first token and the centre token of the first frame."""
    _, h, w = (int(s) for s in grid)
    return sorted({0, (h // 2) * w + w // 2})


class SinkPatchEmbedding(nn.Conv3d):
    """Wan's patch embedding plus a position embedding that is `register` at the sink
    positions and zero elsewhere (a non-persistent buffer: the state dict is unchanged)."""

    layout: MassiveLayout

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        flat = out.flatten(2)  # [B, dim, tokens], a view of the fresh conv output
        pos = torch.tensor(sink_positions(out.shape[2:]), device=out.device)
        flat[:, :, pos] += self.register.to(out.dtype)[None, :, None]
        return out


def _pick(norms: Tensor, k: int, g: torch.Generator) -> list[int]:
    """k indices, seeded, one in each of k equal slices of the index range (so the massive
    channels fall in different 64-value HiF4 groups, as two random channels of a real
    model's 5120 almost surely do), each with a row norm at most the median (so never
    one of the harness's scaled-up outlier rows)."""
    quiet = norms <= norms.median()
    picked = []
    for part in torch.arange(len(norms)).chunk(k):
        candidates = part[quiet[part]]
        picked.append(int(candidates[torch.randint(len(candidates), (1,), generator=g)]))
    return picked


def add_massive_tokens(model: WanModel, spec: MassiveSpec = MassiveSpec()) -> MassiveLayout:
    """Give a harness-initialised WanModel sink tokens with massive activations (in place)."""
    g = torch.Generator().manual_seed(spec.seed)
    dim = model.config.dim
    pe = model.patch_embedding
    channels = _pick(pe.weight.detach().flatten(1).norm(dim=1), spec.channels, g)
    idx = torch.tensor(channels)
    writers = [pe] + [m for b in model.blocks for m in (b.self_attn.o, b.cross_attn.o, b.ffn[2])]
    units = []
    with torch.no_grad():
        for m in writers:
            m.weight[idx] *= spec.quiet
            m.bias[idx] *= spec.quiet
        proj = model.time_projection[1]
        for k in MODULATED:
            proj.weight[idx + k * dim] = 0.0
            proj.bias[idx + k * dim] = 0.0
            for b in model.blocks:
                b.modulation[0, k, idx] = 0.0
        for b in model.blocks:
            w0 = b.ffn[0].weight
            unit = _pick(w0.detach().norm(dim=1), 1, g)[0]
            w0[unit, idx] = spec.unit_gain
            units.append(unit)
    layout = MassiveLayout(tuple(channels), tuple(units))
    sink = SinkPatchEmbedding(pe.in_channels, pe.out_channels, pe.kernel_size, pe.stride,
                              device=pe.weight.device, dtype=pe.weight.dtype)
    sink.load_state_dict(pe.state_dict())
    register = torch.zeros(dim, dtype=pe.weight.dtype, device=pe.weight.device)
    register[idx] = spec.register
    sink.register_buffer("register", register, persistent=False)
    sink.layout = layout
    model.patch_embedding = sink.requires_grad_(False)
    return layout


def layout_of(model: nn.Module) -> MassiveLayout:
    """The MassiveLayout of a model made by add_massive_tokens (also of a deep copy)."""
    pe = getattr(model, "patch_embedding", None)
    if not isinstance(pe, SinkPatchEmbedding):
        raise ValueError("not a model with massive tokens (see add_massive_tokens)")
    return pe.layout
