"""The Wan2.x video DiT in plain torch, with ComfyUI's module naming and key layout.

Why: every layer name, weight shape and state-dict key must be the ones ComfyUI's
`comfy.ldm.wan.model.WanModel` uses, so calibration states, fingerprints and the
layer policy (hifloat4.wan) carry over to real checkpoints unchanged. The
checkpoint loader builds it on the meta device to know a Wan transformer's exact
key set; the tools build small ones (hifloat4.tools.tiny_wan) to test and
demonstrate the quantization without ComfyUI.

Architecture (same maths as WanModel for a per-sample timestep):
  patch_embedding Conv3d(in_dim, dim, patch (1,2,2)) -> tokens
  time_embedding(sinusoid(freq_dim, t)) -> e ; time_projection(e) -> 6 modulation vectors
  text_embedding(context) -> cross-attention context
  blocks.N: adaLN self-attention (RMS qk-norm, 3-axis RoPE) -> cross-attention (norm3)
            -> adaLN GELU(tanh) FFN, gated residuals
  head: adaLN LayerNorm + Linear(dim, out_dim * prod(patch)) -> unpatchify
`t` is ComfyUI's Wan timestep (sigma * 1000). For I2V-A14B the 20 conditioning
channels (4 mask + 16 image latent) are concatenated to the 16-channel latent, as
ComfyUI does with c_concat, so the input has 36 channels and the output 16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class WanConfig:
    """Shape hyper-parameters, named as WanModel's constructor names them."""

    in_dim: int = 16
    out_dim: int = 16
    dim: int = 256
    ffn_dim: int = 512
    num_layers: int = 4
    num_heads: int | None = None  # None: dim // 128 (what ComfyUI's model detection assumes)
    text_dim: int = 4096
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    img_dim: int | None = None  # Wan2.1-I2V style CLIP image branch (img_emb, k_img/v_img); None for Wan2.2

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else max(1, self.dim // 128)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def sinusoidal_embedding(dim: int, position: Tensor) -> Tensor:
    """[cos | sin] embedding of positions (N,) -> (N, dim) fp32, Wan's layout."""
    half = dim // 2
    position = position.float()
    freqs = torch.pow(10000.0, -torch.arange(half, device=position.device, dtype=torch.float32) / half)
    angles = torch.outer(position, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0,
                device=None) -> Tensor:
    """Angles (L, head_dim/2) of Wan's 3-axis RoPE: the head dim is split into
    frame/height/width parts of sizes d-4(d//6), 2(d//6), 2(d//6)."""
    d6 = head_dim // 6
    axes = (head_dim - 4 * d6, 2 * d6, 2 * d6)
    f, h, w = grid
    pos = torch.stack(torch.meshgrid(
        torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device),
        indexing="ij"), dim=-1).reshape(-1, 3).float()
    parts = []
    for i, a in enumerate(axes):
        if a == 0:
            continue
        omega = 1.0 / theta ** (torch.arange(0, a, 2, device=device, dtype=torch.float64) / a)
        parts.append(pos[:, i:i + 1] * omega.float())
    return torch.cat(parts, dim=1)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate adjacent pairs of x[..., L, heads, d] by angles (L, d/2), in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    cos = torch.cos(angles)[:, None, :]
    sin = torch.sin(angles)[:, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).type_as(x)


def _attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Softmax attention over [B, L, heads*d] tensors (q may be [B, L, heads, d])."""
    q, k, v = (rearrange(t.flatten(2), "b l (h d) -> b h l d", h=heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        b, s = x.shape[:2]
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, self.heads, -1), angles)
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, self.heads, -1), angles)
        return self.o(_attention(q, k, self.v(x), self.heads))


class CrossAttention(nn.Module):
    """Text cross-attention; with `img` also the Wan2.1-I2V image branch (k_img, v_img)."""

    def __init__(self, dim: int, heads: int, eps: float, img: bool = False):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if img:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor, context_img: Tensor | None = None) -> Tensor:
        q = self.norm_q(self.q(x))
        out = _attention(q, self.norm_k(self.k(context)), self.v(context), self.heads)
        if context_img is not None and hasattr(self, "k_img"):
            out = out + _attention(q, self.norm_k_img(self.k_img(context_img)),
                                   self.v_img(context_img), self.heads)
        return self.o(out)


class WanBlock(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        dim = cfg.dim
        # Registration order mirrors WanAttentionBlock so state_dict key order matches too.
        self.norm1 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.heads, cfg.eps, img=cfg.img_dim is not None)
        self.norm2 = nn.LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x: Tensor, e0: Tensor, angles: Tensor, context: Tensor,
                context_img: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.to(x.dtype) + e0).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, angles) * gate1
        x = x + self.cross_attn(self.norm3(x), context, context_img)
        return x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2


class Head(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation.to(x.dtype) + e[:, None, :]).chunk(2, dim=1)
        return self.head(self.norm(x) * (1 + scale) + shift)


class MLPProj(nn.Module):
    """Wan2.1-I2V CLIP feature projection (img_emb.proj.*)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class WanModel(nn.Module):
    """Wan DiT denoiser: forward(x [B,in_dim,T,H,W], t [B], context [B,L,text_dim])
    -> velocity [B,out_dim,T,H,W]. Any size works (meta device for real sizes)."""

    def __init__(self, cfg: WanConfig):
        super().__init__()
        if cfg.dim % cfg.heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.heads} heads of even size")
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.img_emb = MLPProj(cfg.img_dim, dim) if cfg.img_dim is not None else None

    def forward(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None,
                clip_fea: Tensor | None = None) -> Tensor:
        """`y`: optional conditioning channels concatenated to x (ComfyUI's c_concat);
        `clip_fea`: CLIP image features [B, N, img_dim] for the img_emb branch."""
        cfg = self.config
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.ndim != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"expected x [B, {cfg.in_dim}, T, H, W], got {tuple(x.shape)}")
        if any(s % p for s, p in zip(x.shape[2:], cfg.patch_size)):
            raise ValueError(f"T, H, W {tuple(x.shape[2:])} must be multiples of the patch {cfg.patch_size}")
        dtype = self.patch_embedding.weight.dtype
        h = self.patch_embedding(x.to(dtype))
        grid = tuple(h.shape[2:])
        h = h.flatten(2).transpose(1, 2)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)
        e = self.time_embedding(sinusoidal_embedding(cfg.freq_dim, t).to(dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim))
        ctx = self.text_embedding(context.to(dtype))
        ctx_img = None
        if self.img_emb is not None and clip_fea is not None:
            ctx_img = self.img_emb(clip_fea.to(dtype))
        angles = rope_angles(grid, cfg.head_dim, device=x.device)
        for block in self.blocks:
            h = block(h, e0, angles, ctx, ctx_img)
        return self.unpatchify(self.head(h, e), grid)

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, L, prod(patch)*out_dim] (channel-last within a patch, as WanModel) -> video."""
        cfg = self.config
        (f, h, w), (p, q, r) = grid, cfg.patch_size
        return rearrange(x, "b (f h w) (p q r c) -> b c (f p) (h q) (w r)", f=f, h=h, w=w, p=p, q=q, r=r)
