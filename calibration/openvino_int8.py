"""NNCF int8 for OpenVINO, quantised once, with chosen layers given back float inputs.

NNCF's post-training int8 costs minutes on the full-size towers (statistics over every
calibration sample), and a mixed-precision search needs many variants. So the tower is
quantised once, every MatMul int8, and each variant is made from that model by bypassing the
FakeQuantize nodes in front of the layers that should stay float (activations and weights):
those layers then run in bf16 (the inference precision) on the float weights NNCF's model
still holds. A variant takes a clone and a graph walk, not a new NNCF run.

What was tried on the full-size vision tower, kept or not, with cosine and time per variant
and where the time goes: docs/benchmarks.md, "The image tower at int8". In short: attention
stays bf16 (int8 was no faster and less accurate); the MLP output projections are int8 like
the rest (bf16 inputs cost time on AMX for little accuracy); units the search keeps float
run in bf16.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Ops that only move or regroup values: a quantiser before them still quantises the MatMul
# input after them (NNCF moves FakeQuantize up through such ops).
LAYOUT_OPS = frozenset(
    {
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Split",
        "VariadicSplit",
        "StridedSlice",
        "Gather",
        "Concat",
        "Convert",
    }
)


# The vision tower's patch size (jina-clip-v2's EVA02: 14 px): a 512 px image is 1297 tokens.
VISION_PATCH = 14


def tokens_per_row(feed: dict[str, np.ndarray]) -> int:
    """Sequence length of one row of a feed: text tokens, or image patches + CLS."""
    if "input_ids" in feed:
        return int(feed["input_ids"].shape[1])
    height, width = feed["pixel_values"].shape[-2:]
    return (height // VISION_PATCH) * (width // VISION_PATCH) + 1


def statistics_feeds(
    feeds: Sequence[dict[str, np.ndarray]], max_tokens: int | None
) -> list[dict[str, np.ndarray]]:
    """`feeds` cut into row groups of at most `max_tokens` tokens (one row at least; None:
    as they are). OpenVINO holds most of the statistics graph's tensors until an inference
    ends, so NNCF's memory follows the tokens of one feed (`memory.statistics_tokens`).
    Slices are views: no copy of the data."""
    out = []
    for feed in feeds:
        rows = len(next(iter(feed.values())))
        step = rows if not max_tokens else max(1, max_tokens // tokens_per_row(feed))
        out += [{k: v[i : i + step] for k, v in feed.items()} for i in range(0, rows, step)]
    return out


def attention_matmuls(graph: Path) -> list[str]:
    """Names of the MatMuls of a float graph that multiply two activations (attention's
    scores and context, the text pooling product); read before quantisation, when every
    weight is still a plain Constant."""
    import openvino as ov

    def is_constant(node: Any) -> bool:
        while node.get_type_name() in ("Convert", "Reshape", "Transpose") and node.inputs():
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Constant"

    return [
        op.get_friendly_name()
        for op in ov.Core().read_model(str(graph)).get_ordered_ops()
        if op.get_type_name() == "MatMul"
        and not any(is_constant(op.input_value(i).get_node()) for i in range(2))
    ]


def quantize_all(
    src: Path,
    feeds: Sequence[dict[str, np.ndarray]],
    float_layers: Sequence[str] = (),
    max_tokens: int | None = None,
    weight_bits: int = 7,
) -> Any:
    """The fp32 graph `src` with every MatMul int8 (NNCF, TRANSFORMER preset), in memory;
    `float_layers` (friendly names) get no quantisers at all.

    Pass the attention products (`attention_matmuls`) there: every variant reads them in
    float anyway (leaving them out gives the same graph, tested, and saves NNCF the
    statistics of every attention map). `max_tokens` cuts the feeds for the statistics
    (`statistics_feeds`): NNCF runs the fp32 graph with a reducer on every tensor it
    quantises and OpenVINO holds most of them until the inference ends, so one 8 x 512-token
    text batch took the statistics to 12.7 GB and four 512 px images to 18.6 GB
    (docs/benchmarks.md, "Calibration memory"). NNCF's ranges are the mean over feeds of
    each feed's min/max, so smaller feeds change them a little.

    Asymmetric activations, per-channel symmetric weights (`weight_bits` 7: half the int8
    range, NNCF's overflow fix on every layer, not only the first: see below), fast bias
    correction; SmoothQuant off (NNCF's default 0.95 cost accuracy). Activation ranges:
    NNCF's default (mean of the per-sample min/max); global MINMAX helped odd pictures and
    cost ordinary photos more (docs/benchmarks.md).
    """

    import nncf  # noqa: F401  (importing it sets its logger's level: before ours)

    # NNCF logs one INFO line per ignored layer (50 per tower): not news to the user.
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(max(level, logging.WARNING))
    try:
        return _quantize(src, statistics_feeds(feeds, max_tokens), float_layers, weight_bits)
    finally:
        nncf_log.setLevel(level)


def _quantize(
    src: Path, feeds: list[dict[str, np.ndarray]], float_layers: Sequence[str], weight_bits: int
) -> Any:
    import nncf
    import openvino as ov
    from nncf.openvino.quantization.backend_parameters import BackendParameters

    model = ov.Core().read_model(str(src))
    ignored = nncf.IgnoredScope(names=list(float_layers), validate=False) if float_layers else None
    return nncf.quantize(
        model,
        nncf.Dataset(list(feeds)),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        ignored_scope=ignored,
        fast_bias_correction=True,
        advanced_parameters=nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1.0),
            # 7 bits: half-range weights on every layer (NNCF's overflow fix), which no CPU
            # saturates (`clipedge.engine.cpu_features`). Tiny vision tower, f32 inference on
            # an AVX2 EPYC: min cosine 0.949 with NNCF's default (first layer only), 0.997
            # with the fix everywhere. 8 bits: no fix, for CPUs that add in int32.
            overflow_fix=nncf.OverflowFix.ENABLE if weight_bits == 7 else nncf.OverflowFix.DISABLE,
            # Weights stay float behind their quantisers in memory, so a variant can give a
            # float unit its float weights; `save_ir` compresses the rest to int8.
            backend_params={BackendParameters.COMPRESS_WEIGHTS: False},
        ),
    )


def _layers_fed(output: Any) -> set[str]:
    """Friendly names of the compute ops an output reaches through layout-only ops."""
    reached, pending = set(), [output]
    while pending:
        for target in pending.pop().get_target_inputs():
            node = target.get_node()
            if node.get_type_name() in LAYOUT_OPS:
                pending.extend(node.outputs())
            else:
                reached.add(node.get_friendly_name())
    return reached


def with_float_inputs(quantized: Any, layers: Iterable[str]) -> Any:
    """A copy of `quantized` in which `layers` (friendly names; ONNX node names survive as
    such) are float: their activation and weight quantisers are bypassed. (Float inputs with
    int8 weights left a floor: on the full-size image tower with random weights every block
    float still gave min cosine 0.98154, the 7-bit weights alone.)"""
    model = quantized.clone()
    names = set(layers)
    for op in model.get_ordered_ops():
        # OpenVINO names a convolution's bias-less part "<node>/WithoutBiases"
        fed = {name.split("/")[0] for name in _layers_fed(op.output(0))}
        if op.get_type_name() == "FakeQuantize" and fed & names:
            op.output(0).replace(op.input_value(0))
    return model


def save_ir(model: Any, dst: Path) -> Path:
    """Write OpenVINO IR (`dst` ends in .xml; weights in the .bin beside it)."""
    import openvino as ov
    from openvino._offline_transformations import compress_quantize_weights_transformation

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = model.clone()
    compress_quantize_weights_transformation(model)  # quantised weights stored int8
    ov.save_model(model, str(dst), compress_to_fp16=False)
    return dst
