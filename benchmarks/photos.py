"""A deterministic photo set for calibration experiments, from images that ship in wheels.

Why: the accuracy of an int8 image tower is judged by its worst held-out image, and a minimum
over 6 images means little; no photo collection can be downloaded here. scikit-image's and
scikit-learn's sample pictures (about 25) are cut into crops at several scales and positions,
and split by *source picture*, so no held-out crop shares a picture with a calibration crop.
Crops of one picture are correlated: this set is wider than its source count, not a
substitute for the user's own photos.

    .venv/bin/python -m benchmarks.photos /tmp/photos # -> /tmp/photos/{calibration,held-out}
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# (name, x, y, side, mirrored): side as a fraction of the shorter edge, x / y as fractions of
# the room left beside the window: the centred whole, three smaller windows, a mirrored one.
CROPS = (
    ("full", 0.5, 0.5, 1.0, False),
    ("top-left", 0.0, 0.0, 0.6, False),
    ("centre", 0.5, 0.5, 0.6, False),
    ("bottom-right", 1.0, 1.0, 0.6, False),
    ("mirrored", 0.3, 0.5, 0.8, True),
)
MIN_SIDE = 256  # smaller pictures (icons, tiles) are left out


def source_pictures() -> dict[str, Image.Image]:
    """Every sample picture of at least MIN_SIDE px, as RGB, sorted by name."""
    import skimage
    import sklearn.datasets

    found: dict[str, Image.Image] = {}
    folders = [
        Path(skimage.__file__).parent / "data",
        Path(sklearn.datasets.__file__).parent / "images",
    ]
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                continue
            with Image.open(path) as image:
                if min(image.size) >= MIN_SIDE:
                    found[path.stem] = image.convert("RGB")
    return dict(sorted(found.items()))


def crops(image: Image.Image) -> dict[str, Image.Image]:
    """The CROPS windows of one picture (squares; the model resizes them to 512 px)."""
    width, height = image.size
    short = min(width, height)
    out = {}
    for name, x_room, y_room, side, mirror in CROPS:
        size = int(short * side)
        x, y = int(x_room * (width - size)), int(y_room * (height - size))
        crop = image.crop((x, y, x + size, y + size))
        out[name] = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else crop
    return out


def write_photo_set(folder: Path) -> dict[str, list[Path]]:
    """Write `calibration/` (even-numbered pictures) and `held-out/` (odd) crops as PNG."""
    written: dict[str, list[Path]] = {"calibration": [], "held-out": []}
    for index, (stem, picture) in enumerate(source_pictures().items()):
        part = "calibration" if index % 2 == 0 else "held-out"
        (folder / part).mkdir(parents=True, exist_ok=True)
        for crop_name, crop in crops(picture).items():
            path = folder / part / f"{stem}-{crop_name}.png"
            crop.save(path)
            written[part].append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    written = write_photo_set(args.folder)
    sizes = {part: len(paths) for part, paths in written.items()}
    print(f"{args.folder}: {sizes} (pixel checksum {_checksum(written):08x})")


def _checksum(written: dict[str, list[Path]]) -> int:
    total = 0
    for paths in written.values():
        for path in paths:
            with Image.open(path) as image:
                total = (total + int(np.asarray(image, dtype=np.uint64).sum())) % 2**32
    return total


if __name__ == "__main__":
    main()
