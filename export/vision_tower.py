"""The jina-clip-v2 vision tower (EVA02 ViT with 2D RoPE), written for export.

Export-friendly choices, each leaving the maths of the official model unchanged:
- q, k and v projections are one MatMul (k gets a zero bias), the SwiGLU w1/w2 one MatMul;
- the 2D RoPE is the half-split multiply-add form: the interleaved pairs were moved apart by
  permuting q/k rows per head at load time, and the CLS token takes an identity rotation
  instead of being split off and concatenated back in every block;
- the query scale is folded into the q weights; `cls_token + pos_embed[0]` is pre-added;
- the final LayerNorm runs on the CLS token only when the graph pools.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig
from .rope import apply_rope, vision_rope_tables


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_width
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.inner_attn_ln = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, T, head_dim]
        qk = apply_rope(qkv[:2], cos, sin)
        scores = torch.matmul(qk[0], qk[1].transpose(-1, -2))
        context = torch.matmul(scores.softmax(dim=-1), qkv[2])
        context = context.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj(self.inner_attn_ln(context))


class SwiGLU(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.hidden = cfg.mlp_hidden
        self.w12 = nn.Linear(cfg.width, 2 * cfg.mlp_hidden)
        self.ffn_ln = nn.LayerNorm(cfg.mlp_hidden, eps=cfg.layer_norm_eps)
        self.w3 = nn.Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).split(self.hidden, dim=-1)
        return self.w3(self.ffn_ln(nn.functional.silu(gate) * value))


class VisionBlock(nn.Module):
    """Pre-LN block: x = x + attn(LN(x)); x = x + mlp(LN(x))."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    """pixel_values [B, 3, S, S] float32 -> CLS embedding [B, D] or token states [B, T, D]."""

    def __init__(self, cfg: VisionConfig, pooled: bool = True) -> None:
        super().__init__()
        self.pooled = pooled
        num_patches = cfg.grid_size**2
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_embed = nn.Parameter(torch.zeros(1, 1, cfg.width))  # cls_token + pos_embed[0]
        self.patch_pos_embed = nn.Parameter(torch.zeros(1, num_patches, cfg.width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        cos, sin = vision_rope_tables(
            cfg.head_width, cfg.grid_size, cfg.pt_hw_seq_len, cfg.rope_theta, cfg.intp_freq
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        patches = patches + self.patch_pos_embed
        x = torch.cat([self.cls_embed.expand(patches.shape[0], -1, -1), patches], dim=1)
        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin)
        if not self.pooled:
            return self.norm(x)
        return self.norm(x[:, 0])
