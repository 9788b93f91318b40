"""Tower configurations read from a jina-clip-v2 `config.json`.

The text backbone's sizes, rotary base and LayerNorm eps live in jina-embeddings-v3's config,
not in jina-clip-v2's. The official code loads that config and then applies
`text_config.hf_model_config_kwargs` on top; `TEXT_BACKBONE_DEFAULTS` holds those v3 values so
that no second download is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clipedge.errors import ClipEdgeError

# jina-embeddings-v3 config.json values the clip config does not carry (model-facts 1.2).
TEXT_BACKBONE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 250002,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
    "pad_token_id": 1,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "type_vocab_size": 1,
    "max_position_embeddings": 8194,
    "position_embedding_type": "rotary",
    "rotary_emb_base": 20000.0,
    "lora_adaptations": [
        "retrieval.query",
        "retrieval.passage",
        "separation",
        "classification",
        "text-matching",
    ],
    "lora_alpha": 1,
    "lora_rank": 4,
    "task_instructions": {
        "retrieval.query": "Represent the query for retrieving evidence documents: ",
        "retrieval.passage": "Represent the document for retrieval: ",
        "separation": "",
        "classification": "",
        "text-matching": "",
    },
}

SUPPORTED_TEXT_BACKBONES = {"jinaai/jina-embeddings-v3", "jinaai/xlm-roberta-flash-implementation"}


class UnsupportedCheckpointError(ClipEdgeError, ValueError):
    """The checkpoint is not a jina-clip-v2 (for example jina-clip-v1) or uses unknown options."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float
    rotary_base: float
    pad_token_id: int
    type_vocab_size: int
    max_position_embeddings: int
    lora_alpha: float
    lora_rank: int
    default_lora_index: int
    task_instructions: dict[str, str]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank


@dataclass(frozen=True)
class VisionConfig:
    width: int
    layers: int
    head_width: int
    mlp_hidden: int
    image_size: int
    patch_size: int
    pt_hw_seq_len: int
    intp_freq: bool
    layer_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def num_heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    text: TextConfig
    vision: VisionConfig
    embed_dim: int
    matryoshka_dimensions: list[int]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UnsupportedCheckpointError(message)


def parse_config(raw: dict[str, Any]) -> ClipConfig:
    """Build tower configs from a jina-clip-v2 config.json, rejecting other architectures."""
    _require(raw.get("model_type") == "jina_clip", "config.json: model_type is not 'jina_clip'")
    text_raw = raw.get("text_config") or {}
    vision_raw = raw.get("vision_config") or {}
    backbone = text_raw.get("hf_model_name_or_path")
    _require(
        backbone in SUPPORTED_TEXT_BACKBONES,
        f"config.json: text backbone {backbone!r} is not jina-clip-v2's XLM-RoBERTa "
        "(jina-embeddings-v3); this looks like jina-clip-v1 or another model, which clipedge "
        "does not support",
    )
    kwargs = text_raw.get("hf_model_config_kwargs") or {}
    backbone_cfg = {**TEXT_BACKBONE_DEFAULTS, **kwargs}
    _require(
        backbone_cfg["position_embedding_type"] == "rotary",
        "text backbone: only rotary position embeddings are supported",
    )
    _require(backbone_cfg["hidden_act"] == "gelu", "text backbone: only hidden_act 'gelu'")
    _require(text_raw.get("pooler_type") == "mean_pooler", "text_config: pooler must be mean")
    _require(
        not raw.get("add_projections") and text_raw.get("proj_type") is None,
        "config.json: projection heads (add_projections / proj_type) are not supported",
    )
    adaptations = list(backbone_cfg["lora_adaptations"])
    default_task = text_raw.get("default_lora_task")
    _require(
        default_task in adaptations,
        f"text_config: default_lora_task {default_task!r} is not in {adaptations}",
    )
    _require(text_raw.get("embed_dim") == backbone_cfg["hidden_size"], "text embed_dim mismatch")
    text = TextConfig(
        vocab_size=int(backbone_cfg["vocab_size"]),
        hidden_size=int(backbone_cfg["hidden_size"]),
        num_layers=int(backbone_cfg["num_hidden_layers"]),
        num_heads=int(backbone_cfg["num_attention_heads"]),
        intermediate_size=int(backbone_cfg["intermediate_size"]),
        layer_norm_eps=float(backbone_cfg["layer_norm_eps"]),
        rotary_base=float(backbone_cfg["rotary_emb_base"]),
        pad_token_id=int(backbone_cfg["pad_token_id"]),
        type_vocab_size=int(backbone_cfg["type_vocab_size"]),
        max_position_embeddings=int(backbone_cfg["max_position_embeddings"]),
        lora_alpha=float(backbone_cfg["lora_alpha"]),
        lora_rank=int(backbone_cfg["lora_rank"]),
        default_lora_index=adaptations.index(default_task),
        task_instructions=dict(backbone_cfg.get("task_instructions") or {}),
    )

    switches = {
        "rope_embeddings": True,
        "naive_swiglu": True,
        "subln": True,
        "post_norm": False,
        "qkv_bias": True,
    }
    for key, expected in switches.items():
        _require(
            vision_raw.get(key) == expected,
            f"vision_config: {key}={vision_raw.get(key)!r} is not jina-clip-v2's {expected!r}",
        )
    _require(vision_raw.get("ls_init_value") is None, "vision_config: layer scale unsupported")
    _require(vision_raw.get("proj_type") is None, "vision_config: proj_type unsupported")
    width = int(vision_raw["width"])
    vision = VisionConfig(
        width=width,
        layers=int(vision_raw["layers"]),
        head_width=int(vision_raw["head_width"]),
        mlp_hidden=int(width * float(vision_raw["mlp_ratio"])),
        image_size=int(vision_raw["image_size"]),
        patch_size=int(vision_raw["patch_size"]),
        pt_hw_seq_len=int(vision_raw["pt_hw_seq_len"]),
        intp_freq=bool(vision_raw["intp_freq"]),
    )
    _require(vision_raw.get("embed_dim") == width, "vision embed_dim must equal width")
    _require(text.hidden_size == width, "text and vision widths differ: projections needed")
    return ClipConfig(
        text=text,
        vision=vision,
        embed_dim=width,
        matryoshka_dimensions=[int(d) for d in raw.get("matryoshka_dimensions") or []],
    )
