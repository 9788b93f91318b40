"""Throughput of the runtime's pre-processing: image decode/resize/normalise and tokenisation.

Images: a 1280x848 JPEG (quality 90), either a deterministic synthetic photo-like picture or,
with --skimage-photo, a scikit-image sample photograph resized to 1280x848; measured stage by
stage on one thread, end to end on one thread, and through a thread pool. Text:
`TextTokenizer.tokenize` plus padding on batches of 32 short (~10 words) and long (~400 tokens)
texts. Prints a markdown table and writes the figures as JSON to --out. The image path is
checked bit for bit against a plain PIL resize-then-crop and float32 arithmetic before timing.

    python -m benchmarks.preprocess --out preprocess.json
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from clipedge.inputs.images import ImagePreprocessor, load_image, preprocess_images
from clipedge.inputs.text import TextTokenizer
from clipedge.towers.text import text_feeds

from .common import FIXTURE, markdown_table, write_json
from .machine import machine_info

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
WORDS = (
    "the quick brown fox jumps over a lazy dog near river bank with beautiful sunset on "
    "beach palm trees photo of cat sitting red sofa city street at night under rain"
).split()


def photo_like_image(width: int = 1280, height: int = 848) -> Image.Image:
    """Smooth colour fields, blurred shapes and sensor-like noise: JPEG-coded like a photo."""
    rng = np.random.default_rng(20241122)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.full((height, width, 3), 120.0, dtype=np.float32)
    for channel in range(3):
        for _ in range(6):
            fx, fy = rng.uniform(0.5, 6.0, 2)
            phase = rng.uniform(0.0, 2 * np.pi)
            wave = np.sin(2 * np.pi * (fx * xx / width + fy * yy / height) + phase)
            field[..., channel] += rng.uniform(10, 40) * wave
    image = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(150):
        x, y, r = (
            int(rng.integers(0, width)),
            int(rng.integers(0, height)),
            int(rng.integers(5, 120)),
        )
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x, y, x + r, y + r // 2), fill=colour)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    noisy = blurred + rng.normal(0, 6, blurred.shape).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def source_jpeg(skimage_photo: str | None) -> bytes:
    """The benchmark input as JPEG bytes (quality 90, 1280x848)."""
    if skimage_photo is None:
        image = photo_like_image()
    else:
        import skimage.data  # optional: only for --skimage-photo

        photo = Image.fromarray(getattr(skimage.data, skimage_photo)()).convert("RGB")
        image = photo.resize((1280, 848), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def plain_reference(data: bytes, size: int) -> np.ndarray:
    """The official pipeline written plainly: open, convert, resize, crop, x/255, (x-m)/s."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_w, new_h = (size, int(size * long / short))[:: 1 if width <= height else -1]
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    pixels = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32)
    scaled = pixels / np.float32(255)
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    return ((scaled - mean) / std).transpose(2, 0, 1)


def timed_row(stage: str, fn: Callable[[], object], items: int, calls: int, rounds: int) -> dict:
    """Time `rounds` rounds of `calls` calls (after a warm-up call), each call handling `items`.

    Shared machines are noisy: the median round is the typical figure, the best round the
    closest to the code's own cost, and process CPU time (all threads) gives items per
    CPU-second, which other processes competing for the cores do not inflate.
    """
    fn()
    wall, cpu = [], []
    for _ in range(rounds):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        cpu.append((time.process_time() - cpu_start) / (calls * items))
        wall.append((time.perf_counter() - wall_start) / (calls * items))
    median = statistics.median(wall)
    return {
        "stage": stage,
        "ms_per_item": median * 1e3,
        "items_per_s": 1 / median,
        "best_items_per_s": 1 / min(wall),
        "items_per_cpu_s": 1 / statistics.median(cpu),
    }


def bench_images(args: argparse.Namespace) -> tuple[list[dict], bool]:
    data = source_jpeg(args.skimage_photo)
    preprocessor = ImagePreprocessor(args.size, CLIP_MEAN, CLIP_STD)
    ours = preprocessor(load_image(data, 0))
    exact = bool(np.array_equal(ours, plain_reference(data, args.size)))
    decoded = load_image(data, 0)
    cropped = preprocessor.resize_and_crop(decoded)
    out = np.empty((3, args.size, args.size), dtype=np.float32)
    single = {
        "decode (bytes -> RGB), 1 thread": lambda: load_image(data, 0),
        "resize + crop, 1 thread": lambda: preprocessor.resize_and_crop(decoded),
        "normalise, 1 thread": lambda: preprocessor.normalize(cropped, out),
        "total, 1 thread": lambda: preprocessor(load_image(data, 0), out),
    }
    rows = [timed_row(stage, fn, 1, args.image_calls, args.rounds) for stage, fn in single.items()]
    batch = [data] * args.pool_batch
    with ThreadPoolExecutor(max_workers=args.workers) as executor:
        rows.append(
            timed_row(
                f"total, thread pool x{args.workers}",
                lambda: preprocess_images(batch, preprocessor, executor=executor),
                len(batch),
                1,
                args.rounds,
            )
        )
    return rows, exact


def bench_text(args: argparse.Namespace) -> list[dict]:
    tokenizer = TextTokenizer(args.tokenizer)
    rng = np.random.default_rng(0)
    short = [" ".join(rng.choice(WORDS, 10)) for _ in range(32)]
    words = []
    while len(tokenizer.tokenize([" ".join(words)], 8192)[0]) < 400:
        words.append(str(rng.choice(WORDS)))
    long_text = " ".join(words)
    long = [long_text[offset:] + " " + long_text[:offset] for offset in range(32)]
    rows = []
    for name, texts in (("short (~10 words)", short), ("long (~400 tokens)", long)):
        row = timed_row(
            f"tokenise {name}, batch 32",
            lambda t=texts: text_feeds(tokenizer.tokenize(t, 512), 1),
            len(texts),
            20,
            args.rounds,
        )
        row["mean_tokens"] = float(np.mean([len(ids) for ids in tokenizer.tokenize(texts, 512)]))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON figures")
    parser.add_argument(
        "--size", type=int, default=512, help="model input size (jina-clip-v2: 512)"
    )
    parser.add_argument(
        "--skimage-photo",
        help="scikit-image sample photo (e.g. coffee) instead of the synthetic picture",
    )
    parser.add_argument("--workers", type=int, default=2, help="thread-pool size")
    parser.add_argument("--pool-batch", type=int, default=64, help="images per pooled batch")
    parser.add_argument("--image-calls", type=int, default=30, help="calls per timing round")
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (median reported)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=FIXTURE / "checkpoint" / "tokenizer.json",
        help="tokenizer.json to time (default: the tiny fixture's 317-piece tokenizer)",
    )
    args = parser.parse_args()

    image_rows, exact = bench_images(args)
    text_rows = bench_text(args)
    source = f"{args.skimage_photo or 'synthetic photo-like'} 1280x848 JPEG q90"
    print(f"{args.size}x{args.size} from a {source}; exact parity: {exact}\n")
    rows = [
        (
            row["stage"],
            f"{row['ms_per_item']:.3f}",
            f"{row['items_per_s']:.1f}",
            f"{row['best_items_per_s']:.1f}",
            f"{row['items_per_cpu_s']:.1f}",
        )
        for row in image_rows + text_rows
    ]
    header = ("stage", "ms/item", "items/s", "items/s, best round", "items per CPU-second")
    print(markdown_table(header, rows, "lrrrr"))
    result = {
        "exact_parity": exact,
        "image_size": args.size,
        "source_image": source,
        "images": image_rows,
        "text": text_rows,
        "tokenizer": str(args.tokenizer),
        "environment": machine_info(1, ("numpy", "PIL", "tokenizers")),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
