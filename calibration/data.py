"""Calibration data: the user's images and texts, sampled deterministically and turned into
graph inputs by the runtime's own tokenizer and image pipeline, so that calibration sees
exactly what production sees.

Images: a directory (searched recursively), a glob, a text file listing one path per line, or
a list of paths. Texts: a `.txt` file (one per line) or a `.jsonl` file with a `text` field.
Every text is used twice, plain and with each task instruction (query prompts), because both
forms reach the text tower in production; and passages joined from the texts, up to the
512-token default length, stand in for documents, so that calibration ranges and the held-out
accuracy report cover long inputs too (captions alone are short: they hid an int8 attention
drift that only 512-token inputs showed).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from clipedge.errors import ClipEdgeError, ImageInputError, SourceError
from clipedge.inputs.images import load_image
from clipedge.inputs.sources import (
    LIST_SUFFIXES,
    image_paths,
    image_records,
    text_records,
)
from clipedge.model import ClipEdgeModel
from clipedge.pipeline import batches
from clipedge.towers import TEXT, VISION, Prepared, Tower, tower_spec

from .feeds import Feed

log = logging.getLogger(__name__)


class CalibrationDataError(ClipEdgeError, ValueError):
    """Calibration inputs are missing, empty or unreadable."""


def find_images(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Resolve DIR | GLOB | LIST-FILE | list of paths to sorted image paths."""
    path = Path(spec) if isinstance(spec, str | Path) else None
    if path is not None and path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        paths = sorted({Path(record.item) for record in image_records(path)})
    else:
        paths = image_paths(spec)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CalibrationDataError(f"calibration images not found: {', '.join(missing[:5])}")
    if not paths:
        raise CalibrationDataError(f"no calibration images found for {spec!r}")
    return paths


def read_texts(path: str | Path) -> list[str]:
    """Texts from a .txt file (one per line) or a .jsonl file (a `text` field per line)."""
    try:
        texts = [str(record.item).strip() for record in text_records(path)]
    except SourceError as exc:
        raise CalibrationDataError(str(exc)) from exc
    if not texts:
        raise CalibrationDataError(f"{path} holds no texts")
    return texts


def sample(items: Sequence, limit: int | None, seed: int) -> list:
    """A deterministic sample of at most `limit` items (all of them, shuffled, if None)."""
    chosen = list(items)
    random.Random(seed).shuffle(chosen)
    return chosen if limit is None else chosen[:limit]


def readable_images(paths: Sequence[Path], limit: int | None) -> list[Path]:
    """The first `limit` of `paths` that the runtime's image loader decodes.

    Each file it cannot decode is named in a warning and skipped, so one bad file in a photo
    folder does not stop an export halfway; checked before any tower is converted.
    """
    readable: list[Path] = []
    for path in paths:
        if limit is not None and len(readable) == limit:
            break
        try:
            load_image(path, len(readable))
        except ImageInputError as exc:
            log.warning("skipping calibration image %s: %s", path, exc.reason)
            continue
        readable.append(path)
    if not readable:
        raise CalibrationDataError("none of the calibration images could be decoded")
    return readable


# The accuracy gate is a minimum over the held-out items; over a handful it means little (a
# graph passed 0.99 on 6 held-out images and missed it on the calibration images).
MIN_HELD_OUT = 32


def split_held_out(
    items: Sequence, held_out_fraction: float, kind: str = "items"
) -> tuple[list, list]:
    """Calibrate on the first part; judge accuracy (report, gate and block search alike) on
    the rest, never seen by calibration: `held_out_fraction` of the items, but at least
    MIN_HELD_OUT where that leaves half of them for calibration. `kind` names them in the
    messages ("calibration images")."""
    if len(items) < 2:
        raise CalibrationDataError(f"need at least 2 {kind} to hold some out")
    held = max(round(len(items) * held_out_fraction), min(MIN_HELD_OUT, len(items) // 2))
    held = min(len(items) - 1, max(1, held))
    if held < MIN_HELD_OUT:
        log.warning(
            "%d of %d %s held out to judge accuracy (the gate is their minimum): give at "
            "least %d to hold out %d",
            held,
            len(items),
            kind,
            2 * MIN_HELD_OUT,
            MIN_HELD_OUT,
        )
    return list(items[:-held]), list(items[-held:])


@dataclass(frozen=True)
class CalibrationSet:
    """Sampled inputs for one export, already split into calibration and held-out parts."""

    images: list[Path]
    held_out_images: list[Path]
    texts: list[str]
    held_out_texts: list[str]

    @classmethod
    def from_sources(
        cls,
        images: str | Path | Sequence[str | Path] | None,
        texts: str | Path | None,
        limit: int | None = 256,
        held_out_fraction: float = 0.25,
        seed: int = 0,
    ) -> CalibrationSet:
        image_paths = (
            readable_images(sample(find_images(images), None, seed), limit)
            if images is not None
            else []
        )
        text_items = sample(read_texts(texts), limit, seed) if texts is not None else []
        calib_images, held_images = (
            split_held_out(image_paths, held_out_fraction, "calibration images")
            if image_paths
            else ([], [])
        )
        calib_texts, held_texts = (
            split_held_out(text_items, held_out_fraction, "calibration texts")
            if text_items
            else ([], [])
        )
        return cls(calib_images, held_images, calib_texts, held_texts)

    def items(self, tower: str, held_out: bool) -> list:
        """One tower's inputs: the calibration part or the held-out part."""
        parts = {
            TEXT.name: (self.texts, self.held_out_texts),
            VISION.name: (self.images, self.held_out_images),
        }
        return parts[tower][held_out]


def with_task_prompts(texts: Sequence[str], instructions: dict[str, str]) -> list[str]:
    """Each text plain and with every non-empty task instruction prepended."""
    prompts = [p for p in instructions.values() if p]
    return [prefix + text for text in texts for prefix in ["", *prompts]]


# Passage lengths in characters (about 4 per token): ~64, ~256 and >= 512 tokens.
PASSAGE_CHARS = (256, 1024, 2560)


def passages(texts: Sequence[str], lengths: Sequence[int] = PASSAGE_CHARS) -> list[str]:
    """Document-like inputs: texts joined in order (cycling) until each length is reached,
    two per length, starting at the first and the middle text."""
    if not texts:
        return []
    joined = []
    for length in lengths:
        for offset in sorted({0, len(texts) // 2}):
            parts, size, index = [], 0, offset
            while size < length:
                text = texts[index % len(texts)]
                parts.append(text)
                size += len(text) + 1
                index += 1
            joined.append(" ".join(parts))
    return joined


def text_feeds(
    model: ClipEdgeModel, texts: Sequence[str], batch_size: int = 8, max_length: int = 512
) -> Iterator[Feed]:
    """Graph inputs for texts, tokenised exactly as `encode_text` does: each text plain and
    with the query prompts, plus passages; batched by length as `encode_text` batches."""
    inputs = with_task_prompts(texts, model.manifest.task_instructions) + passages(texts)
    tower = model.tower(TEXT.name)
    yield from _feeds(tower, tower.prepare(inputs, max_length=max_length), batch_size)


def image_feeds(
    model: ClipEdgeModel, images: Sequence[Path], batch_size: int = 4
) -> Iterator[Feed]:
    """Graph inputs for images, preprocessed exactly as `encode_image` does."""
    tower = model.tower(VISION.name)
    for start in range(0, len(images), batch_size):
        yield from _feeds(
            tower, tower.prepare(images[start : start + batch_size], start), batch_size
        )


def _feeds(tower: Tower, prepared: Prepared, batch_size: int) -> Iterator[Feed]:
    """The pipeline's own batches of prepared calibration items; any bad item stops."""
    if (error := prepared.first_error()) is not None:
        raise CalibrationDataError(f"calibration {tower.spec.item_kind} {error}")
    rows = [prepared.row(item) for item in range(len(prepared.errors))]
    for batch in batches(tower, rows, prepared.valid, batch_size):
        yield batch.feeds


FEED_BUILDERS = {TEXT.name: text_feeds, VISION.name: image_feeds}


def tower_feeds(
    model: ClipEdgeModel, tower: str, calib: CalibrationSet, held_out: bool
) -> list[Feed]:
    """All feeds of one tower for the calibration or the held-out part."""
    items = calib.items(tower, held_out)
    if not items:
        raise CalibrationDataError(
            f"the {tower} tower needs {tower_spec(tower).calibration_option}"
        )
    return list(FEED_BUILDERS[tower](model, items))
