"""Write a full-size jina-clip-v2 checkpoint with random weights, for export benchmarks.

The directory has the real Hugging Face layout (model-facts 1.1 and 2): the real config.json
(text sizes come from the exporter's built-in jina-embeddings-v3 defaults, exactly as for the
real model), every state-dict key and shape of the real `model.safetensors`, and the tokenizer
and preprocessor files. The tokenizer is the test fixture's (317 pieces, not the real 250002):
enough for export, which never tokenises; benchmarks feed random ids over the full vocabulary.

Tensors are generated one at a time (a seeded `torch.Generator`) and streamed straight into
the safetensors file, so peak memory is about one fp32 temporary of the largest tensor
(the 250002 x 1024 word embedding, ~1 GB), not the whole ~1.7 GB file.

    python -m benchmarks.make_random_checkpoint /tmp/clipedge-bench/checkpoint --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "jina-clip-v2-tiny" / "checkpoint"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Real sizes (model-facts 1.2 for the text backbone, 1.1 for vision).
VOCAB, HIDDEN, TEXT_LAYERS, INTERMEDIATE, LORA_RANK = 250002, 1024, 24, 4096, 4
WIDTH, VISION_LAYERS, MLP_HIDDEN, PATCH, IMAGE = 1024, 24, int(1024 * 2.6667), 14, 512
GRID = IMAGE // PATCH

DTYPES = {
    "bf16": (torch.bfloat16, "BF16"),
    "fp16": (torch.float16, "F16"),
    "fp32": (torch.float32, "F32"),
}
# Largest number of elements drawn at once (fp32 temporary of ~256 MB).
CHUNK_ELEMENTS = 64 << 20

TEXT = "text_model.transformer.roberta."
VISION = "vision_model."
LORA_TASK = "retrieval.query"
INSTRUCTION = "Represent the query for retrieving evidence documents: "


def real_config() -> dict:
    """jina-clip-v2 config.json as published (model-facts 1.1), without size overrides."""
    return {
        "add_projections": False,
        "architectures": ["JinaCLIPModel"],
        "auto_map": {
            "AutoConfig": "jinaai/jina-clip-implementation--configuration_clip.JinaCLIPConfig",
            "AutoModel": "jinaai/jina-clip-implementation--modeling_clip.JinaCLIPModel",
        },
        "initializer_factor": 1.0,
        "logit_scale_init_value": 2.6592,
        "matryoshka_dimensions": [32, 64, 128, 256, 512, 768, 1024],
        "model_type": "jina_clip",
        "projection_dim": 1024,
        "text_config": {
            "default_instruction_task": None,
            "default_lora_task": LORA_TASK,
            "embed_dim": 1024,
            "hf_model_config_kwargs": {
                "load_trained_adapters": False,
                "lora_adaptations": [LORA_TASK],
                "lora_alpha": 4,
                "lora_dropout_p": 0.0,
                "lora_main_params_trainable": False,
                "lora_rank": LORA_RANK,
                "task_instructions": {LORA_TASK: INSTRUCTION},
                "use_flash_attn": True,
            },
            "hf_model_name_or_path": "jinaai/jina-embeddings-v3",
            "model_type": "jina_clip_text",
            "pooler_type": "mean_pooler",
            "proj_bias": False,
            "proj_type": None,
        },
        "torch_dtype": "bfloat16",
        "transformers.js_config": {"use_external_data_format": {"model.onnx": True}},
        "truncate_dim": None,
        "use_text_flash_attn": None,
        "use_vision_xformers": None,
        "vision_config": {
            "embed_dim": WIDTH,
            "fused_layer_norm": False,
            "head_width": 64,
            "image_size": IMAGE,
            "intp_freq": True,
            "layers": VISION_LAYERS,
            "ls_init_value": None,
            "mlp_ratio": 2.6667,
            "model_type": "jina_clip_vision",
            "naive_swiglu": True,
            "patch_dropout": 0.1,
            "patch_size": PATCH,
            "post_norm": False,
            "proj_type": None,
            "pt_hw_seq_len": 16,
            "qkv_bias": True,
            "rope_embeddings": True,
            "subln": True,
            "width": WIDTH,
            "x_attention": True,
        },
    }


@dataclass(frozen=True)
class Spec:
    """One checkpoint tensor: name, shape and how to draw it (normal(mean, std) or constant)."""

    name: str
    shape: tuple[int, ...]
    std: float
    mean: float = 0.0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _weight(name: str, *shape: int) -> Spec:
    return Spec(name, shape, 0.02)


def _bias(name: str, *shape: int) -> Spec:
    return Spec(name, shape, 0.01)


def _norm(prefix: str, size: int) -> list[Spec]:
    return [Spec(f"{prefix}.weight", (size,), 0.02, 1.0), _bias(f"{prefix}.bias", size)]


def _lora_linear(prefix: str, out_f: int, in_f: int) -> list[Spec]:
    """LoRA-parametrised nn.Linear: lora_A [1, r, in], lora_B [1, out, r] (model-facts 2)."""
    base = f"{prefix}.parametrizations.weight"
    return [
        _weight(f"{base}.original", out_f, in_f),
        Spec(f"{base}.0.lora_A", (1, LORA_RANK, in_f), 0.1),
        Spec(f"{base}.0.lora_B", (1, out_f, LORA_RANK), 0.01),
    ]


def _lora_embedding(prefix: str, num: int, dim: int) -> list[Spec]:
    """LoRA-parametrised nn.Embedding: factors stored transposed, A [1, num, r], B [1, r, dim]."""
    base = f"{prefix}.parametrizations.weight"
    return [
        _weight(f"{base}.original", num, dim),
        Spec(f"{base}.0.lora_A", (1, num, LORA_RANK), 0.1),
        Spec(f"{base}.0.lora_B", (1, LORA_RANK, dim), 0.01),
    ]


def checkpoint_specs() -> list[Spec]:
    """Every key and shape of the real jina-clip-v2 model.safetensors (model-facts 2)."""
    specs = [Spec("logit_scale", (), 0.0, math.log(1 / 0.07))]
    specs += _lora_embedding(f"{TEXT}embeddings.word_embeddings", VOCAB, HIDDEN)
    specs += _lora_embedding(f"{TEXT}embeddings.token_type_embeddings", 1, HIDDEN)
    specs += _norm(f"{TEXT}emb_ln", HIDDEN)
    for layer in range(TEXT_LAYERS):
        p = f"{TEXT}encoder.layers.{layer}."
        specs += _lora_linear(f"{p}mixer.Wqkv", 3 * HIDDEN, HIDDEN)
        specs.append(_bias(f"{p}mixer.Wqkv.bias", 3 * HIDDEN))
        specs += _lora_linear(f"{p}mixer.out_proj", HIDDEN, HIDDEN)
        specs.append(_bias(f"{p}mixer.out_proj.bias", HIDDEN))
        specs += _norm(f"{p}norm1", HIDDEN)
        specs += _lora_linear(f"{p}mlp.fc1", INTERMEDIATE, HIDDEN)
        specs.append(_bias(f"{p}mlp.fc1.bias", INTERMEDIATE))
        specs += _lora_linear(f"{p}mlp.fc2", HIDDEN, INTERMEDIATE)
        specs.append(_bias(f"{p}mlp.fc2.bias", HIDDEN))
        specs += _norm(f"{p}norm2", HIDDEN)
    specs += [
        _weight(f"{VISION}cls_token", 1, 1, WIDTH),
        _weight(f"{VISION}pos_embed", 1, 1 + GRID * GRID, WIDTH),
        _weight(f"{VISION}patch_embed.proj.weight", WIDTH, 3, PATCH, PATCH),
        _bias(f"{VISION}patch_embed.proj.bias", WIDTH),
    ]
    for block in range(VISION_LAYERS):
        p = f"{VISION}blocks.{block}."
        specs += _norm(f"{p}norm1", WIDTH)
        specs += [_bias(f"{p}attn.q_bias", WIDTH), _bias(f"{p}attn.v_bias", WIDTH)]
        specs += [_weight(f"{p}attn.{n}_proj.weight", WIDTH, WIDTH) for n in "qkv"]
        specs += _norm(f"{p}attn.inner_attn_ln", WIDTH)
        specs += [_weight(f"{p}attn.proj.weight", WIDTH, WIDTH), _bias(f"{p}attn.proj.bias", WIDTH)]
        specs += _norm(f"{p}norm2", WIDTH)
        for w in ("w1", "w2"):
            specs += [
                _weight(f"{p}mlp.{w}.weight", MLP_HIDDEN, WIDTH),
                _bias(f"{p}mlp.{w}.bias", MLP_HIDDEN),
            ]
        specs += _norm(f"{p}mlp.ffn_ln", MLP_HIDDEN)
        specs += [
            _weight(f"{p}mlp.w3.weight", WIDTH, MLP_HIDDEN),
            _bias(f"{p}mlp.w3.bias", WIDTH),
        ]
    specs += _norm(f"{VISION}norm", WIDTH)
    return specs


def _chunks(spec: Spec, dtype: torch.dtype, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """The tensor's values, flattened, in pieces of at most CHUNK_ELEMENTS elements."""
    total = spec.numel
    for start in range(0, max(total, 1), CHUNK_ELEMENTS):
        count = min(CHUNK_ELEMENTS, total - start) if total else 1
        values = torch.empty(count, dtype=torch.float32)
        if spec.std > 0:
            values.normal_(spec.mean, spec.std, generator=gen)
        else:
            values.fill_(spec.mean)
        yield values.to(dtype)


def write_safetensors(path: Path, specs: list[Spec], dtype_name: str, seed: int) -> int:
    """Stream the tensors into a safetensors file; return its size in bytes."""
    dtype, st_dtype = DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "random_seed": str(seed)}}
    offset = 0
    for spec in specs:
        size = spec.numel * itemsize
        header[spec.name] = {
            "dtype": st_dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    gen = torch.Generator().manual_seed(seed)
    with path.open("wb") as stream:
        stream.write(struct.pack("<Q", len(raw)))
        stream.write(raw)
        for spec in specs:
            for chunk in _chunks(spec, dtype, gen):
                stream.write(chunk.view(torch.uint8).numpy().tobytes())
    return 8 + len(raw) + offset


def write_checkpoint(out_dir: Path, seed: int = 0, dtype_name: str = "bf16") -> Path:
    """Write config, random weights, tokenizer and preprocessor files into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = real_config()
    config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copyfile(FIXTURE / name, out_dir / name)
    preprocessor = json.loads((FIXTURE / "preprocessor_config.json").read_text())
    preprocessor["size"] = IMAGE
    (out_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    weights = out_dir / "model.safetensors"
    write_safetensors(weights, checkpoint_specs(), dtype_name, seed)
    return weights


def check_file(path: Path, specs: list[Spec]) -> None:
    """Re-open the file with safetensors and compare every key and shape with the specs."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
        expected = {spec.name: spec.shape for spec in specs}
        if found != expected:
            missing = sorted(set(expected) - set(found))[:5]
            extra = sorted(set(found) - set(expected))[:5]
            raise SystemExit(f"safetensors round trip differs: missing {missing}, extra {extra}")
        word = handle.get_slice(
            f"{TEXT}embeddings.word_embeddings.parametrizations.weight.original"
        )
        sample = word[:4].float()
        if not torch.isfinite(sample).all():
            raise SystemExit("non-finite values in the written checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0, help="torch.Generator seed")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype")
    args = parser.parse_args(argv)
    specs = checkpoint_specs()
    params = sum(spec.numel for spec in specs)
    start = time.perf_counter()
    weights = write_checkpoint(args.out_dir, args.seed, args.dtype)
    check_file(weights, specs)
    print(
        f"wrote {weights} ({len(specs)} tensors, {params / 1e6:.1f} M parameters, "
        f"{weights.stat().st_size / 1e9:.3f} GB, {args.dtype}) in "
        f"{time.perf_counter() - start:.1f} s; tokenizer: test fixture's (317 pieces)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
