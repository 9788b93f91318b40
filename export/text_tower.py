"""The jina-clip-v2 text tower (XLM-RoBERTa with rotary attention), written for export.

Export-friendly choices, each leaving the maths of the official model unchanged:
- LoRA adapter, token-type embedding and the 1/sqrt(head_dim) query scale are folded into
  the weights when they are loaded (see `weights.py`), so the graph has none of them;
- the padding mask becomes one additive float bias [B, 1, 1, L] computed once;
- RoPE is two multiply-adds per layer against precomputed cos/sin tables sliced to L;
- q and k are rotated together as one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TextConfig
from .rope import apply_rope, text_rope_tables

MASK_BIAS = -10000.0  # the official CPU path's additive mask value (not -inf)


class TextLayer(nn.Module):
    """Post-LN block: h = LN(h + attn(h)); h = LN(h + mlp(h))."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = nn.GELU()

    def forward(
        self, h: torch.Tensor, bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        batch, length, width = h.shape
        qkv = self.qkv(h).view(batch, length, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # [3, B, heads, L, head_dim]
        qk = apply_rope(qkv[:2], cos, sin)
        scores = torch.matmul(qk[0], qk[1].transpose(-1, -2)) + bias
        context = torch.matmul(scores.softmax(dim=-1), qkv[2])
        context = context.transpose(1, 2).reshape(batch, length, width)
        h = self.norm1(h + self.out_proj(context))
        return self.norm2(h + self.fc2(self.act(self.fc1(h))))


class TextTower(nn.Module):
    """input_ids, attention_mask [B, L] int64 -> pooled embedding [B, D] or token states."""

    def __init__(self, cfg: TextConfig, pooled: bool = True) -> None:
        super().__init__()
        self.pooled = pooled
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(TextLayer(cfg) for _ in range(cfg.num_layers))
        cos, sin = text_rope_tables(cfg.head_dim, cfg.rotary_base, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        mask = attention_mask.to(torch.float32)
        bias = ((1.0 - mask) * MASK_BIAS)[:, None, None, :]
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        h = self.emb_ln(self.word_embeddings(input_ids))
        for layer in self.layers:
            h = layer(h, bias, cos, sin)
        if not self.pooled:
            return h
        # Masked mean over tokens (<s> and </s> included, padding excluded) as one MatMul.
        summed = torch.matmul(mask[:, None, :], h)[:, 0, :]
        return summed / mask.sum(dim=1, keepdim=True)
