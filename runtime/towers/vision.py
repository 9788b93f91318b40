"""The vision tower: decode (or fetch) and preprocess images; pixel rows to graph feeds."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..bundle.manifest import Manifest, TowerManifest
from ..errors import BundleError
from ..inputs.images import ImagePreprocessor, load_image, preprocess_images_collect
from ..options import Options
from . import VISION, Prepared


@dataclass
class PreparedImages(Prepared):
    """Pixels [N, 3, S, S] float32 (zeros where the item failed) and each item's decoded size
    (width, height) before resizing (None where it failed)."""

    pixels: np.ndarray
    sizes: list[tuple[int, int] | None]

    def row(self, item: int) -> np.ndarray:
        return self.pixels[item]


class VisionTower:
    """Images -> preprocessed pixels -> `pixel_values`, bit for bit the official pipeline.

    Decoding runs in a thread pool (Pillow releases the GIL); every limit (pixels, URL policy,
    local files) comes from the one `Options`, in this process or a worker's.
    """

    spec = VISION
    sort_window = 1

    def __init__(
        self, entry: TowerManifest, bundle_dir: Path, manifest: Manifest, options: Options
    ) -> None:
        settings = entry.settings
        path = bundle_dir / settings.preprocessor
        try:
            self.preprocessor = ImagePreprocessor.from_config_file(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"cannot read preprocessor config {path}: {exc}") from exc
        if self.preprocessor.size != settings.image_size:
            raise BundleError(
                f"{path} says size {self.preprocessor.size}, the vision graph takes "
                f"{settings.image_size}"
            )
        self.pooling = entry.pooling
        self.image_tokens = settings.tokens
        self.load = functools.partial(load_image, options=options)
        self._workers = options.preprocess_workers or os.cpu_count() or 1
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._workers, "clipedge-decode")
            return self._executor

    def prepare(
        self, items: Sequence[Any], offset: int = 0, *, parallel: bool = True
    ) -> PreparedImages:
        """Pixels for every valid image; errors name `offset + position` (the caller's index).
        `parallel=False` decodes in the calling thread (a server schedules items itself)."""
        sizes: list[tuple[int, int] | None] = [None] * len(items)

        def load(item: Any, position: int) -> Image.Image:
            image = self.load(item, offset + position)
            sizes[position] = image.size
            return image

        pixels, errors = preprocess_images_collect(
            items,
            self.preprocessor,
            load=load,
            executor=self._pool() if parallel else None,
            first_index=offset,
        )
        return PreparedImages(list(errors), pixels, sizes)

    def prepare_ahead(self, items: list[Any], size: int) -> Iterator[tuple[int, PreparedImages]]:
        """(start, prepared chunk) of `size` items, preparing chunk n+1 while the caller runs
        chunk n (decoding overlaps inference)."""
        starts = list(range(0, len(items), size))
        # A dedicated thread prepares so that it can itself fan out to the decode pool.
        with ThreadPoolExecutor(1, "clipedge-prefetch") as prefetch:
            pending = prefetch.submit(self.prepare, items[:size], 0)
            for position, start in enumerate(starts):
                prepared = pending.result()
                if position + 1 < len(starts):
                    following = starts[position + 1]
                    chunk = items[following : following + size]
                    pending = prefetch.submit(self.prepare, chunk, following)
                yield start, prepared

    def feeds(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """`pixel_values` float32 [B, 3, S, S]."""
        return {"pixel_values": np.ascontiguousarray(np.stack(rows), dtype=np.float32)}

    def length(self, row: np.ndarray) -> None:
        return None

    def tokens(self, row: np.ndarray) -> int | None:
        return self.image_tokens

    def batch_order(self, rows: Sequence[Any], items: Sequence[int]) -> list[int]:
        return list(items)

    def close(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
