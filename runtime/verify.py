"""`clipedge verify BUNDLE`: every engine and precision this machine runs, against fp32.

For each tower, the fp32 ONNX graph on onnxruntime's CPU provider is the reference. Every
other way of running the tower that this machine has (native TensorRT engines of the bundle,
onnxruntime CUDA / TensorRT providers, the CPU and OpenVINO graphs, and the GPU graphs on the
CPU where nothing better is here) embeds the same inputs, and the report gives per tower:
- cosine (min, mean) and max-abs difference of the normalised vectors against the reference;
- batch invariance: an item alone and the same item in a full batch (texts padded to the
  batch's longest), and identical items in one batch, must give the same vector within the
  precision's tolerance. TensorRT has had bugs of exactly this kind (NVIDIA/TensorRT #3744,
  #4813), and onnxruntime's dynamic int8 (`int8-cpu`) is batch-dependent by design, so its
  tolerance is loose.
Inputs are fixed: multilingual texts of mixed lengths (one of several hundred tokens) and
synthetic images (seeded gradients and noise) through the bundle's own preprocessing.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle.manifest import Manifest, read_manifest
from .pipeline import Pipeline
from .towers import TEXT, VISION

log = logging.getLogger(__name__)

TEXTS = [
    "a photo of a cat on a sofa",
    "Ein Foto einer Katze auf dem Sofa",
    "一只猫坐在沙发上的照片",
    "una foto de un gato",
    "What is the capital of France?",
    "Сколько стоит билет на поезд до Москвы?",
    "A long passage: "
    + " ".join(f"sentence {i} about embeddings and retrieval." for i in range(60)),
    "short",
    "東京の夜景と高層ビル",
    "a red bicycle leaning against a brick wall in the afternoon sun",
    "x",
    "la tour Eiffel illuminée la nuit, vue depuis le Trocadéro",
]
# Minimum cosine against fp32, and minimum cosine between copies of one item (invariance).
ACCURACY = {"fp32": 0.9999, "fp16": 0.999, "int8": 0.99, "int8-cpu": 0.99, "int8-ov": 0.99}
INVARIANCE = {"fp32": 0.99999, "fp16": 0.9995, "int8": 0.999, "int8-cpu": 0.99, "int8-ov": 0.999}


def synthetic_images(count: int = 12, seed: int = 0) -> list[np.ndarray]:
    """Seeded uint8 RGB images of several sizes: gradients, stripes and noise."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        height, width = (96 + 37 * (i % 4), 128 + 29 * (i % 3))
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack(
            [
                127 + 127 * np.sin(x / (7 + i) + i),
                127 + 127 * np.cos(y / (5 + i % 5)),
                (x + y) * 255 / (height + width),
            ],
            axis=-1,
        )
        noisy = base + rng.normal(0, 12 + 3 * i, base.shape)
        images.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return images


@dataclass(frozen=True)
class Candidate:
    """One way of running one tower: backend, precision, the options to open it."""

    tower: str
    backend: str
    precision: str
    options: Any = None


@dataclass
class TowerResult:
    candidate: Candidate
    provider: str = ""
    cosine_min: float = float("nan")
    cosine_mean: float = float("nan")
    max_abs: float = float("nan")
    alone_vs_batch: float = float("nan")  # min cosine
    identical_in_batch: float = float("nan")  # min cosine
    error: str | None = None
    passed: bool = False
    notes: list[str] = field(default_factory=list)


def _provider_available(name: str) -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return name in ort.get_available_providers()


def candidates(
    manifest: Manifest, include_cpu_for_gpu_graphs: bool | None = None
) -> list[Candidate]:
    """Every (tower, backend, precision) this machine can run, beside the fp32 CPU reference.
    GPU graphs (fp16, int8) run on the CPU provider only when no GPU backend is here."""
    from .engine.tensorrt_backend import available as native_available
    from .engine.tensorrt_backend import runnable

    found: list[Candidate] = []
    cuda = _provider_available("CUDAExecutionProvider")
    trt_ep = _provider_available("TensorrtExecutionProvider") and _tensorrt_libraries()
    native = runnable(manifest) if native_available() else {}
    if include_cpu_for_gpu_graphs is None:
        include_cpu_for_gpu_graphs = not (cuda or any(native.values()))
    openvino = importlib.util.find_spec("openvino") is not None
    for tower_name, tower in manifest.towers.items():
        for precision in native.get(tower_name, []):
            found.append(Candidate(tower_name, "tensorrt-native", precision))
        for precision, graph in tower.graphs.items():
            if graph.device in ("any", "gpu"):
                if cuda:
                    found.append(Candidate(tower_name, "cuda", precision))
                if trt_ep:
                    found.append(Candidate(tower_name, "tensorrt", precision))
            if graph.device == "cpu" or (graph.device == "gpu" and include_cpu_for_gpu_graphs):
                found.append(Candidate(tower_name, "cpu", precision))
            if openvino and graph.device in ("any", "openvino"):
                found.append(Candidate(tower_name, "openvino", precision))
    return found


def _tensorrt_libraries() -> bool:
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so.11"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


class _Embedder:
    """Runs one tower's fixed inputs through any session with the model's one pipeline."""

    def __init__(self, reference: Any, tower: str, inputs: list[Any]):
        self.reference, self.tower = reference, reference.tower(tower)
        self.options = reference.finish_options(None, True)
        prepared = self.tower.prepare(inputs)
        if (error := prepared.first_error()) is not None:
            raise error
        self.rows = [prepared.row(item) for item in range(len(inputs))]
        self.count = len(inputs)

    def embed(self, session: Any, items: list[int], batch_size: int) -> np.ndarray:
        """Vectors of `items` (indices into the prepared inputs, repeats allowed), in order."""
        pipeline = Pipeline(self.tower, session, self.reference.manifest.embed_dim)
        embedded = pipeline.run_rows([self.rows[i] for i in items], batch_size, self.options)
        if (error := embedded.first_error()) is not None:
            raise error
        return embedded.vectors


def _open(bundle: Path, manifest: Manifest, candidate: Candidate) -> Any:
    from .engine.registry import backend

    chosen = backend(candidate.backend)
    tower = manifest.towers[candidate.tower]
    options = candidate.options or chosen.options_type()
    graph = bundle / tower.graphs[candidate.precision].file_for(candidate.backend)
    return chosen.open(graph, tower, options, True)


def verify_bundle(
    bundle_dir: str | Path,
    batch_size: int = 8,
    only: Callable[[Candidate], bool] | None = None,
    report: Callable[[str], None] = print,
) -> list[TowerResult]:
    """Run every candidate against the fp32 CPU reference; print and return the results."""
    import clipedge

    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = clipedge.load(bundle, backend="cpu", precision="fp32")
    texts, images = TEXTS, synthetic_images()
    results = []
    embedders: dict[str, _Embedder] = {}
    truth: dict[str, np.ndarray] = {}
    for tower in manifest.towers:
        inputs = {TEXT.name: texts, VISION.name: images}[tower]
        embedders[tower] = _Embedder(reference, tower, inputs)
        every = list(range(embedders[tower].count))
        truth[tower] = embedders[tower].embed(reference.session(tower), every, batch_size)
    for candidate in candidates(manifest):
        if only is not None and not only(candidate):
            continue
        result = TowerResult(candidate)
        embedder = embedders[candidate.tower]
        every = list(range(embedder.count))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                session = _open(bundle, manifest, candidate)
            result.provider = str(getattr(session, "provider", ""))
            batched = embedder.embed(session, every, batch_size)
            cos = _cosines(batched, truth[candidate.tower])
            result.cosine_min, result.cosine_mean = float(cos.min()), float(cos.mean())
            result.max_abs = float(np.abs(batched - truth[candidate.tower]).max())
            alone = np.concatenate([embedder.embed(session, [i], 1) for i in every])
            result.alone_vs_batch = float(_cosines(alone, batched).min())
            worst = 1.0
            for item in (0, every[-1]):
                copies = embedder.embed(session, [item] * batch_size, batch_size)
                worst = min(
                    worst, float(_cosines(copies, np.repeat(copies[:1], batch_size, 0)).min())
                )
            result.identical_in_batch = worst
            level = candidate.precision
            if candidate.backend == "openvino" and level == "fp32":
                level = "fp16"  # OpenVINO runs fp32 graphs in bf16 where the CPU has it
            accuracy = ACCURACY.get(level, 0.99)
            entry = manifest.towers[candidate.tower].graphs[candidate.precision]
            if entry.accuracy is not None:  # the target the graph was calibrated for
                accuracy = min(accuracy, entry.accuracy.target)
            invariance = INVARIANCE.get(level, 0.999)
            checks = {
                f"cosine {result.cosine_min:.5f} < {accuracy}": result.cosine_min >= accuracy,
                f"alone vs batch {result.alone_vs_batch:.6f} < {invariance}": (
                    result.alone_vs_batch >= invariance
                ),
                f"identical in batch {result.identical_in_batch:.6f} < {invariance}": (
                    result.identical_in_batch >= invariance
                ),
            }
            result.notes = [what for what, ok in checks.items() if not ok]
            result.passed = not result.notes
            close = getattr(session, "close", None)
            if close is not None:
                close()
        except Exception as exc:  # report every candidate, whatever fails
            result.error = f"{type(exc).__name__}: {exc}"
            result.notes = [result.error]
        results.append(result)
    reference.close()
    report(provenance(bundle, manifest))
    report(format_results(results))
    return results


def provenance(bundle: Path, manifest: Manifest) -> str:
    """Where the bundle came from: the checkpoint and the exporting tools' versions."""
    source = ", ".join(f"{k}={v}" for k, v in manifest.source.items()) or "unknown"
    tools = ", ".join(f"{k} {v}" for k, v in manifest.versions.items()) or "unknown"
    return f"bundle {bundle}: from {source}; exported with {tools}"


def format_results(results: list[TowerResult]) -> str:
    header = (
        f"{'tower':7}{'backend':16}{'precision':10}{'cos min':>9}{'cos mean':>10}"
        f"{'max-abs':>10}{'alone/batch':>13}{'identical':>11}  result"
    )
    lines = [header]
    for r in results:
        c = r.candidate
        verdict = "pass" if r.passed else "FAIL: " + "; ".join(r.notes)
        lines.append(
            f"{c.tower:7}{c.backend:16}{c.precision:10}{r.cosine_min:9.5f}{r.cosine_mean:10.5f}"
            f"{r.max_abs:10.2e}{r.alone_vs_batch:13.6f}{r.identical_in_batch:11.6f}  {verdict}"
        )
        if r.provider:
            lines.append(f"{'':7}  on {r.provider}")
    if not results:
        lines.append("(nothing to compare: this machine runs only the fp32 reference)")
    return "\n".join(lines)
