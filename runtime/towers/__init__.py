"""The two towers: their fixed contract (`TowerSpec`) and the objects that prepare their inputs.

Everything that differs between the text and the vision tower lives in this package: graph
inputs, output names, pooling, dynamic axes and calibration data (the spec table, which export
and calibration read too), and how raw items become graph rows (`TextTower`, `VisionTower`).
The pipeline, the backends, the server and the batch tool only call the protocol below, so
none of them branches on a tower's name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..bundle.manifest import Manifest
from ..errors import BundleError, InputError, OptionError
from ..options import Options

TOKEN_STATES_OUTPUT = "last_hidden_state"


@dataclass(frozen=True)
class TowerSpec:
    """One tower's graph contract. `dynamic_axes` names each input's symbolic axes (TensorRT
    profiles vary these); `item_kind` is what a caller hands it ("text" or "image")."""

    name: str
    inputs: tuple[str, ...]
    pooled_output: str
    pooling: str
    dynamic_axes: tuple[str, ...]
    calibration_option: str
    item_kind: str

    def output_name(self, pooled: bool) -> str:
        return self.pooled_output if pooled else TOKEN_STATES_OUTPUT


TEXT = TowerSpec(
    name="text",
    inputs=("input_ids", "attention_mask"),
    pooled_output="text_embeds",
    pooling="mean",
    dynamic_axes=("batch", "sequence"),
    calibration_option="--calibration-texts",
    item_kind="text",
)
VISION = TowerSpec(
    name="vision",
    inputs=("pixel_values",),
    pooled_output="image_embeds",
    pooling="cls",
    dynamic_axes=("batch",),
    calibration_option="--calibration-images",
    item_kind="image",
)
TOWERS: dict[str, TowerSpec] = {spec.name: spec for spec in (TEXT, VISION)}


def tower_spec(name: str) -> TowerSpec:
    """The spec of a tower by name; a clear error for anything else."""
    if name not in TOWERS:
        raise ValueError(f"unknown tower {name!r}; towers are: {', '.join(TOWERS)}")
    return TOWERS[name]


@dataclass
class Prepared:
    """Prepared items of one tower: each item's graph row, or its error."""

    errors: list[InputError | None]

    def row(self, item: int) -> Any:
        raise NotImplementedError

    @property
    def valid(self) -> list[int]:
        return [item for item, error in enumerate(self.errors) if error is None]

    def first_error(self) -> InputError | None:
        return next((error for error in self.errors if error is not None), None)


class Tower(Protocol):
    """What the pipeline and every consumer need of a tower."""

    spec: TowerSpec
    pooling: str
    # How many batches' worth of queued rows a server takes at once to group similar rows.
    sort_window: int

    def prepare(self, items: Sequence[Any], offset: int = 0, **settings: Any) -> Prepared: ...

    def feeds(self, rows: Sequence[Any]) -> dict[str, np.ndarray]: ...

    def length(self, row: Any) -> int | None:
        """Tokens in a row (None where length is not a thing: images)."""

    def tokens(self, row: Any) -> int | None:
        """What a row counts against `max_batch_tokens`: a text its length, an image the
        tokens it is inside the tower (None: not recorded, rows count by number only)."""

    def batch_order(self, rows: Sequence[Any], items: Sequence[int]) -> list[int]: ...

    def close(self) -> None: ...


def check_tower_names(names: Sequence[str], option: str = "towers") -> None:
    """A non-empty list of known tower names, or an `OptionError` naming `option`."""
    unknown = [name for name in names if name not in TOWERS]
    if unknown or not names:
        raise OptionError(
            f"{option} must be a non-empty subset of {', '.join(TOWERS)}, got {list(names)}"
        )


def open_towers(manifest: Manifest, bundle_dir: Path, options: Options) -> dict[str, Tower]:
    """The bundle's towers, ready to prepare inputs (no graph is loaded)."""
    from .text import TextTower
    from .vision import VisionTower

    kinds = {TEXT.name: TextTower, VISION.name: VisionTower}
    towers: dict[str, Tower] = {}
    for name, entry in manifest.towers.items():
        towers[name] = kinds[name](entry, Path(bundle_dir), manifest, options)
    return towers


def missing_tower(bundle_dir: Path, name: str, present: Sequence[str]) -> BundleError:
    return BundleError(
        f"bundle {bundle_dir} has no {name} tower (it has: {', '.join(present)}); export it "
        "with --towers"
    )
