"""`clipedge.load(bundle)`: the official model's `encode_text` / `encode_image`, torch-free.

The model follows an execution plan (backend and precision per tower, chosen once) and
composes the named stages of `clipedge.stages`: prepare -> batch -> run -> finish. Each
stage is public, so a server or a batch tool can compose them differently. One session per
tower, created on first use, so a text-only service never loads the vision graph. Every call
is thread-safe: sessions and the tokenizer are shared read-only, and the lazily created pieces
are guarded by a lock.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .bundle.files import check_files
from .bundle.manifest import BundleError, Manifest, TowerManifest, read_manifest
from .engine.plan import ExecutionPlan, plan_execution
from .engine.registry import backend as get_backend
from .engine.session import TowerSession
from .inputs.fetch import UrlPolicy
from .inputs.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_URL_BYTES,
    DEFAULT_URL_TIMEOUT,
    ImageInput,
    ImagePreprocessor,
    load_image,
)
from .inputs.text import TextTokenizer, as_text_list
from .stages import (
    FinishOptions,
    ImagePreparer,
    PreparedImages,
    PreparedTexts,
    TextPreparer,
    TowerBatch,
    finish,
    image_batches,
    text_batches,
)
from .stages.batch import check_batch_size

log = logging.getLogger(__name__)

SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)


def _as_image_list(images: Any) -> tuple[list[Any], bool]:
    """The caller's images as a list, and whether a single image was given."""
    if isinstance(images, SINGLE_IMAGE_TYPES) or hasattr(images, "read") or hasattr(images, "mode"):
        return [images], True
    if images is None or isinstance(images, int | float):
        raise TypeError(f"expected an image or a list of images, got {type(images).__name__}")
    try:
        return list(images), False
    except TypeError as exc:
        raise TypeError(
            f"expected an image or a list of images, got {type(images).__name__}"
        ) from exc


def _progress(total: int, enabled: bool | None, desc: str):
    """A tqdm bar, shown when asked for (None: when logging is at INFO or more verbose)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = log.getEffectiveLevel() <= logging.INFO
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


class ClipEdgeModel:
    """jina-clip-v2 from a clipedge bundle, with the official calling convention.

    `backend`: "auto", "cpu", "cuda", "tensorrt" or "openvino"; `precision`: a graph precision
    of the bundle (default: the fastest that passed for the backend); `backend_options`: the
    backend's options dataclass (`OnnxruntimeOptions`, `TensorrtEpOptions`, `OpenVinoOptions`),
    `threads` overrides its thread count. Image URLs are fetched only with `allow_urls`, never
    from private, loopback or link-local addresses unless `allow_private_urls`.
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        backend: str = "auto",
        precision: str | None = None,
        *,
        backend_options: Any = None,
        threads: int | None = None,
        allow_urls: bool = False,
        url_timeout: float = DEFAULT_URL_TIMEOUT,
        allow_private_urls: bool = False,
        max_url_bytes: int = DEFAULT_MAX_URL_BYTES,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
        preprocess_workers: int | None = None,
        verify_checksums: bool = False,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        check_files(self.bundle_dir, self.manifest, verify_checksums)
        self.plan: ExecutionPlan = plan_execution(
            self.manifest, self.bundle_dir, backend, precision, backend_options
        )
        self.backend_options = self._backend_options(backend_options, threads)
        self._sessions: dict[str, TowerSession] = {}
        self._lock = threading.Lock()
        self.text: TextPreparer | None = None
        self.images: ImagePreparer | None = None
        if "text" in self.manifest.towers:
            tower = self.manifest.towers["text"]
            self.text = TextPreparer(
                self._make_tokenizer(tower),
                self.manifest.task_instructions,
                int(tower.extra["max_length"]),
            )
        if "vision" in self.manifest.towers:
            load = functools.partial(
                load_image,
                url_policy=UrlPolicy(
                    allow_urls=allow_urls,
                    allow_private=allow_private_urls,
                    timeout=url_timeout,
                    max_bytes=max_url_bytes,
                ),
                max_pixels=max_image_pixels,
            )
            self.images = ImagePreparer(
                self._make_preprocessor(self.manifest.towers["vision"]), load, preprocess_workers
            )

    # ----- bundle and plan -----------------------------------------------------------------

    @property
    def precisions(self) -> dict[str, str]:
        """The precision each tower runs at."""
        return self.plan.precisions

    def _backend_options(self, options: Any, threads: int | None) -> Any:
        expected = get_backend(self.plan.backend).options_type
        if options is None:
            options = expected()
        elif not isinstance(options, expected):
            raise TypeError(
                f"backend {self.plan.backend!r} takes {expected.__name__}, "
                f"got {type(options).__name__}"
            )
        return options if threads is None else dataclasses.replace(options, threads=threads)

    def _tower(self, name: str) -> TowerManifest:
        if name not in self.manifest.towers:
            raise BundleError(
                f"bundle {self.bundle_dir} has no {name} tower "
                f"(it has: {', '.join(self.manifest.towers)}); export it with --towers"
            )
        return self.manifest.towers[name]

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

    def session(self, tower_name: str) -> TowerSession:
        """The tower's inference session, created on first use."""
        with self._lock:
            if tower_name not in self._sessions:
                tower = self._tower(tower_name)
                graph = self.plan.towers[tower_name].graph
                self._sessions[tower_name] = get_backend(self.plan.backend).open(
                    graph, tower, self.backend_options, self.plan.auto
                )
                log.info(
                    "%s tower: %s on %s",
                    tower_name,
                    graph.name,
                    self._sessions[tower_name].provider,
                )
            return self._sessions[tower_name]

    def _fit_profile(self, batch_size: int, max_length: int | None = None) -> int:
        """The batch size the backend's shape profile takes (larger batches are split);
        texts longer than the profile are refused before any work."""
        limits = getattr(self.backend_options, "limits", None)
        if limits is None:
            return batch_size
        if max_length is not None:
            limits.check_length(max_length)
        return min(batch_size, limits.max_batch)

    # ----- stages ----------------------------------------------------------------------------

    def finish_options(
        self, truncate_dim: Any, normalize: bool | None, option: str = "truncate_dim"
    ) -> FinishOptions:
        """Validated truncation and normalisation (None: the manifest's `normalize`); errors
        name the setting as `option` (the caller's name for it)."""
        return FinishOptions.checked(
            truncate_dim,
            self.manifest.normalize if normalize is None else normalize,
            self.manifest.embed_dim,
            self.manifest.matryoshka_dimensions,
            option,
        )

    def prepare_texts(
        self, texts: Sequence[Any], task: str | None = None, max_length: int = 512
    ) -> PreparedTexts:
        """Stage 1 for texts: validate, apply the task instruction, tokenise (per-item errors)."""
        self._tower("text")
        assert self.text is not None
        return self.text.prepare(texts, task, max_length)

    def prepare_images(self, images: Sequence[Any], offset: int = 0) -> PreparedImages:
        """Stage 1 for images: decode (or fetch) and preprocess (per-item errors)."""
        self._tower("vision")
        assert self.images is not None
        return self.images.prepare(images, offset)

    def text_batches(self, prepared: PreparedTexts, batch_size: int) -> Iterator[TowerBatch]:
        """Stage 2 for texts: padded batches of the valid items, grouped by length."""
        pad = int(self._tower("text").extra["pad_token_id"])
        return text_batches(prepared, batch_size, pad)

    def image_batches(
        self, prepared: PreparedImages, batch_size: int, offset: int = 0
    ) -> Iterator[TowerBatch]:
        """Stage 2 for images: batches of the valid images in input order (`offset`: the
        index of `prepared`'s first item when it is a chunk of a longer input)."""
        self._tower("vision")
        return image_batches(prepared, batch_size, offset)

    def run(self, tower_name: str, batch: TowerBatch) -> np.ndarray:
        """Stage 3: one batch through the tower's session; the graph's raw output."""
        return self.session(tower_name).run(batch.feeds)

    def finish(
        self, tower_name: str, batch: TowerBatch, output: np.ndarray, options: FinishOptions
    ) -> np.ndarray:
        """Stage 4: pool as the manifest says, refuse NaN/Inf, truncate, normalise."""
        pooling = self._tower(tower_name).pooling
        return finish(tower_name, pooling, batch, output, options)

    # ----- public API ------------------------------------------------------------------------

    def encode_text(
        self,
        sentences: str | Sequence[str],
        task: str | None = None,
        truncate_dim: int | None = None,
        normalize_embeddings: bool | None = True,
        batch_size: int = 32,
        max_length: int = 512,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embed texts: [N, dim] float32, or [dim] for a single string.

        `task="retrieval.query"` prepends the query instruction; the adapter is the same for
        every task (as in the official model). A bad item raises a `TextInputError` naming
        its index.
        """
        texts, single = as_text_list(sentences)
        self._tower("text")
        if not texts:
            raise ValueError("encode_text got an empty list of sentences")
        batch_size = check_batch_size(batch_size)
        options = self.finish_options(truncate_dim, normalize_embeddings)
        assert self.text is not None
        self.text.instruction(task)
        batch_size = self._fit_profile(batch_size, self.text.check_max_length(max_length))
        prepared = self.prepare_texts(texts, task, max_length)
        if (error := prepared.first_error()) is not None:
            raise error
        result = np.empty((len(texts), options.truncate_dim or self.manifest.embed_dim), "float32")
        with _progress(len(texts), show_progress_bar, "encode_text") as bar:
            for batch in self.text_batches(prepared, batch_size):
                output = self.run("text", batch)
                result[batch.items] = self.finish("text", batch, output, options)
                bar.update(len(batch.items))
        return result[0] if single else result

    def encode_image(
        self,
        images: ImageInput | Sequence[ImageInput],
        truncate_dim: int | None = None,
        normalize_embeddings: bool | None = True,
        batch_size: int = 8,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embed images: [N, dim] float32, or [dim] for a single image.

        Items may be paths, bytes, file objects, PIL images, uint8 arrays or data URIs
        (http(s) URLs when the model was loaded with `allow_urls=True`). A bad item raises an
        `ImageInputError` naming its index. Decoding of the next batch overlaps inference.
        """
        items, single = _as_image_list(images)
        self._tower("vision")
        if not items:
            raise ValueError("encode_image got an empty list of images")
        batch_size = check_batch_size(batch_size)
        options = self.finish_options(truncate_dim, normalize_embeddings)
        batch_size = self._fit_profile(batch_size)
        result = np.empty((len(items), options.truncate_dim or self.manifest.embed_dim), "float32")
        with _progress(len(items), show_progress_bar, "encode_image") as bar:
            for start, prepared in self._prepared_chunks(items, batch_size):
                if (error := prepared.first_error()) is not None:
                    raise error
                for batch in self.image_batches(prepared, batch_size, start):
                    output = self.run("vision", batch)
                    result[batch.items] = self.finish("vision", batch, output, options)
                    bar.update(len(batch.items))
        return result[0] if single else result

    def _prepared_chunks(self, items: list[Any], size: int) -> Iterator[tuple[int, PreparedImages]]:
        """(start, prepared chunk) of `size` items, preparing chunk n+1 while chunk n runs."""
        starts = list(range(0, len(items), size))
        # A dedicated thread prepares so that it can itself fan out to the decode pool.
        with ThreadPoolExecutor(1, "clipedge-prefetch") as prefetch:
            pending = prefetch.submit(self.prepare_images, items[: starts[0] + size], 0)
            for position, start in enumerate(starts):
                prepared = pending.result()
                if position + 1 < len(starts):
                    following = starts[position + 1]
                    pending = prefetch.submit(
                        self.prepare_images, items[following : following + size], following
                    )
                yield start, prepared

    def close(self) -> None:
        """Release sessions and worker threads."""
        with self._lock:
            self._sessions.clear()
        if self.images is not None:
            self.images.close()


def load(bundle_dir: str | os.PathLike[str], backend: str = "auto", **kwargs: Any) -> ClipEdgeModel:
    """Open a clipedge bundle; see `ClipEdgeModel` for the options."""
    return ClipEdgeModel(bundle_dir, backend=backend, **kwargs)
