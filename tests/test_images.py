"""Image decoding and preprocessing against the fixture's recorded official outputs."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from clipedge.errors import OptionError
from clipedge.inputs import images as images_module
from clipedge.inputs.images import (
    PILLOW_BLOCKS_CACHED,
    ImageInputError,
    ImagePreprocessor,
    load_image,
    preprocess_images,
    preprocess_images_collect,
)
from clipedge.options import Options

FIXTURE = Path(__file__).parent / "fixtures" / "jina-clip-v2-tiny"
EXPECTED = FIXTURE / "expected"
MANIFEST = json.loads((EXPECTED / "manifest.json").read_text(encoding="utf-8"))
IMAGE_FILES = [EXPECTED / name for name in MANIFEST["images"]]
PIXEL_VALUES = np.load(EXPECTED / "image_pixel_values.npy")
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def preprocessor() -> ImagePreprocessor:
    return ImagePreprocessor.from_config_file(FIXTURE / "checkpoint" / "preprocessor_config.json")


def as_data_uri(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


INPUT_KINDS: dict[str, Callable[[Path], Any]] = {
    "str": str,
    "path": lambda path: path,
    "bytes": lambda path: path.read_bytes(),
    "bytearray": lambda path: bytearray(path.read_bytes()),
    "file": lambda path: io.BytesIO(path.read_bytes()),
    "pil": Image.open,
    "numpy": lambda path: np.asarray(Image.open(path)),
    "data_uri": as_data_uri,
}


@pytest.mark.parametrize("number", range(len(IMAGE_FILES)))
def test_decoded_rgb_equals_reference(number):
    image = load_image(str(IMAGE_FILES[number]), number)
    assert image.mode == "RGB"
    expected = np.load(EXPECTED / f"image{number}_decoded_rgb.npy")
    np.testing.assert_array_equal(np.asarray(image), expected)


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_pixel_values_equal_reference_for_every_input_kind(preprocessor, kind):
    items = [INPUT_KINDS[kind](path) for path in IMAGE_FILES]
    pixels = preprocess_images(items, preprocessor)
    assert pixels.dtype == np.float32 and pixels.shape == PIXEL_VALUES.shape
    np.testing.assert_allclose(pixels, PIXEL_VALUES, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(pixels, PIXEL_VALUES)


def test_opened_file_object_is_read_and_left_open(preprocessor):
    with IMAGE_FILES[3].open("rb") as stream:
        pixels = preprocessor(load_image(stream, 0))
        assert not stream.closed
    np.testing.assert_array_equal(pixels, PIXEL_VALUES[3])


def test_rgba_array_drops_alpha_like_pil():
    rgba = np.asarray(Image.open(IMAGE_FILES[2]))
    assert rgba.shape[2] == 4
    np.testing.assert_array_equal(np.asarray(load_image(rgba, 0)), rgba[:, :, :3])


def test_gray_array_with_channel_axis_equals_gray_array():
    gray = np.asarray(Image.open(IMAGE_FILES[1]))
    assert gray.ndim == 2
    expected = np.asarray(load_image(gray, 0))
    np.testing.assert_array_equal(np.asarray(load_image(gray[:, :, None], 0)), expected)
    np.testing.assert_array_equal(expected, np.repeat(gray[:, :, None], 3, axis=2))


def test_thread_pool_gives_the_same_batch(preprocessor):
    items = [str(path) for path in IMAGE_FILES] * 3
    with ThreadPoolExecutor(max_workers=3) as executor:
        pixels = preprocess_images(items, preprocessor, executor=executor)
    np.testing.assert_array_equal(pixels, np.concatenate([PIXEL_VALUES] * 3))


def reference_resize_crop(image: Image.Image, size: int) -> np.ndarray:
    """torchvision Resize(size, BICUBIC) + CenterCrop(size) on a PIL image, written plainly."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return np.asarray(resized.crop((left, top, left + size, top + size)))


def test_split_pass_resize_equals_plain_resize_then_crop():
    rng = np.random.default_rng(7)
    sizes = [(97, 61), (61, 97), (64, 64), (65, 64), (64, 65), (1, 9), (9, 1), (300, 31)]
    sizes += [tuple(int(v) for v in rng.integers(2, 260, 2)) for _ in range(40)]
    for target in (16, 64):
        preprocessor = ImagePreprocessor(target, CLIP_MEAN, CLIP_STD)
        for width, height in sizes:
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            np.testing.assert_array_equal(
                preprocessor.resize_and_crop(image),
                reference_resize_crop(image, target),
                err_msg=f"{width}x{height} -> {target}",
            )


def strip_shapes(size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Awkward (width, height) pairs with the short side below `size`, both orientations."""
    fixed = [(1, 2), (1, 9), (1, 30), (2, 3), (3, 1001), (7, 400), (size - 1, size)]
    fixed += [(size - 1, size + 1), (size - 2, size - 1), (size - 1, 4 * size + 3)]
    fixed += [(size // 2, size), (size // 3, 3 * size + 1), (1, 4 * size + 1)]
    fixed += [tuple(int(v) for v in rng.integers(1, size, 2)) for _ in range(12)]
    fixed += [(int(s), int(s * rng.uniform(1, 30)) + 1) for s in rng.integers(1, size, 12)]
    shapes = fixed + [(height, width) for width, height in fixed]
    # The plain reference resizes the whole strip: keep it affordable.
    return [(w, h) for w, h in shapes if size * size * max(w, h) / min(w, h) < 8e6]


@pytest.fixture()
def strip_calls(monkeypatch) -> list[tuple]:
    """Records each use of the kept-rows/columns path."""
    calls: list[tuple] = []
    strip = images_module._resize_strip
    monkeypatch.setattr(
        images_module, "_resize_strip", lambda *args: calls.append(args[1:]) or strip(*args)
    )
    return calls


def test_strip_path_equals_plain_resize_then_crop(monkeypatch, strip_calls):
    """The kept-rows/columns path, forced on every shape it handles, equals PIL bit for bit."""
    monkeypatch.setattr(images_module, "FULL_RESIZE_MAX_ASPECT", 0)
    rng = np.random.default_rng(11)
    cases = 0
    for target in (16, 64, 512):
        preprocessor = ImagePreprocessor(target, CLIP_MEAN, CLIP_STD)
        for width, height in strip_shapes(target, rng):
            image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            np.testing.assert_array_equal(
                preprocessor.resize_and_crop(image),
                reference_resize_crop(image, target),
                err_msg=f"{width}x{height} -> {target}",
            )
            cases += 1
    gray = Image.fromarray(rng.integers(0, 256, (3, 700), dtype=np.uint8))
    for image in (gray, gray.transpose(Image.Transpose.TRANSPOSE)):
        np.testing.assert_array_equal(
            ImagePreprocessor(16, CLIP_MEAN, CLIP_STD).resize_and_crop(image),
            reference_resize_crop(image, 16),
        )
    assert len(strip_calls) == cases + 2 and cases > 120


@pytest.mark.parametrize("shape", [(3, 100_001), (100_001, 3), (1, 200_000), (7, 30_011)])
def test_strip_path_far_from_the_origin(shape, strip_calls):
    """Long strips: crop offsets of 10^5..10^6 resized lines, where float rounding would show."""
    width, height = shape
    rng = np.random.default_rng(width + height)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    preprocessor = ImagePreprocessor(16, CLIP_MEAN, CLIP_STD)
    np.testing.assert_array_equal(
        preprocessor.resize_and_crop(image), reference_resize_crop(image, 16)
    )
    assert len(strip_calls) == 1


PEAK_RSS_CHILD = """
import io, json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
import numpy as np
from PIL import Image
from clipedge.inputs.images import ImagePreprocessor, load_image, preprocess_images
width, height = int(sys.argv[1]), int(sys.argv[2])
buffer = io.BytesIO()
Image.new("RGB", (width, height), (200, 30, 90)).save(buffer, "PNG")
preprocessor = ImagePreprocessor(512, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
warm = preprocessor(load_image(np.zeros((8, 8, 3), np.uint8), 0))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    pixels = preprocess_images([buffer.getvalue()], preprocessor)
    result = "ok" if pixels.shape == (1, 3, 512, 512) else str(pixels.shape)
except BaseException as exc:
    result = repr(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"result": result, "grown_mb": (after - before) / 1024}))
"""


def peak_rss_growth(width: int, height: int) -> dict[str, Any]:
    """Peak-RSS growth (MB) of decoding and preprocessing one PNG, in a fresh process."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_CHILD, str(width), str(height)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_strips_cost_about_what_a_square_costs():
    """1 x 800000 and 800000 x 1 PNGs (a few KB): Pillow's own resize wants GBs for these."""
    square = peak_rss_growth(512, 512)
    assert square["result"] == "ok"
    for width, height in [(1, 800_000), (800_000, 1), (1, 100_000), (100_000, 1)]:
        strip = peak_rss_growth(width, height)
        assert strip["result"] == "ok", (width, height, strip)
        # The decoded strip alone is 3.2 MB; a 512x512 costs a few MB.
        assert strip["grown_mb"] < square["grown_mb"] + 40, (width, height, strip, square)


def test_max_pixels_none_means_no_clipedge_limit(monkeypatch):
    data = IMAGE_FILES[3].read_bytes()
    assert load_image(data, 0, Options(max_image_pixels=None)).size == (1024, 768)
    assert load_image(np.zeros((5, 7, 3), np.uint8), 0, Options(max_image_pixels=None)).size == (
        7,
        5,
    )
    # Pillow's decompression-bomb guard still applies.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageInputError, match="item 2: image too large"):
        load_image(data, 2, Options(max_image_pixels=None))


@pytest.mark.parametrize("bad", [0, -1, 1.5, "100", True])
def test_bad_max_pixels_is_a_value_error(bad):
    with pytest.raises(OptionError, match="max_image_pixels must be an int >= 1 or None"):
        Options(max_image_pixels=bad)


def test_memory_errors_become_image_input_errors(preprocessor, monkeypatch):
    good = str(IMAGE_FILES[0])
    original = ImagePreprocessor.resize_and_crop

    def resize_and_crop(self, image):
        if image.size == (1024, 768):
            raise MemoryError
        return original(self, image)

    monkeypatch.setattr(ImagePreprocessor, "resize_and_crop", resize_and_crop)
    items = [good, str(IMAGE_FILES[3])]
    pixels, errors = preprocess_images_collect(items, preprocessor, first_index=10)
    assert errors[0] is None
    assert isinstance(errors[1], ImageInputError) and errors[1].index == 11
    assert "not enough memory to resize the 1024x768 image" in str(errors[1])
    assert not pixels[1].any()

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(ImageInputError, match="item 4: not enough memory to decode 1024x768"):
        load_image(IMAGE_FILES[3].read_bytes(), 4)


def test_lookup_table_equals_float32_arithmetic(preprocessor):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    scaled = pixels.astype(np.float32) / np.float32(255)
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    expected = ((scaled - mean) / std).transpose(2, 0, 1)
    np.testing.assert_array_equal(preprocessor.normalize(pixels), expected)


def png_with_header_size(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims another size (valid CRC, pixel data far too short)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = IMAGE_FILES[3].read_bytes()
    return data[: len(data) // 2]


def error_cases(tmp_path: Path) -> dict[str, tuple[Any, str]]:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image", encoding="utf-8")
    text_stream = io.StringIO("not an image")
    return {
        "corrupt bytes": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a recognised image"),
        "random bytes": (bytes(range(256)) * 4, "not a recognised image"),
        "truncated jpeg": (truncated_jpeg(), "corrupt or truncated"),
        "text file": (str(text_file), "not a recognised image"),
        "missing path": (str(tmp_path / "missing.png"), "file not found"),
        "directory": (tmp_path, "not a regular file"),
        "none": (None, "got None"),
        "int": (42, "unsupported input type int"),
        "text stream": (text_stream, "text mode"),
        "float array": (np.zeros((4, 4, 3), np.float32), "dtype uint8"),
        "two channel array": (np.zeros((4, 4, 2), np.uint8), "got shape"),
        "empty array": (np.zeros((0, 4, 3), np.uint8), "empty image"),
        "url not allowed": ("https://example.com/cat.jpg", "allow_urls=False"),
        "ftp url": ("ftp://example.com/cat.jpg", "unsupported URL scheme"),
        "data uri not base64": ("data:image/png;base64,%%%%", "not valid base64"),
        "data uri not image": ("data:text/plain;base64,aGVsbG8=", "data:image/"),
        "data uri not an image file": ("data:image/png;base64,aGVsbG8=", "not a recognised"),
    }


def test_every_error_names_the_index(tmp_path):
    for name, (item, reason) in error_cases(tmp_path).items():
        with pytest.raises(ImageInputError, match=f"^item 7: .*{reason}") as info:
            load_image(item, 7)
        assert info.value.index == 7, name


def test_batch_error_names_the_failing_position(preprocessor):
    good = str(IMAGE_FILES[0])
    with pytest.raises(ImageInputError, match="^item 2: got None"):
        preprocess_images([good, good, None, 42], preprocessor)


def test_collect_reports_each_bad_item_and_keeps_good_rows(preprocessor, tmp_path):
    cases = list(error_cases(tmp_path).values())
    items = [str(path) for path in IMAGE_FILES] + [item for item, _ in cases]
    with ThreadPoolExecutor(max_workers=2) as executor:
        pixels, errors = preprocess_images_collect(items, preprocessor, executor=executor)
    np.testing.assert_array_equal(pixels[: len(IMAGE_FILES)], PIXEL_VALUES)
    assert errors[: len(IMAGE_FILES)] == [None] * len(IMAGE_FILES)
    for offset, (_, reason) in enumerate(cases):
        index = len(IMAGE_FILES) + offset
        assert isinstance(errors[index], ImageInputError)
        assert errors[index].index == index and reason in str(errors[index])
        assert not pixels[index].any()


def test_too_many_pixels_is_refused_from_the_header():
    header_only = png_with_header_size(100, 100)
    with pytest.raises(ImageInputError, match="item 0: image too large: 100x100"):
        load_image(header_only, 0, Options(max_image_pixels=9_999))
    with pytest.raises(ImageInputError, match="corrupt or truncated"):
        load_image(header_only, 0, Options(max_image_pixels=10_000))


@pytest.mark.parametrize("kind", ["path", "pil", "numpy"])
def test_too_many_pixels_for_every_input_kind(kind):
    item = INPUT_KINDS[kind](IMAGE_FILES[3])
    with pytest.raises(ImageInputError, match="item 5: image too large: 1024x768"):
        load_image(item, 5, Options(max_image_pixels=1024 * 768 - 1))
    assert load_image(item, 5, Options(max_image_pixels=1024 * 768)).size == (1024, 768)


def test_pillow_bomb_limit_becomes_image_input_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageInputError, match="item 1: image too large"):
        load_image(IMAGE_FILES[0].read_bytes(), 1)


@pytest.fixture()
def http_server() -> Iterator[str]:
    payload = IMAGE_FILES[0].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/img.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_when_allowed(http_server, preprocessor):
    options = Options(allow_urls=True, allow_private_urls=True, url_timeout=5.0)
    load = functools.partial(load_image, options=options)
    pixels = preprocess_images([f"{http_server}/img.png"], preprocessor, load=load)
    np.testing.assert_array_equal(pixels[0], PIXEL_VALUES[0])
    with pytest.raises(ImageInputError, match="item 3: cannot fetch .*404"):
        load(f"{http_server}/nothing.png", 3)
    small = Options(allow_urls=True, allow_private_urls=True, max_url_bytes=100)
    with pytest.raises(ImageInputError, match="item 4: .*URL body exceeds max_url_bytes=100"):
        load_image(f"{http_server}/img.png", 4, small)


def test_config_validation():
    with pytest.raises(ValueError, match="resize_mode"):
        ImagePreprocessor.from_config(
            {"size": 64, "mean": CLIP_MEAN, "std": CLIP_STD, "resize_mode": "squash"}
        )
    with pytest.raises(ValueError, match="size"):
        ImagePreprocessor(0, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="std"):
        ImagePreprocessor(64, CLIP_MEAN, [0.0, 1.0, 1.0])


def test_preprocessor_keeps_pillow_buffers_unless_configured(monkeypatch):
    previous = Image.core.get_blocks_max()
    try:
        monkeypatch.delenv("PILLOW_BLOCKS_MAX", raising=False)
        Image.core.set_blocks_max(0)
        ImagePreprocessor(64, CLIP_MEAN, CLIP_STD)
        assert Image.core.get_blocks_max() == PILLOW_BLOCKS_CACHED
        monkeypatch.setenv("PILLOW_BLOCKS_MAX", "0")
        Image.core.set_blocks_max(0)
        ImagePreprocessor(64, CLIP_MEAN, CLIP_STD)
        assert Image.core.get_blocks_max() == 0
    finally:
        Image.core.set_blocks_max(previous)
