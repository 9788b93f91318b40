"""`clipedge.load(bundle)`: the official model's `encode_text` / `encode_image`, torch-free.

One session per tower, created on first use, so a text-only service never loads the vision
graph. Every call is thread-safe: sessions and the tokenizer are shared read-only, and the
lazily created pieces are guarded by a lock.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .batching import length_sorted_batches
from .bundle.manifest import BundleError, Manifest, TowerManifest, read_manifest, sha256_file
from .engine.onnxruntime_backend import (
    OrtSession,
    SessionOptions,
    TowerSession,
    device_kind,
    resolve_providers,
)
from .engine.plan import choose_precision, prefers_openvino
from .engine.profiles import ProfileLimits, tower_profile
from .inputs.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_URL_BYTES,
    DEFAULT_URL_TIMEOUT,
    ImageInput,
    ImagePreprocessor,
    load_image,
    preprocess_images,
)
from .inputs.text import TextTokenizer, apply_instruction, check_max_length
from .postprocess import check_truncate_dim, cls_pool, mean_pool, truncate_and_normalize

log = logging.getLogger(__name__)

SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)


def _is_single_image(item: Any) -> bool:
    return isinstance(item, SINGLE_IMAGE_TYPES) or hasattr(item, "read") or hasattr(item, "mode")


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def _progress(total: int, enabled: bool | None, desc: str):
    """A tqdm bar, shown when asked for (None: when logging is at INFO or more verbose)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = log.getEffectiveLevel() <= logging.INFO
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


class ClipEdgeModel:
    """jina-clip-v2 from a clipedge bundle, with the official calling convention."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        backend: str = "auto",
        precision: str | None = None,
        threads: int | None = None,
        optimization: str = "all",
        cache_dir: str | os.PathLike[str] | None = None,
        allow_urls: bool = False,
        url_timeout: float = DEFAULT_URL_TIMEOUT,
        max_url_bytes: int = DEFAULT_MAX_URL_BYTES,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        preprocess_workers: int | None = None,
        verify_checksums: bool = False,
        trt_max_batch: int = 32,
        trt_max_length: int = 512,
        openvino_precision: str = "bf16",
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        self.backend = backend
        self.providers = resolve_providers(
            backend, prefers_openvino([t.graphs for t in self.manifest.towers.values()])
        )
        self.device = device_kind(self.providers)
        # Per tower: the requested precision, or the fastest that passed on this device.
        self.precisions = {
            name: choose_precision(name, tower.graphs, self.device, precision)
            for name, tower in self.manifest.towers.items()
        }
        self._options = SessionOptions(
            threads=threads,
            optimization=optimization,
            cache_dir=Path(cache_dir) if cache_dir else None,
        )
        self.trt_limits = ProfileLimits(
            max_batch=trt_max_batch,
            opt_batch=min(8, trt_max_batch),
            max_length=trt_max_length,
            opt_length=min(128, trt_max_length),
        )
        self._uses_tensorrt = self.providers[0] == "TensorrtExecutionProvider"
        self.openvino_precision = openvino_precision
        self._check_files(verify_checksums)
        self._sessions: dict[str, TowerSession] = {}
        self._lock = threading.Lock()
        self._tokenizer: TextTokenizer | None = None
        self._preprocessor: ImagePreprocessor | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._workers = preprocess_workers or os.cpu_count() or 1
        self._load_image = functools.partial(
            load_image,
            allow_urls=allow_urls,
            url_timeout=url_timeout,
            max_url_bytes=max_url_bytes,
            max_pixels=max_image_pixels,
        )
        if "text" in self.manifest.towers:
            self._tokenizer = self._make_tokenizer(self.manifest.towers["text"])
        if "vision" in self.manifest.towers:
            self._preprocessor = self._make_preprocessor(self.manifest.towers["vision"])

    # ----- bundle checks -------------------------------------------------------------------

    def _tower(self, name: str) -> TowerManifest:
        if name not in self.manifest.towers:
            raise BundleError(
                f"bundle {self.bundle_dir} has no {name} tower "
                f"(it has: {', '.join(self.manifest.towers)}); export it with --towers"
            )
        return self.manifest.towers[name]

    def _check_files(self, verify_checksums: bool) -> None:
        """Fail at load time on missing, truncated or (optionally) altered bundle files."""
        for name, info in self.manifest.files.items():
            path = self.bundle_dir / name
            if not path.is_file():
                raise BundleError(f"bundle file {path} is missing")
            if path.stat().st_size != info["bytes"]:
                raise BundleError(
                    f"bundle file {path} has {path.stat().st_size} bytes, the manifest says "
                    f"{info['bytes']}: it is truncated or corrupt"
                )
            if verify_checksums and sha256_file(path) != info["sha256"]:
                raise BundleError(f"bundle file {path} does not match its sha256: corrupt")

    def _make_tokenizer(self, tower: TowerManifest) -> TextTokenizer:
        path = self.bundle_dir / tower.extra["tokenizer"]
        try:
            return TextTokenizer(path, pad_token_id=int(tower.extra["pad_token_id"]))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"cannot read tokenizer {path}: {exc}") from exc

    def _make_preprocessor(self, tower: TowerManifest) -> ImagePreprocessor:
        path = self.bundle_dir / tower.extra["preprocessor"]
        try:
            preprocessor = ImagePreprocessor.from_config_file(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"cannot read preprocessor config {path}: {exc}") from exc
        if preprocessor.size != tower.extra["image_size"]:
            raise BundleError(
                f"{path} says size {preprocessor.size}, the vision graph takes "
                f"{tower.extra['image_size']}"
            )
        return preprocessor

    @property
    def tokenizer(self) -> TextTokenizer:
        """The bundle's tokenizer (calibration uses it to see exactly what production sees)."""
        self._tower("text")
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def preprocessor(self) -> ImagePreprocessor:
        """The bundle's image preprocessor."""
        self._tower("vision")
        assert self._preprocessor is not None
        return self._preprocessor

    # ----- sessions --------------------------------------------------------------------------

    def session(self, tower_name: str) -> TowerSession:
        """The tower's inference session, created on first use."""
        with self._lock:
            if tower_name not in self._sessions:
                tower = self._tower(tower_name)
                graph = self.bundle_dir / tower.graphs[self.precisions[tower_name]].file
                self._sessions[tower_name] = self._make_session(tower_name, tower, graph)
                log.info(
                    "%s tower: %s on %s",
                    tower_name,
                    graph.name,
                    self._sessions[tower_name].provider,
                )
            return self._sessions[tower_name]

    def _make_session(self, tower_name: str, tower: TowerManifest, graph: Path) -> TowerSession:
        if self.device == "openvino":
            from .engine.openvino_backend import OpenVinoSession

            return OpenVinoSession(graph, self._options, self.openvino_precision)
        profile = tower_profile(tower_name, tower, self.trt_limits)
        return OrtSession(
            graph, self.providers, self._options, profile, warn_on_fallback=self.backend != "auto"
        )

    def _check_truncate_dim(self, truncate_dim: int | None) -> None:
        """Validate before any inference runs, so a bad value costs nothing."""
        manifest = self.manifest
        check_truncate_dim(truncate_dim, manifest.embed_dim, manifest.matryoshka_dimensions)

    def _pool(self, tower_name: str, output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        if self.manifest.towers[tower_name].output == "pooled":
            return output
        return mean_pool(output, mask) if tower_name == "text" else cls_pool(output)

    # ----- public API ------------------------------------------------------------------------

    def encode_text(
        self,
        sentences: str | Sequence[str],
        task: str | None = None,
        truncate_dim: int | None = None,
        normalize_embeddings: bool = True,
        batch_size: int = 32,
        max_length: int = 512,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embed texts: [N, dim] float32, or [dim] for a single string.

        `task="retrieval.query"` prepends the query instruction; the adapter is the same for
        every task (as in the official model).
        """
        single = isinstance(sentences, str)
        texts = [sentences] if single else list(sentences)
        tower = self._tower("text")
        if not texts:
            raise ValueError("encode_text got an empty list of sentences")
        _check_batch_size(batch_size)
        check_max_length(max_length)
        if self._uses_tensorrt:
            self.trt_limits.check(batch_size, max_length)
        if max_length > int(tower.extra["max_length"]):
            raise ValueError(
                f"max_length must be at most {tower.extra['max_length']}, got {max_length}"
            )
        self._check_truncate_dim(truncate_dim)
        if task is not None:
            instructions = self.manifest.task_instructions
            if task not in instructions:
                raise ValueError(
                    f"unknown task {task!r}; valid tasks: {', '.join(instructions)} (or None)"
                )
            texts = apply_instruction(texts, instructions[task])
        token_rows = self.tokenizer.tokenize(texts, max_length)
        session = self.session("text")
        result = np.empty((len(texts), self.manifest.embed_dim), dtype=np.float32)
        batches = length_sorted_batches([len(r) for r in token_rows], batch_size)
        with _progress(len(texts), show_progress_bar, "encode_text") as bar:
            for indices in batches:
                input_ids, mask = self.tokenizer.pad([token_rows[i] for i in indices])
                output = session.run({"input_ids": input_ids, "attention_mask": mask})
                result[indices] = self._pool("text", output, mask)
                bar.update(len(indices))
        embeddings = truncate_and_normalize(result, truncate_dim, normalize_embeddings)
        return embeddings[0] if single else embeddings

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        truncate_dim: int | None = None,
        normalize_embeddings: bool = True,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embed images: [N, dim] float32, or [dim] for a single image.

        Items may be paths, bytes, file objects, PIL images, uint8 arrays or data URIs
        (http(s) URLs when the model was loaded with `allow_urls=True`). A bad item raises an
        `ImageInputError` naming its index. Decoding of the next batch overlaps inference.
        """
        single = _is_single_image(images)
        items = [images] if single else list(images)
        self._tower("vision")
        if not items:
            raise ValueError("encode_image got an empty list of images")
        _check_batch_size(batch_size)
        if self._uses_tensorrt:
            self.trt_limits.check(batch_size)
        self._check_truncate_dim(truncate_dim)
        session = self.session("vision")
        result = np.empty((len(items), self.manifest.embed_dim), dtype=np.float32)
        with _progress(len(items), show_progress_bar, "encode_image") as bar:
            for start, pixels in self._preprocessed_batches(items, batch_size):
                output = session.run({"pixel_values": pixels})
                result[start : start + len(pixels)] = self._pool("vision", output, None)
                bar.update(len(pixels))
        embeddings = truncate_and_normalize(result, truncate_dim, normalize_embeddings)
        return embeddings[0] if single else embeddings

    def preprocess_images(self, items: Sequence[ImageInput]) -> np.ndarray:
        """Pixel tensors [N, 3, S, S] exactly as the vision graph takes them."""
        assert self._preprocessor is not None
        return preprocess_images(
            items, self._preprocessor, load=self._indexed_loader(0), executor=self._pool_executor()
        )

    def _indexed_loader(self, offset: int):
        """Loader whose error messages give the item's index in the caller's whole list."""
        return lambda item, index: self._load_image(item, index + offset)

    def _pool_executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "clipedge-decode")
            return self._executor

    def _preprocessed_batches(
        self, items: list[Any], batch_size: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, pixels) per batch, decoding batch n+1 while batch n runs."""
        assert self._preprocessor is not None
        executor = self._pool_executor()
        starts = list(range(0, len(items), batch_size))

        def prepare(start: int):
            return preprocess_images(
                items[start : start + batch_size],
                self._preprocessor,
                load=self._indexed_loader(start),
                executor=executor,
            )

        # A dedicated thread runs the batch preparation so it can itself fan out to the pool.
        with ThreadPoolExecutor(1, "clipedge-prefetch") as prefetch:
            pending = prefetch.submit(prepare, starts[0])
            for position, start in enumerate(starts):
                pixels = pending.result()
                if position + 1 < len(starts):
                    pending = prefetch.submit(prepare, starts[position + 1])
                yield start, pixels

    def close(self) -> None:
        """Release sessions and worker threads."""
        with self._lock:
            self._sessions.clear()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None


def load(bundle_dir: str | os.PathLike[str], backend: str = "auto", **kwargs: Any) -> ClipEdgeModel:
    """Open a clipedge bundle; see `ClipEdgeModel` for the options."""
    return ClipEdgeModel(bundle_dir, backend=backend, **kwargs)
