"""An independent NumPy text tower, proved on the official outputs, then used past 512 tokens.

The export's own verification (and `test_every_sequence_length_runs`) compares the ONNX graph
with the project's PyTorch tower, so a mistake shared by both (a wrong rotary base, say) passes
them. This module re-implements the jina-clip-v2 text tower of the tiny reference checkpoint
straight from `shared/model-facts.md` (sections 1.2, 3 and 6), reading the raw checkpoint with
`safetensors.numpy` (or conftest's reader of the format) and nothing from `clipedge.export`:

- backbone values: jina-embeddings-v3's config overridden by `hf_model_config_kwargs`
  (rotary base 20000, LayerNorm eps 1e-5, LoRA alpha/rank);
- LoRA adapter 0 merged: Linear W + B @ A * alpha/rank, Embedding W + A @ B * alpha/rank;
- embeddings: word row + token-type row 0, then `emb_ln`; no position embeddings;
- post-LN blocks, exact (erf) GELU, Wqkv rows laid out (three, heads, head_dim);
- attention: half-split (NeoX) rotary on q and k, positions 0..L-1, scores / sqrt(head_dim),
  additive -10000 on padded keys, softmax over keys;
- masked mean pooling including <s> and </s>; no projection.

It runs in float64 with attention per head and in query chunks, so 8192 tokens stay cheap.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnxruntime as ort
import pytest

from conftest import CHECKPOINT, expected, load_safetensors

MAX_ABS = 2e-5  # on L2-normalised vectors, as tests/test_export_parity.py
PREFIX = "text_model.transformer.roberta."
PAD_ID = 1
MASK_BIAS = -10000.0
QUERY_CHUNK = 1024  # query rows per attention chunk: [chunk, L] scores per head


def backbone_config() -> dict:
    """jina-embeddings-v3's backbone config updated with the clip config's kwargs."""
    config = json.loads((CHECKPOINT / "text_backbone_base_config.json").read_text())
    clip = json.loads((CHECKPOINT / "config.json").read_text())
    config.update(clip["text_config"]["hf_model_config_kwargs"])
    return config


def load_weights(lora: bool = True) -> dict[str, np.ndarray]:
    """Float64 weights with LoRA adapter 0 merged (or the bare backbone when lora=False)."""
    config = backbone_config()
    scaling = config["lora_alpha"] / config["lora_rank"]
    raw = load_safetensors(CHECKPOINT / "model.safetensors")
    text = {k[len(PREFIX) :]: v.astype(np.float64) for k, v in raw.items() if k.startswith(PREFIX)}
    weights: dict[str, np.ndarray] = {}
    for key, value in text.items():
        if ".parametrizations.weight.0." in key:
            continue
        if key.endswith(".parametrizations.weight.original"):
            module = key[: -len(".parametrizations.weight.original")]
            a = text[f"{module}.parametrizations.weight.0.lora_A"][0]
            b = text[f"{module}.parametrizations.weight.0.lora_B"][0]
            is_embedding = module.startswith("embeddings.")
            delta = (a @ b) if is_embedding else (b @ a)  # [num, dim] / [out, in]
            assert delta.shape == value.shape, module
            weights[f"{module}.weight"] = value + delta * scaling if lora else value
        else:
            weights[key] = value
    return weights


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def linear(x: np.ndarray, weights: dict, name: str) -> np.ndarray:
    return x @ weights[f"{name}.weight"].T + weights[f"{name}.bias"]


def rotate_half_split(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotation: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin] (cos/sin [L, d/2])."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def text_tower(
    input_ids: np.ndarray,
    *,
    lora: bool = True,
    rotary_base: float | None = None,
    token_states: bool = False,
) -> np.ndarray:
    """Pooled raw embeddings [B, D] (or last hidden states [B, L, D]) in float64."""
    config = backbone_config()
    weights = _weights(lora)
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    width = config["hidden_size"]
    head_dim = width // heads
    base = config["rotary_emb_base"] if rotary_base is None else rotary_base
    batch, length = input_ids.shape
    mask = (input_ids != config["pad_token_id"]).astype(np.float64)  # from the ids (facts 3.4)

    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(length, dtype=np.float64), inv_freq)  # [L, head_dim/2]
    cos, sin = np.cos(angles), np.sin(angles)

    h = weights["embeddings.word_embeddings.weight"][input_ids]
    h = h + weights["embeddings.token_type_embeddings.weight"][0]
    h = layer_norm(h, weights["emb_ln.weight"], weights["emb_ln.bias"], eps)
    for index in range(config["num_hidden_layers"]):
        p = f"encoder.layers.{index}."
        qkv = linear(h, weights, p + "mixer.Wqkv").reshape(batch, length, 3, heads, head_dim)
        context = np.empty((batch, length, heads, head_dim))
        for row in range(batch):
            key_bias = (1.0 - mask[row]) * MASK_BIAS  # [L] over keys
            for head in range(heads):
                q = rotate_half_split(qkv[row, :, 0, head], cos, sin) / math.sqrt(head_dim)
                k = rotate_half_split(qkv[row, :, 1, head], cos, sin)
                v = qkv[row, :, 2, head]
                for start in range(0, length, QUERY_CHUNK):
                    stop = min(start + QUERY_CHUNK, length)
                    scores = q[start:stop] @ k.T
                    scores += key_bias
                    scores -= scores.max(-1, keepdims=True)
                    np.exp(scores, out=scores)  # softmax, normalised after the product
                    context[row, start:stop, head] = (scores @ v) / scores.sum(-1, keepdims=True)
        attn = linear(context.reshape(batch, length, width), weights, p + "mixer.out_proj")
        h = layer_norm(h + attn, weights[p + "norm1.weight"], weights[p + "norm1.bias"], eps)
        mlp = linear(gelu_erf(linear(h, weights, p + "mlp.fc1")), weights, p + "mlp.fc2")
        h = layer_norm(h + mlp, weights[p + "norm2.weight"], weights[p + "norm2.bias"], eps)
    if token_states:
        return h
    return (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


_WEIGHTS: dict[bool, dict[str, np.ndarray]] = {}


def _weights(lora: bool) -> dict[str, np.ndarray]:
    if lora not in _WEIGHTS:
        _WEIGHTS[lora] = load_weights(lora)
    return _WEIGHTS[lora]


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def max_raw_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """Max-abs difference relative to the vectors' magnitude (as test_export_parity)."""
    scale = max(1.0, float(np.abs(reference).max()))
    return float(np.abs(actual - reference).max()) / scale


def assert_close(actual: np.ndarray, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape
    assert max_raw_error(actual, reference) <= MAX_ABS
    assert np.abs(normalise(actual) - normalise(reference)).max() <= MAX_ABS


def pad(rows: list[list[int]]) -> np.ndarray:
    ids = np.full((len(rows), max(map(len, rows))), PAD_ID, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return ids


# -- the reference against the official implementation's outputs (<= 512 tokens) ----------


def test_backbone_values_come_from_the_v3_config():
    config = backbone_config()
    assert config["rotary_emb_base"] == 20000.0
    assert config["layer_norm_eps"] == 1e-5
    assert config["lora_alpha"] / config["lora_rank"] == 1.0
    assert config["hidden_size"] == 64 and config["num_attention_heads"] == 4


@pytest.mark.parametrize(
    ("ids_key", "raw_file"),
    [
        ("token_ids_default", "text_default_raw.npy"),
        ("token_ids_retrieval_query", "text_query_raw.npy"),
    ],
)
def test_reference_matches_official_raw(reference, ids_key, raw_file):
    assert_close(text_tower(pad(reference[ids_key])), expected(raw_file).astype(np.float64))


def test_reference_matches_official_padded_batch():
    ids = expected("text_batch_input_ids.npy")  # the official batch: sorted, padded to 512
    order = expected("text_batch_order.npy")
    assert ids.shape[1] == 512
    pooled = normalise(text_tower(ids))
    assert np.abs(pooled - expected("text_default_norm.npy")[order]).max() <= MAX_ABS


def test_reference_matches_official_maxlen16(reference):
    pooled = normalise(text_tower(pad(reference["token_ids_max_length_16"])))
    assert np.abs(pooled - expected("text_default_maxlen16.npy")).max() <= MAX_ABS


def test_reference_matches_official_token_states():
    ids = expected("text_batch_input_ids.npy")
    states = text_tower(ids, token_states=True)
    official = expected("debug_text_batch_last_hidden_state.npy")
    valid = ids != PAD_ID  # the official padded rows are not meaningful
    assert np.abs(states[valid] - official[valid]).max() <= 1e-4


def test_reference_without_lora_matches_official_backbone(reference):
    """The LoRA merge is what separates the two official outputs."""
    ids = pad(reference["token_ids_default"])
    assert_close(text_tower(ids, lora=False), expected("debug_text_nolora_raw.npy"))
    assert max_raw_error(text_tower(ids, lora=False), expected("text_default_raw.npy")) > 1e-2


def test_reference_with_the_wrong_rotary_base_misses_the_official_outputs(reference):
    """The official outputs pin the base: the class default 10000 does not reproduce them."""
    ids = pad(reference["token_ids_default"])
    wrong = text_tower(ids, rotary_base=10000.0)
    assert max_raw_error(wrong, expected("text_default_raw.npy")) > 100 * MAX_ABS


# -- the exported graph against the reference past 512 tokens -------------------------------


def random_batch(lengths: list[int], vocab: int, seed: int) -> np.ndarray:
    """<s> random content </s> per row (content ids avoid the specials), right-padded."""
    rng = np.random.default_rng(seed)
    rows = [[0, *rng.integers(4, vocab, n - 2).tolist(), 2] for n in lengths]
    return pad(rows)


@pytest.fixture(scope="module", params=["text.onnx", "text.onnxruntime-cpu.onnx"])
def text_session(tiny_bundle, request) -> ort.InferenceSession:
    """The portable graph and onnxruntime's CPU form (attention fused), both checked."""
    graph = str(tiny_bundle / request.param)
    return ort.InferenceSession(graph, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    "lengths",
    [[600, 513, 37], [1024, 700], [2048, 1500], [8192]],
    ids=["600", "1024", "2048", "8192"],
)
def test_exported_graph_matches_reference_past_512_tokens(text_session, lengths):
    vocab = backbone_config()["vocab_size"]
    ids = random_batch(lengths, vocab, seed=lengths[0])
    feed = {"input_ids": ids, "attention_mask": (ids != PAD_ID).astype(np.int64)}
    out = text_session.run(None, feed)[0]
    assert out.shape == (len(lengths), backbone_config()["hidden_size"])
    assert_close(out.astype(np.float64), text_tower(ids))
