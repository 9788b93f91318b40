"""Strict mapping of a jina-clip-v2 checkpoint onto the export towers.

Every checkpoint tensor is consumed or on `KNOWN_UNUSED`; a missing, unexpected or mis-shaped
tensor is a `CheckpointError` naming it. The LoRA adapter the official model always applies
(model-facts 3.9) is merged here, and so are other constant folds that leave the maths
unchanged: token-type row 0 into the word table, q scale into q rows, q/k row permutation for
the vision RoPE. Tensors are upcast to float32 (the real checkpoint is bf16).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from clipedge.errors import ClipEdgeError

from .config import ClipConfig, TextConfig, VisionConfig
from .rope import interleaved_to_half_split
from .text_tower import TextTower
from .vision_tower import VisionTower

TEXT_PREFIX = "text_model.transformer.roberta."
VISION_PREFIX = "vision_model."
KNOWN_UNUSED = frozenset({"logit_scale"})


class CheckpointError(ClipEdgeError, ValueError):
    """The checkpoint's tensors do not match the jina-clip-v2 architecture of its config."""


class TensorStore:
    """Checkpoint tensors with use tracking, so strictness can be checked at the end."""

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        get: Callable[[str], torch.Tensor],
    ) -> None:
        self._shapes = shapes
        self._names = set(shapes)
        self._get = get
        self._used: set[str] = set()

    def peek_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._names:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return tuple(self._shapes[name])

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._names:
            raise CheckpointError(f"checkpoint is missing tensor {name!r} (expected {shape})")
        if self.peek_shape(name) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {self.peek_shape(name)}, expected {tuple(shape)}"
            )
        self._used.add(name)
        return self._get(name).to(torch.float32)

    def check_all_used(self, prefixes: Iterable[str]) -> None:
        """Fail on tensors of a loaded tower that were not used, or that belong to no tower."""
        loaded = tuple(prefixes)
        known = (TEXT_PREFIX, VISION_PREFIX)
        leftover = sorted(
            name
            for name in self._names - self._used - KNOWN_UNUSED
            if name.startswith(loaded) or not name.startswith(known)
        )
        if leftover:
            shown = ", ".join(repr(n) for n in leftover[:10])
            more = f" and {len(leftover) - 10} more" if len(leftover) > 10 else ""
            raise CheckpointError(f"checkpoint has unexpected tensors: {shown}{more}")


def _merged_linear(store: TensorStore, prefix: str, out_f: int, in_f: int, cfg: TextConfig):
    """W_eff = W + B @ A * alpha/rank for a LoRA-parametrised nn.Linear (see `_merge`)."""
    base = f"{prefix}.parametrizations.weight"
    weight = store.take(f"{base}.original", (out_f, in_f))
    lora_a = store.take(f"{base}.0.lora_A", (_adapters(store, base), cfg.lora_rank, in_f))
    lora_b = store.take(f"{base}.0.lora_B", (lora_a.shape[0], out_f, cfg.lora_rank))
    index = cfg.default_lora_index
    return _merge(weight, lora_b[index], lora_a[index], cfg.lora_scaling)


def _merged_embedding(store: TensorStore, prefix: str, num: int, dim: int, cfg: TextConfig):
    """W_eff = W + A @ B * alpha/rank: embeddings store the LoRA factors transposed."""
    base = f"{prefix}.parametrizations.weight"
    weight = store.take(f"{base}.original", (num, dim))
    lora_a = store.take(f"{base}.0.lora_A", (_adapters(store, base), num, cfg.lora_rank))
    lora_b = store.take(f"{base}.0.lora_B", (lora_a.shape[0], cfg.lora_rank, dim))
    index = cfg.default_lora_index
    return _merge(weight, lora_a[index], lora_b[index], cfg.lora_scaling)


def _merge(weight, left, right, scaling: float):
    """weight + left @ right * scaling, in float64 and rounded once: a float32 product's
    summation order follows the CPU's GEMM kernel, so the exported weights (and the checked-in
    fixture bundle) would differ by an ulp between machines."""
    merged = weight.double() + (left.double() @ right.double()) * scaling
    return merged.to(weight.dtype)


def _adapters(store: TensorStore, base: str) -> int:
    """Number of LoRA adapters stored (leading dim of lora_A); the default one is merged."""
    return store.peek_shape(f"{base}.0.lora_A")[0]


def load_text_tower(cfg: TextConfig, store: TensorStore, pooled: bool = True) -> TextTower:
    tower = TextTower(cfg, pooled=pooled)
    p = TEXT_PREFIX
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    word = _merged_embedding(store, f"{p}embeddings.word_embeddings", cfg.vocab_size, hidden, cfg)
    token_type = _merged_embedding(
        store, f"{p}embeddings.token_type_embeddings", cfg.type_vocab_size, hidden, cfg
    )
    state = {
        "word_embeddings.weight": word + token_type[0],  # every token has type id 0
        "emb_ln.weight": store.take(f"{p}emb_ln.weight", (hidden,)),
        "emb_ln.bias": store.take(f"{p}emb_ln.bias", (hidden,)),
    }
    scale = cfg.head_dim**-0.5
    for i in range(cfg.num_layers):
        src, dst = f"{p}encoder.layers.{i}.", f"layers.{i}."
        qkv_w = _merged_linear(store, f"{src}mixer.Wqkv", 3 * hidden, hidden, cfg)
        qkv_b = store.take(f"{src}mixer.Wqkv.bias", (3 * hidden,)).clone()
        qkv_w[:hidden] *= scale
        qkv_b[:hidden] *= scale
        state |= {
            f"{dst}qkv.weight": qkv_w,
            f"{dst}qkv.bias": qkv_b,
            f"{dst}out_proj.weight": _merged_linear(
                store, f"{src}mixer.out_proj", hidden, hidden, cfg
            ),
            f"{dst}out_proj.bias": store.take(f"{src}mixer.out_proj.bias", (hidden,)),
            f"{dst}fc1.weight": _merged_linear(store, f"{src}mlp.fc1", inter, hidden, cfg),
            f"{dst}fc1.bias": store.take(f"{src}mlp.fc1.bias", (inter,)),
            f"{dst}fc2.weight": _merged_linear(store, f"{src}mlp.fc2", hidden, inter, cfg),
            f"{dst}fc2.bias": store.take(f"{src}mlp.fc2.bias", (hidden,)),
        }
        for norm in ("norm1", "norm2"):
            for kind in ("weight", "bias"):
                state[f"{dst}{norm}.{kind}"] = store.take(f"{src}{norm}.{kind}", (hidden,))
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.eval()


def load_vision_tower(cfg: VisionConfig, store: TensorStore, pooled: bool = True) -> VisionTower:
    tower = VisionTower(cfg, pooled=pooled)
    p = VISION_PREFIX
    width, hidden, heads = cfg.width, cfg.mlp_hidden, cfg.num_heads
    num_patches = cfg.grid_size**2
    pos = store.take(f"{p}pos_embed", (1, num_patches + 1, width))
    state = {
        "cls_embed": store.take(f"{p}cls_token", (1, 1, width)) + pos[:, :1],
        "patch_pos_embed": pos[:, 1:],
        "patch_embed.weight": store.take(
            f"{p}patch_embed.proj.weight", (width, 3, cfg.patch_size, cfg.patch_size)
        ),
        "patch_embed.bias": store.take(f"{p}patch_embed.proj.bias", (width,)),
        "norm.weight": store.take(f"{p}norm.weight", (width,)),
        "norm.bias": store.take(f"{p}norm.bias", (width,)),
    }
    # Row order inside each head that turns the interleaved RoPE into the half-split one.
    per_head = interleaved_to_half_split(cfg.head_width)
    rows = torch.cat([h * cfg.head_width + per_head for h in range(heads)])
    scale = cfg.head_width**-0.5
    for i in range(cfg.layers):
        src, dst = f"{p}blocks.{i}.", f"blocks.{i}."
        q_w = store.take(f"{src}attn.q_proj.weight", (width, width))[rows] * scale
        q_b = store.take(f"{src}attn.q_bias", (width,))[rows] * scale
        k_w = store.take(f"{src}attn.k_proj.weight", (width, width))[rows]
        v_w = store.take(f"{src}attn.v_proj.weight", (width, width))
        v_b = store.take(f"{src}attn.v_bias", (width,))
        w1 = store.take(f"{src}mlp.w1.weight", (hidden, width))
        w2 = store.take(f"{src}mlp.w2.weight", (hidden, width))
        state |= {
            f"{dst}attn.qkv.weight": torch.cat([q_w, k_w, v_w]),
            f"{dst}attn.qkv.bias": torch.cat([q_b, torch.zeros(width), v_b]),
            f"{dst}mlp.w12.weight": torch.cat([w1, w2]),
            f"{dst}mlp.w12.bias": torch.cat(
                [
                    store.take(f"{src}mlp.w1.bias", (hidden,)),
                    store.take(f"{src}mlp.w2.bias", (hidden,)),
                ]
            ),
            f"{dst}mlp.w3.weight": store.take(f"{src}mlp.w3.weight", (width, hidden)),
            f"{dst}mlp.w3.bias": store.take(f"{src}mlp.w3.bias", (width,)),
            f"{dst}attn.proj.weight": store.take(f"{src}attn.proj.weight", (width, width)),
            f"{dst}attn.proj.bias": store.take(f"{src}attn.proj.bias", (width,)),
        }
        norms = {
            "norm1": width,
            "norm2": width,
            "attn.inner_attn_ln": width,
            "mlp.ffn_ln": hidden,
        }
        for norm, size in norms.items():
            for kind in ("weight", "bias"):
                state[f"{dst}{norm}.{kind}"] = store.take(f"{src}{norm}.{kind}", (size,))
    tower.load_state_dict(state, strict=True, assign=True)
    return tower.eval()


def load_towers(
    cfg: ClipConfig, store: TensorStore, towers: Iterable[str], pooled: bool = True
) -> dict[str, torch.nn.Module]:
    """Build the requested towers ("text", "vision") and check the checkpoint strictly."""
    loaders = {
        "text": (TEXT_PREFIX, lambda: load_text_tower(cfg.text, store, pooled)),
        "vision": (VISION_PREFIX, lambda: load_vision_tower(cfg.vision, store, pooled)),
    }
    built, prefixes = {}, []
    for name in towers:
        prefix, load = loaders[name]
        built[name] = load()
        prefixes.append(prefix)
    store.check_all_used(prefixes)
    return built
