"""TensorRT optimisation profiles for the towers' dynamic axes, as plain data.

An engine only accepts shapes inside its profile, and its memory plan is sized for the
profile's maximum: a text profile up to 32 x 8192 tokens would reserve attention workspace for
a shape nobody sends. So the limits are explicit, default to the official `encode_text`
defaults (max_length 512, batch 32), and requests beyond them are refused with a clear error
instead of a TensorRT failure or a silent engine rebuild. The axes come from the tower spec:
every input's batch axis varies, and the text tower's sequence axis too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle.manifest import TowerManifest
from ..errors import OptionError

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
            raise OptionError(f"need 1 <= opt_batch <= max_batch, got {self}")
        if not 1 <= self.opt_length <= self.max_length:
            raise OptionError(f"need 1 <= opt_length <= max_length, got {self}")


def tower_profile(tower: TowerManifest, limits: ProfileLimits) -> Profile:
    """(min, opt, max) shape of every graph input: symbolic axes vary, fixed ones stay."""
    ranges = {
        "batch": (1, limits.opt_batch, limits.max_batch),
        "sequence": (
            1,
            limits.opt_length,
            min(limits.max_length, getattr(tower.settings, "max_length", limits.max_length)),
        ),
    }
    profile: Profile = {}
    for spec in tower.inputs:
        shapes: list[Shape] = [[], [], []]
        for axis in spec.shape:
            for position in range(3):
                shapes[position].append(
                    ranges[axis][position] if isinstance(axis, str) else int(axis)
                )
        profile[spec.name] = (shapes[0], shapes[1], shapes[2])
    return profile
