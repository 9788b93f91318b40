"""Write an export's bundle directory: graphs, tokenizer and preprocessor files, manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import torch

from clipedge import __version__
from clipedge.bundle.manifest import (
    GraphEntry,
    Manifest,
    TensorSpec,
    TextSettings,
    TowerManifest,
    VisionSettings,
    describe_files,
)
from clipedge.towers import TEXT, tower_spec

from .config import ClipConfig
from .onnx_export import ExportedGraph
from .source import OPTIONAL_FILES, CheckpointSource

TOKENIZER_FILE = "tokenizer.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
DEFAULT_MAX_LENGTH = 512  # the official encode_text default
MAX_LENGTH = 8192


def copy_support_files(source: CheckpointSource, bundle_dir: Path) -> None:
    """Tokenizer and preprocessor files travel with the graphs: the runtime reads only these."""
    for name in (TOKENIZER_FILE, PREPROCESSOR_FILE, *OPTIONAL_FILES):
        if (source.directory / name).is_file():
            shutil.copyfile(source.directory / name, bundle_dir / name)


def _tower_manifest(graph: ExportedGraph, cfg: ClipConfig) -> TowerManifest:
    pooled = graph.output_names[0] != "last_hidden_state"
    dim = cfg.embed_dim
    settings: TextSettings | VisionSettings
    if graph.tower == TEXT.name:
        inputs = [TensorSpec(n, "int64", ["batch", "sequence"]) for n in graph.input_names]
        token_shape: list[int | str] = ["batch", "sequence", dim]
        settings = TextSettings(
            TOKENIZER_FILE, cfg.text.pad_token_id, DEFAULT_MAX_LENGTH, MAX_LENGTH
        )
    else:
        size = cfg.vision.image_size
        inputs = [TensorSpec("pixel_values", "float32", ["batch", 3, size, size])]
        token_shape = ["batch", cfg.vision.grid_size**2 + 1, dim]
        settings = VisionSettings(size, PREPROCESSOR_FILE, tokens=cfg.vision.grid_size**2 + 1)
    spec = tower_spec(graph.tower)
    shape = ["batch", dim] if pooled else token_shape
    return TowerManifest(
        graphs={
            "fp32": GraphEntry(
                file=graph.path.name,
                precision="fp32",
                onnxruntime_cpu_file=cpu.name if (cpu := graph.onnxruntime_cpu_path) else None,
            )
        },
        inputs=inputs,
        outputs=[TensorSpec(graph.output_names[0], "float32", shape)],
        pooling=spec.pooling,
        settings=settings,
    )


def write_manifest(
    source: CheckpointSource, graphs: list[ExportedGraph], bundle_dir: Path, opset: int
) -> Manifest:
    cfg = source.config
    manifest = Manifest(
        embed_dim=cfg.embed_dim,
        matryoshka_dimensions=cfg.matryoshka_dimensions,
        normalize=True,
        task_instructions=cfg.text.task_instructions,
        towers={graph.tower: _tower_manifest(graph, cfg) for graph in graphs},
        source=source.origin,
        files=describe_files(bundle_dir),
        versions={
            "clipedge": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": str(opset),
        },
    )
    manifest.save(bundle_dir)
    return manifest
