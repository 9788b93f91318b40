"""`clipedge.load(bundle)`: the official model's `encode_text` / `encode_image`, torch-free.

A thin facade over the core: the bundle's typed manifest, an execution plan (backend and
precision per tower, chosen once), the tower objects (`clipedge.towers`) and one
`Pipeline` per tower. One session per tower, created on first use, so a text-only service
never loads the vision graph. Every call is thread-safe: sessions and towers are shared
read-only, and the lazily created pieces are guarded by a lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .bundle.checks import check_bundle
from .bundle.manifest import Manifest, read_manifest
from .engine.plan import ExecutionPlan, plan_execution
from .engine.registry import backend as get_backend
from .engine.session import TowerSession
from .errors import OptionError
from .inputs.images import ImageInput, as_image_list
from .inputs.text import as_text_list
from .options import Options
from .pipeline import Embedded, FinishOptions, Pipeline, check_batch_size
from .towers import Tower, missing_tower, open_towers

log = logging.getLogger(__name__)


def _progress(total: int, enabled: bool | None, desc: str):
    """A tqdm bar, shown when asked for (None: when logging is at INFO or more verbose)."""
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = log.getEffectiveLevel() <= logging.INFO
    return tqdm(total=total, desc=desc, unit="item", disable=not enabled)


class ClipEdgeModel:
    """jina-clip-v2 from a clipedge bundle, with the official calling convention.

    `backend`: "auto", "cpu", "cuda", "tensorrt", "tensorrt-native" or "openvino";
    `precision`: a graph precision of the bundle (default: the fastest that passed for the
    backend); `options`: the `Options` every consumer shares (input limits, URL policy,
    checksums, threads, max length), each of its fields also accepted as a keyword;
    `backend_options`: the backend's own dataclass (`OnnxruntimeOptions`, ...).
    """

    def __init__(
        self,
        bundle_dir: str | os.PathLike[str],
        backend: str = "auto",
        precision: str | None = None,
        *,
        options: Options | None = None,
        backend_options: Any = None,
        **option_overrides: Any,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.options = (options or Options()).replace(**option_overrides)
        self.manifest: Manifest = read_manifest(self.bundle_dir)
        self.plan: ExecutionPlan = plan_execution(
            self.manifest, self.bundle_dir, backend, precision, backend_options
        )
        backend = get_backend(self.plan.backend)
        self.backend_options = backend.checked_options(backend_options, self.options.threads)
        graphs = {name: tower.graph for name, tower in self.plan.towers.items()}
        check_bundle(self.bundle_dir, self.manifest, graphs, self.options.verify_checksums)
        self.towers: dict[str, Tower] = open_towers(self.manifest, self.bundle_dir, self.options)
        self._pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()

    @property
    def precisions(self) -> dict[str, str]:  # the precision each tower runs at
        return self.plan.precisions

    def tower(self, name: str) -> Tower:
        """The named tower; a `BundleError` when the bundle was exported without it."""
        if name not in self.towers:
            raise missing_tower(self.bundle_dir, name, list(self.towers))
        return self.towers[name]

    def pipeline(self, name: str) -> Pipeline:
        """The tower's pipeline; its inference session is created on first use."""
        tower = self.tower(name)
        with self._lock:
            if name not in self._pipelines:
                graph = self.plan.towers[name].graph
                session = get_backend(self.plan.backend).open(
                    graph, self.manifest.towers[name], self.backend_options, self.plan.auto
                )
                log.info("%s tower: %s on %s", name, graph.name, session.provider)
                self._pipelines[name] = Pipeline(
                    tower, session, self.manifest.embed_dim, self.options.max_batch_tokens
                )
            return self._pipelines[name]

    def session(self, name: str) -> TowerSession:
        return self.pipeline(name).session

    def finish_options(
        self, truncate_dim: Any, normalize: Any, option: str = "truncate_dim"
    ) -> FinishOptions:
        """Validated truncation and normalisation; errors name the setting as `option` (the
        caller's name for it). `normalize` is truthy or not, as in the official model."""
        return FinishOptions.checked(
            truncate_dim,
            bool(normalize),
            self.manifest.embed_dim,
            self.manifest.matryoshka_dimensions,
            option,
        )

    def encode_text(
        self,
        sentences: str | Sequence[str],
        task: str | None = None,
        truncate_dim: int | None = None,
        normalize_embeddings: bool = True,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Embed texts: [N, dim] float32, or [dim] for a single string.

        `task="retrieval.query"` prepends the query instruction; `max_length`: tokens kept
        (default: the bundle's, 512). A bad item raises an `InputError` naming its index.
        """
        texts, single = as_text_list(sentences)
        tower = self.tower("text")
        if not texts:
            raise OptionError("encode_text got an empty list of sentences")
        batch_size = check_batch_size(batch_size)
        options = self.finish_options(truncate_dim, normalize_embeddings)
        prepared = tower.prepare(texts, task=task, max_length=max_length)
        if (error := prepared.first_error()) is not None:
            raise error
        with _progress(len(texts), show_progress_bar, "encode_text") as bar:
            embedded = self.pipeline("text").embed(prepared, batch_size, options, 0, bar.update)
        return self._result(embedded, single)

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
        (http(s) URLs with `allow_urls=True`). A bad item raises an `ImageInputError` naming
        its index. Decoding of the next batch overlaps inference.
        """
        items, single = as_image_list(images)
        tower = self.tower("vision")
        if not items:
            raise OptionError("encode_image got an empty list of images")
        batch_size = check_batch_size(batch_size)
        options = self.finish_options(truncate_dim, normalize_embeddings)
        parts = []
        with _progress(len(items), show_progress_bar, "encode_image") as bar:
            for start, prepared in tower.prepare_ahead(items, batch_size):
                if (error := prepared.first_error()) is not None:
                    raise error
                pipeline = self.pipeline("vision")
                embedded = pipeline.embed(prepared, batch_size, options, start, bar.update)
                if (error := embedded.first_error()) is not None:
                    raise error
                parts.append(embedded.vectors)
        vectors = np.concatenate(parts)
        return vectors[0] if single else vectors

    @staticmethod
    def _result(embedded: Embedded, single: bool) -> np.ndarray:
        if (error := embedded.first_error()) is not None:
            raise error
        return embedded.vectors[0] if single else embedded.vectors

    def close(self) -> None:
        """Release sessions and worker threads."""
        with self._lock:
            for pipeline in self._pipelines.values():
                pipeline.session.close()
            self._pipelines.clear()
        for tower in self.towers.values():
            tower.close()


def load(bundle_dir: str | os.PathLike[str], backend: str = "auto", **kwargs: Any) -> ClipEdgeModel:
    """Open a clipedge bundle; see `ClipEdgeModel` and `Options` for the settings."""
    return ClipEdgeModel(bundle_dir, backend=backend, **kwargs)
