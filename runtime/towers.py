"""The two towers as one table: what export writes, calibration feeds and the runtime runs.

Everything that differs between the text and the vision tower (graph inputs, output names,
pooling, dynamic axes, manifest keys, where calibration data comes from) lives here, so the
stages and backends need no `if tower == "text"` branch.
"""

from __future__ import annotations

from dataclasses import dataclass

TOKEN_STATES_OUTPUT = "last_hidden_state"


@dataclass(frozen=True)
class TowerSpec:
    """One tower's contract.

    `dynamic_axes` names each input's symbolic axes (TensorRT profiles vary these);
    `manifest_keys` are the tower-specific keys its manifest entry must carry.
    """

    name: str
    inputs: tuple[str, ...]
    pooled_output: str
    pooling: str
    dynamic_axes: tuple[str, ...]
    manifest_keys: tuple[str, ...]
    calibration_option: str

    def output_name(self, pooled: bool) -> str:
        return self.pooled_output if pooled else TOKEN_STATES_OUTPUT


TEXT = TowerSpec(
    name="text",
    inputs=("input_ids", "attention_mask"),
    pooled_output="text_embeds",
    pooling="mean",
    dynamic_axes=("batch", "sequence"),
    manifest_keys=("tokenizer", "pad_token_id", "default_max_length", "max_length"),
    calibration_option="--calibration-texts",
)
VISION = TowerSpec(
    name="vision",
    inputs=("pixel_values",),
    pooled_output="image_embeds",
    pooling="cls",
    dynamic_axes=("batch",),
    manifest_keys=("image_size", "preprocessor"),
    calibration_option="--calibration-images",
)
TOWERS: dict[str, TowerSpec] = {spec.name: spec for spec in (TEXT, VISION)}


def tower_spec(name: str) -> TowerSpec:
    """The spec of a tower by name; a clear error for anything else."""
    if name not in TOWERS:
        raise ValueError(f"unknown tower {name!r}; towers are: {', '.join(TOWERS)}")
    return TOWERS[name]
