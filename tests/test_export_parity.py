"""Exported fp32 graphs against the official implementation's outputs for the tiny fixture.

Inputs are the fixture's own token ids and pixel tensors, so these tests isolate the graphs
from tokenisation and image preprocessing (the runtime tests cover those).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import expected

MAX_ABS = 2e-5  # on L2-normalised vectors (fixture README)
TOWERS = ("text", "vision")


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def assert_raw_close(actual: np.ndarray, reference: np.ndarray) -> None:
    """Un-normalised vectors: the same tolerance relative to the vectors' magnitude."""
    scale = max(1.0, float(np.abs(reference).max()))
    assert np.abs(actual - reference).max() <= MAX_ABS * scale


def assert_normalised_close(actual: np.ndarray, reference: np.ndarray) -> None:
    assert actual.shape == reference.shape
    assert np.abs(actual - reference).max() <= MAX_ABS


def pad(rows: list[list[int]]) -> dict[str, np.ndarray]:
    ids = np.ones((len(rows), max(map(len, rows))), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pooled_text(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    out = session.run(None, feed)[0]
    if out.ndim == 3:  # token states: masked mean incl. <s> and </s>
        mask = feed["attention_mask"].astype(np.float32)[..., None]
        out = (out * mask).sum(1) / mask.sum(1)
    return out


def pooled_image(session: ort.InferenceSession, pixels: np.ndarray) -> np.ndarray:
    out = session.run(None, {"pixel_values": pixels})[0]
    return out[:, 0] if out.ndim == 3 else out


@pytest.fixture(scope="module", params=["pooled", "token_states"])
def sessions(request, tiny_bundle, tiny_token_states_bundle):
    bundle = tiny_bundle if request.param == "pooled" else tiny_token_states_bundle
    cpu = ["CPUExecutionProvider"]
    return {t: ort.InferenceSession(str(bundle / f"{t}.onnx"), providers=cpu) for t in TOWERS}


@pytest.mark.parametrize(
    ("ids_key", "raw_file", "norm_file"),
    [
        ("token_ids_default", "text_default_raw.npy", "text_default_norm.npy"),
        ("token_ids_retrieval_query", "text_query_raw.npy", "text_query_norm.npy"),
        ("token_ids_max_length_16", None, "text_default_maxlen16.npy"),
    ],
)
def test_text_cases(sessions, reference, ids_key, raw_file, norm_file):
    raw = pooled_text(sessions["text"], pad(reference[ids_key]))
    if raw_file:
        assert_raw_close(raw, expected(raw_file))
    assert_normalised_close(normalise(raw), expected(norm_file))


def test_text_matryoshka_truncation(sessions, reference):
    raw = pooled_text(sessions["text"], pad(reference["token_ids_default"]))
    assert_normalised_close(normalise(raw[:, :32]), expected("text_default_trunc32.npy"))


def test_text_one_by_one(sessions, reference):
    rows = [pooled_text(sessions["text"], pad([ids]))[0] for ids in reference["token_ids_default"]]
    assert_normalised_close(normalise(np.stack(rows)), expected("text_default_norm_single.npy"))


def test_text_official_batch_layout(sessions):
    """The official batch: length-sorted and padded to 512 tokens."""
    ids = expected("text_batch_input_ids.npy")
    order = expected("text_batch_order.npy")
    feed = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
    raw = pooled_text(sessions["text"], feed)
    assert_normalised_close(normalise(raw), expected("text_default_norm.npy")[order])


def test_token_states_match_official_hidden_states(tiny_token_states_bundle):
    session = ort.InferenceSession(str(tiny_token_states_bundle / "text.onnx"))
    ids = expected("text_batch_input_ids.npy")
    states = session.run(None, {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)})
    reference = expected("debug_text_batch_last_hidden_state.npy")
    valid = ids != 1  # padded rows of the official output are not meaningful
    assert np.abs(states[0][valid] - reference[valid]).max() <= 1e-4


@pytest.mark.parametrize(
    ("raw_file", "norm_file", "dim"),
    [("image_raw.npy", "image_norm.npy", None), (None, "image_trunc32.npy", 32)],
)
def test_image_cases(sessions, raw_file, norm_file, dim):
    raw = pooled_image(sessions["vision"], expected("image_pixel_values.npy"))
    if raw_file:
        assert_raw_close(raw, expected(raw_file))
    assert_normalised_close(normalise(raw[:, :dim]), expected(norm_file))


def test_images_one_by_one(sessions):
    pixels = expected("image_pixel_values.npy")
    rows = [pooled_image(sessions["vision"], pixels[i : i + 1])[0] for i in range(len(pixels))]
    assert_normalised_close(normalise(np.stack(rows)), expected("image_norm.npy"))


def test_text_image_cosine_matrix(sessions, reference):
    text = normalise(pooled_text(sessions["text"], pad(reference["token_ids_default"])))
    image = normalise(pooled_image(sessions["vision"], expected("image_pixel_values.npy")))
    assert np.abs(text @ image.T - expected("text_image_cosine.npy")).max() <= MAX_ABS


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_batch_size_does_not_change_rows(tiny_bundle, reference, batch):
    session = ort.InferenceSession(str(tiny_bundle / "text.onnx"))
    rows = (reference["token_ids_default"] * 2)[:batch]
    batched = session.run(None, pad(rows))[0]
    alone = np.concatenate([session.run(None, pad([r]))[0] for r in rows])
    assert np.abs(batched - alone).max() <= 1e-5
    vision = ort.InferenceSession(str(tiny_bundle / "vision.onnx"))
    pixels = np.resize(expected("image_pixel_values.npy"), (batch, 3, 64, 64))
    batched = vision.run(None, {"pixel_values": pixels})[0]
    alone = np.concatenate([vision.run(None, {"pixel_values": p[None]})[0] for p in pixels])
    assert np.abs(batched - alone).max() <= 1e-5


def test_every_sequence_length_runs(tiny_bundle):
    """Lengths 1..600 (past the default 512) run and give finite, prefix-consistent rows."""
    torch = pytest.importorskip("torch")
    from clipedge.export.source import resolve_source
    from clipedge.export.weights import load_towers

    from conftest import CHECKPOINT

    src = resolve_source(str(CHECKPOINT))
    eager = load_towers(src.config, src.open_tensors(), ["text"])["text"]
    session = ort.InferenceSession(str(tiny_bundle / "text.onnx"))
    rng = np.random.default_rng(0)
    ids = rng.integers(3, src.config.text.vocab_size, (1, 600))
    for length in range(1, 601):
        feed = {"input_ids": ids[:, :length], "attention_mask": np.ones((1, length), np.int64)}
        out = session.run(None, feed)[0]
        assert out.shape == (1, src.config.embed_dim) and np.isfinite(out).all(), length
        if length in (1, 2, 300, 513, 600):
            with torch.no_grad():
                ref = eager(*(torch.from_numpy(v) for v in feed.values())).numpy()
            assert np.abs(out - ref).max() <= 1e-4, length
