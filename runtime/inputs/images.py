"""Image decoding and preprocessing, equal to the official jina-clip-v2 image pipeline.

Official pipeline: `Image.open(...).convert("RGB")`, torchvision `Resize(size, BICUBIC)` of the
shortest side (= PIL's antialiased bicubic, long side `int(size * long / short)`),
`CenterCrop(size)` with `int(round((H - size) / 2.0))`, `ToTensor()` (x / 255 in float32) and
`Normalize(mean, std)`. Everything here reproduces that bit for bit, only faster:

- landscape images are cropped between PIL's two separable passes (horizontal, then vertical,
  each rounded to uint8 in PIL too), so the vertical pass only computes the kept columns;
- strips (short side below `size`, resized long side over `FULL_RESIZE_MAX_ASPECT` x `size`)
  compute only the kept rows/columns of the long-axis pass (`_long_axis_pass`), so a 1 x 800000
  PNG costs what a square image does instead of gigabytes;
- `(x / 255 - mean) / std` takes only 256 values per channel, so it is a float32 lookup table
  computed with the same float32 operations as torch;
- Pillow keeps freed image buffers for reuse (see `cache_pillow_buffers`).

Errors are `ImageInputError`s naming the item index, so a batch caller can report which input
failed. EXIF orientation is not applied (the official pipeline does not either). URLs are fetched
by `clipedge.inputs.fetch` under a `UrlPolicy`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

# DEFAULT_MAX_URL_BYTES and DEFAULT_URL_TIMEOUT are re-exported for existing imports.
from ..errors import ImageInputError
from ..options import Options
from .fetch import fetch_url

# Enough for about four images in flight (decoded, resized, cropped and final buffers each).
PILLOW_BLOCKS_CACHED = 16
# Up to this resized long side (in multiples of `size`) a plain PIL resize is used; longer strips
# with a short side below `size` compute only the rows/columns the centre crop keeps.
FULL_RESIZE_MAX_ASPECT = 4
# Pillow's fixed-point resampling (Resample.c): 8-bit results, 2 bits of headroom.
_PRECISION_BITS = 32 - 8 - 2

ImageInput = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray
)
ImageLoader = Callable[[Any, int], Image.Image]

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DEFAULT_OPTIONS = Options()


SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)


def as_image_list(images: Any) -> tuple[list[Any], bool]:
    """The caller's images as a list, and whether a single image was given."""
    if isinstance(images, SINGLE_IMAGE_TYPES) or hasattr(images, "read") or hasattr(images, "mode"):
        return [images], True
    if images is None or isinstance(images, int | float | Mapping | set | frozenset):
        raise TypeError(f"expected an image or a list of images, got {type(images).__name__}")
    try:
        return list(images), False
    except TypeError as exc:
        raise TypeError(
            f"expected an image or a list of images, got {type(images).__name__}"
        ) from exc


def load_image(item: ImageInput, index: int, options: Options = DEFAULT_OPTIONS) -> Image.Image:
    """Decode one input to an RGB PIL image exactly as the official code does.

    Accepted: file paths (str or os.PathLike), encoded bytes, binary file objects, PIL images,
    uint8 NumPy arrays (HxW and HxWx1 as gray, HxWx3 RGB, HxWx4 RGBA), `data:image/...;base64,`
    URIs and, only when `options.allow_urls`, http(s) URLs (fetched by `fetch.fetch_url`:
    public addresses only unless `allow_private_urls`, one total deadline, a size cap); paths
    only when `options.allow_files`. Images with more than `options.max_image_pixels` pixels
    are refused, for encoded inputs from the header before decoding; None sets no clipedge
    limit on input pixels, but Pillow's own
    decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, refused above twice its value) still
    applies. RGB conversion is PIL's `convert("RGB")`: alpha is dropped without compositing,
    gray is replicated, palette and CMYK are converted as PIL does.
    """
    max_pixels = options.max_image_pixels
    if item is None:
        raise ImageInputError(index, "got None instead of an image")
    if isinstance(item, Image.Image):
        _check_size(item.size, index, max_pixels)
        return _to_rgb(item, index)
    if isinstance(item, np.ndarray):
        image = _image_from_array(item, index)
        _check_size(image.size, index, max_pixels)
        return _to_rgb(image, index)
    source = _encoded_source(item, index, options)
    try:
        opened = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageInputError(index, f"image too large: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageInputError(index, "not a recognised image file (or corrupt header)") from exc
    except MemoryError as exc:
        raise ImageInputError(index, "not enough memory to open the image") from exc
    except OSError as exc:
        raise ImageInputError(index, f"cannot read the image: {exc}") from exc
    # Leaving the block closes a file Pillow opened itself (paths), never a caller's stream.
    with opened as image:
        _check_size(image.size, index, max_pixels)
        return _to_rgb(image, index)


def _encoded_source(item: Any, index: int, options: Options) -> str | BinaryIO:
    """A path or binary stream for `Image.open`, from every input kind that holds encoded data."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return io.BytesIO(item)
    if isinstance(item, str) and item.startswith("data:"):
        return io.BytesIO(_data_uri_bytes(item, index))
    if isinstance(item, str) and _URL_SCHEME.match(item):
        return io.BytesIO(fetch_url(item, index, options.url_policy))
    if isinstance(item, (str, os.PathLike)) and not options.allow_files:
        # Says nothing about the file system: whether such a path exists stays unknown.
        raise ImageInputError(
            index, "local file paths are not accepted here: send the image as base64 or a URL"
        )
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            raise ImageInputError(index, f"file not found: {path}")
        if not path.is_file():
            raise ImageInputError(index, f"not a regular file: {path}")
        return os.fspath(path)
    if isinstance(item, io.TextIOBase):
        raise ImageInputError(index, "file object is opened in text mode; open it with 'rb'")
    if hasattr(item, "read"):
        return item
    raise ImageInputError(index, f"unsupported input type {type(item).__name__}")


def _check_size(size: tuple[int, int], index: int, max_pixels: int | None) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageInputError(index, f"empty image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageInputError(
            index, f"image too large: {width}x{height} pixels exceeds max_image_pixels={max_pixels}"
        )


def _to_rgb(image: Image.Image, index: int) -> Image.Image:
    """Decode the pixel data (lazy until now) and convert like the official `convert("RGB")`."""
    try:
        image.load()
    except MemoryError as exc:
        width, height = image.size
        raise ImageInputError(index, f"not enough memory to decode {width}x{height}") from exc
    # Pillow's format plugins raise many exception types on malformed data.
    except Exception as exc:
        raise ImageInputError(index, f"corrupt or truncated image data: {exc}") from exc
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except MemoryError as exc:
        width, height = image.size
        raise ImageInputError(
            index, f"not enough memory to convert {width}x{height} {image.mode} to RGB"
        ) from exc
    except ValueError as exc:
        raise ImageInputError(index, f"cannot convert mode {image.mode} to RGB: {exc}") from exc


def _image_from_array(array: np.ndarray, index: int) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageInputError(index, f"NumPy image must have dtype uint8, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ImageInputError(
            index, f"NumPy image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}"
        )
    if 0 in array.shape:
        raise ImageInputError(index, f"empty image (array shape {array.shape})")
    # uint8 HxW, HxWx3 and HxWx4 become PIL modes L, RGB and RGBA.
    return Image.fromarray(np.ascontiguousarray(array))


def _data_uri_bytes(uri: str, index: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ImageInputError(index, "data URI must look like 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(index, f"data URI payload is not valid base64: {exc}") from exc


def cache_pillow_buffers(blocks: int = PILLOW_BLOCKS_CACHED) -> None:
    """Let Pillow keep up to `blocks` freed image buffers instead of returning them to the OS.

    Pillow's default (PILLOW_BLOCKS_MAX=0) makes every image touch fresh pages: about 2000 page
    faults and 20% of the CPU time for a 1280x848 JPEG. Cached blocks are at most Pillow's block
    size (16 MiB) each. Process-wide; an explicit PILLOW_BLOCKS_MAX and larger settings are kept.
    """
    if "PILLOW_BLOCKS_MAX" not in os.environ and Image.core.get_blocks_max() < blocks:
        Image.core.set_blocks_max(blocks)


class ImagePreprocessor:
    """Shortest-side bicubic resize, centre crop and mean/std normalisation to float32 CHW.

    Constructing one calls `cache_pillow_buffers()`.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        mean32 = np.asarray(mean, dtype=np.float32)
        std32 = np.asarray(std, dtype=np.float32)
        if mean32.shape != (3,) or std32.shape != (3,) or not np.all(std32 > 0):
            raise ValueError(f"mean and std need 3 values (std > 0), got {mean} and {std}")
        self.size = size
        # The same float32 operations as ToTensor (x / 255) then Normalize ((x - mean) / std).
        levels = np.arange(256, dtype=np.float32) / np.float32(255)
        self._table = (levels[None, :] - mean32[:, None]) / std32[:, None]
        cache_pillow_buffers()

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ImagePreprocessor:
        """Build from the fields of a jina-clip `preprocessor_config.json`."""
        for key, supported in (("resize_mode", "shortest"), ("interpolation", "bicubic")):
            if config.get(key, supported) != supported:
                raise ValueError(f"unsupported {key} {config[key]!r} (only {supported!r})")
        return cls(int(config["size"]), config["mean"], config["std"])

    @classmethod
    def from_config_file(cls, path: str | os.PathLike[str]) -> ImagePreprocessor:
        return cls.from_config(json.loads(Path(path).read_text(encoding="utf-8")))

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """RGB image -> uint8 [size, size, 3], equal to PIL resize followed by the centre crop.

        Memory is bounded by the output and the input, never by the resized strip: when the
        short side is below `size` and the resized long side exceeds `FULL_RESIZE_MAX_ASPECT`
        times `size`, only the kept rows/columns of the long-axis pass are computed.
        """
        size = self.size
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(size * long / short)
        offset = int(round((new_long - size) / 2.0))
        strip = short < size and new_long > FULL_RESIZE_MAX_ASPECT * size
        if strip and image.mode in ("RGB", "L"):
            return _resize_strip(image, size, new_long, offset)
        if width > height:
            if new_long != width:
                image = image.resize((new_long, height), Image.Resampling.BICUBIC)
            image = image.crop((offset, 0, offset + size, height))
            if height != size:
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(image)
        if (width, height) != (size, new_long):
            image = image.resize((size, new_long), Image.Resampling.BICUBIC)
        return np.asarray(image)[offset : offset + size]

    def normalize(self, pixels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 [H, W, 3] -> float32 [3, H, W] via the per-channel lookup table."""
        if out is None:
            out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            # mode="clip" avoids the buffered bounds check; uint8 indices are always in range.
            np.take(self._table[channel], pixels[:, :, channel], out=out[channel], mode="clip")
        return out

    def __call__(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """RGB PIL image -> float32 [3, size, size] (written into `out` when given)."""
        return self.normalize(self.resize_and_crop(image), out)


def _resize_strip(image: Image.Image, size: int, new_long: int, offset: int) -> np.ndarray:
    """`resize_and_crop` for a strip whose short side is below `size`: the same pixels.

    PIL upsamples both axes of such an image with the horizontal pass first (Pillow 13 puts the
    vertical pass first only when the height shrinks), so the official result is: landscape,
    the long (horizontal) pass, then the short (vertical) one; portrait, the short (horizontal)
    pass, then the long (vertical) one. The short pass stays PIL's own; the long pass is
    `_long_axis_pass` over the kept rows/columns only, fed with just the source lines they read.
    """
    width, height = image.size
    landscape = width > height
    first, taps, weights = _bicubic_coefficients(
        width if landscape else height, new_long, offset, size
    )
    start, stop = int(first[0]), int((first + taps).max())
    if landscape:
        band = np.asarray(image.crop((start, 0, stop, height))).swapaxes(0, 1)
        columns = _long_axis_pass(band, first - start, weights).swapaxes(0, 1)
        kept = Image.fromarray(np.ascontiguousarray(columns))
        if height != size:
            kept = kept.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(kept)
    band = image.crop((0, start, width, stop))
    if width != size:
        band = band.resize((size, stop - start), Image.Resampling.BICUBIC)
    return _long_axis_pass(np.asarray(band), first - start, weights)


def _bicubic_coefficients(
    in_size: int, out_size: int, first: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's BICUBIC taps for outputs `first`..`first + count` of an `in_size -> out_size` pass.

    The same double-precision operations, in the same order, as `precompute_coeffs` and
    `normalize_coeffs_8bpc` in Pillow's Resample.c for a whole-image resize (box 0..in_size as
    C floats), so the integer weights are Pillow's. Only called for upsampling (out_size >
    in_size): filter scale 1, support 2, at most 5 taps. Returns the first source line and the
    number of lines of each output, and the int32 weights [count, ksize] (zero past the taps).
    """
    scale = float(np.float32(in_size)) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(first, first + count, dtype=np.float64) + 0.5) * scale
    first_line = np.maximum((center - support + 0.5).astype(np.int64), 0)
    taps = np.minimum((center + support + 0.5).astype(np.int64), in_size) - first_line
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((count, ksize))
    total = np.zeros(count)
    for tap in range(ksize):
        x = np.abs(((tap + first_line).astype(np.float64) - center + 0.5) * inv_filterscale)
        # Pillow's bicubic_filter with a = -0.5, term by term.
        inner = (1.5 * x - 2.5) * x * x + 1.0
        outer = (((x - 5.0) * x + 8.0) * x - 4.0) * -0.5
        w = np.where(tap < taps, np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0)), 0.0)
        weights[:, tap] = w
        total += w
    weights /= np.where(total != 0.0, total, 1.0)[:, None]
    scaled = weights * float(1 << _PRECISION_BITS)
    rounded = np.where(weights < 0, -0.5 + scaled, 0.5 + scaled)
    return first_line, taps, rounded.astype(np.int32)


def _long_axis_pass(lines: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Pillow's 8-bit resampling along axis 0: uint8 [n, m, ...] -> uint8 [len(first), m, ...].

    Output i is sum_t weights[i, t] * lines[first[i] + t] in int32 fixed point, rounded and
    clipped as Pillow's `clip8`.
    """
    out = np.full((len(first), *lines.shape[1:]), 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    last = lines.shape[0] - 1
    per_line = (-1,) + (1,) * (lines.ndim - 1)
    for tap in range(weights.shape[1]):
        if weights[:, tap].any():
            out += weights[:, tap].reshape(per_line) * lines[np.minimum(first + tap, last)]
    return np.clip(out >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def preprocess_images_collect(
    items: Sequence[ImageInput],
    preprocessor: ImagePreprocessor,
    *,
    load: ImageLoader = load_image,
    executor: Executor | None = None,
    first_index: int = 0,
) -> tuple[np.ndarray, list[ImageInputError | None]]:
    """Preprocess every item, keeping going past bad ones.

    Returns the float32 [N, 3, S, S] batch and one entry per item: None, or the item's
    `ImageInputError` (its row is zeros). A MemoryError while loading or resizing becomes an
    `ImageInputError` naming `first_index + position` (pass the batch's offset in the
    caller's list). `load` is e.g. `functools.partial(load_image,
    url_policy=UrlPolicy(allow_urls=True))`, called with (item, position); with an `executor`
    items run in parallel (Pillow releases the GIL).
    """
    size = preprocessor.size
    pixels = np.empty((len(items), 3, size, size), dtype=np.float32)

    def run(index: int) -> ImageInputError | None:
        image = None
        try:
            image = load(items[index], index)
            preprocessor(image, out=pixels[index])
        except ImageInputError as exc:
            pixels[index] = 0.0
            return exc
        except MemoryError as exc:
            pixels[index] = 0.0
            what = (
                "load the image" if image is None else "resize the {}x{} image".format(*image.size)
            )
            error = ImageInputError(first_index + index, f"not enough memory to {what}")
            error.__cause__ = exc
            return error
        return None

    indices = range(len(items))
    errors = list(executor.map(run, indices) if executor else map(run, indices))
    return pixels, errors


def preprocess_images(
    items: Sequence[ImageInput],
    preprocessor: ImagePreprocessor,
    *,
    load: ImageLoader = load_image,
    executor: Executor | None = None,
) -> np.ndarray:
    """Preprocess a batch to float32 [N, 3, S, S]; raises the lowest-index `ImageInputError`."""
    pixels, errors = preprocess_images_collect(items, preprocessor, load=load, executor=executor)
    for error in errors:
        if error is not None:
            raise error
    return pixels
