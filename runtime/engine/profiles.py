"""TensorRT optimisation profiles for the towers' dynamic axes, as plain data.

An engine only accepts shapes inside its profile, and its memory plan is sized for the
profile's maximum: a text profile up to 32 x 8192 tokens would reserve attention workspace for
a shape nobody sends. So the limits are explicit, default to the official `encode_text`
defaults (max_length 512, batch 32), and requests beyond them are refused with a clear error
instead of a TensorRT failure or a silent engine rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle.manifest import TowerManifest

Shape = list[int]
Profile = dict[str, tuple[Shape, Shape, Shape]]


@dataclass(frozen=True)
class ProfileLimits:
    """Largest batch and text length an engine is built for, and the shapes it is tuned for."""

    max_batch: int = 32
    opt_batch: int = 8
    max_length: int = 512
    opt_length: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(f"need 1 <= opt_batch <= max_batch, got {self}")
        if not 1 <= self.opt_length <= self.max_length:
            raise ValueError(f"need 1 <= opt_length <= max_length, got {self}")

    def check(self, batch_size: int, max_length: int | None = None) -> None:
        """Refuse a request the engine's profile cannot take."""
        if batch_size > self.max_batch:
            raise ValueError(
                f"batch_size {batch_size} exceeds the TensorRT profile's max batch "
                f"{self.max_batch}; load with trt_max_batch={batch_size} or a smaller batch_size"
            )
        if max_length is not None and max_length > self.max_length:
            raise ValueError(
                f"max_length {max_length} exceeds the TensorRT profile's max length "
                f"{self.max_length}; load with trt_max_length={max_length}"
            )


def tower_profile(tower_name: str, tower: TowerManifest, limits: ProfileLimits) -> Profile:
    """(min, opt, max) shape of every graph input of the tower."""
    if tower_name == "text":
        longest = min(limits.max_length, int(tower.extra["max_length"]))
        shapes = ([1, 1], [limits.opt_batch, limits.opt_length], [limits.max_batch, longest])
        return {spec.name: shapes for spec in tower.inputs}
    size = int(tower.extra["image_size"])
    return {
        "pixel_values": (
            [1, 3, size, size],
            [limits.opt_batch, 3, size, size],
            [limits.max_batch, 3, size, size],
        )
    }
