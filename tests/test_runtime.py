"""End to end from raw texts and image files to the official outputs, through clipedge.load."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import clipedge
from clipedge import BundleError, ImageInputError, TextInputError

from conftest import EXPECTED, expected

MAX_ABS = 2e-5


@pytest.fixture(scope="module", params=["pooled", "token_states"])
def model(request, tiny_bundle, tiny_token_states_bundle):
    bundle = tiny_bundle if request.param == "pooled" else tiny_token_states_bundle
    return clipedge.load(bundle, backend="cpu")


@pytest.fixture(scope="module")
def image_files(reference) -> list[str]:
    return [str(EXPECTED / name) for name in reference["images"]]


def close(actual: np.ndarray, name: str) -> None:
    reference = expected(name)
    assert actual.dtype == np.float32 and actual.shape == reference.shape
    scale = max(1.0, float(np.abs(reference).max()))
    assert np.abs(actual - reference).max() <= MAX_ABS * scale


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "text_default_norm.npy"),
        ({"normalize_embeddings": False}, "text_default_raw.npy"),
        ({"task": "retrieval.query"}, "text_query_norm.npy"),
        ({"task": "retrieval.query", "normalize_embeddings": False}, "text_query_raw.npy"),
        ({"truncate_dim": 32}, "text_default_trunc32.npy"),
        ({"max_length": 16}, "text_default_maxlen16.npy"),
        ({"batch_size": 2}, "text_default_norm.npy"),
    ],
)
def test_encode_text_matches_official(model, reference, kwargs, name):
    close(model.encode_text(reference["texts"], **kwargs), name)


def test_encode_text_single_string_gives_vector(model, reference):
    rows = [model.encode_text(text) for text in reference["texts"]]
    assert rows[0].shape == (64,)
    close(np.stack(rows), "text_default_norm_single.npy")


def test_token_ids_equal_official(model, reference):
    prepared = model.tower("text").prepare(reference["texts"])
    assert prepared.token_ids == reference["token_ids_default"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "image_norm.npy"),
        ({"normalize_embeddings": False}, "image_raw.npy"),
        ({"truncate_dim": 32}, "image_trunc32.npy"),
        ({"batch_size": 2}, "image_norm.npy"),
    ],
)
def test_encode_image_matches_official(model, image_files, kwargs, name):
    close(model.encode_image(image_files, **kwargs), name)


def test_pixel_tensors_match_official(model, image_files):
    pixels = model.tower("vision").prepare(image_files).pixels
    assert np.abs(pixels - expected("image_pixel_values.npy")).max() <= 1e-6


def test_encode_image_accepts_every_input_kind(model, image_files):
    from PIL import Image

    path = image_files[3]
    data = Path(path).read_bytes()
    import base64

    kinds = [
        path,
        Path(path),
        data,
        open(path, "rb"),  # noqa: SIM115 - the runtime reads it
        Image.open(path),
        np.asarray(Image.open(path).convert("RGB")),
        "data:image/jpeg;base64," + base64.b64encode(data).decode(),
    ]
    out = model.encode_image(kinds)
    assert np.abs(out - expected("image_norm.npy")[3]).max() <= MAX_ABS
    assert model.encode_image(path).shape == (64,)


def test_concurrent_calls_are_correct(model, reference, image_files):
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(3):
                if seed % 2:
                    close(model.encode_text(reference["texts"]), "text_default_norm.npy")
                else:
                    close(model.encode_image(image_files), "image_norm.npy")
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# ----- errors -------------------------------------------------------------------------------


def test_unknown_task_lists_valid_ones(model):
    with pytest.raises(ValueError, match=r"unknown task 'summarise'.*retrieval\.query"):
        model.encode_text(["a"], task="summarise")


@pytest.mark.parametrize("dim", [0, 65, -1, 2.5])
def test_invalid_truncate_dim(model, dim):
    with pytest.raises(ValueError, match="truncate_dim"):
        model.encode_text(["a"], truncate_dim=dim)
    with pytest.raises(ValueError, match="truncate_dim"):
        model.encode_image([EXPECTED / "inputs" / "img0_rgb_97x61.png"], truncate_dim=dim)


def test_untrained_truncate_dim_warns_at_the_callers_line(model):
    with pytest.warns(UserWarning, match="Matryoshka") as record:
        assert model.encode_text("a", truncate_dim=48).shape == (48,)
    assert record[0].filename == __file__  # not clipedge's own file


@pytest.mark.parametrize("length", [0, 2, 8193, "512"])
def test_invalid_max_length(model, length):
    with pytest.raises(ValueError, match="max_length"):
        model.encode_text(["a"], max_length=length)


def test_text_errors_name_the_item(model):
    with pytest.raises(TextInputError, match="item 1: expected str, got NoneType"):
        model.encode_text(["a", None])
    with pytest.raises(ValueError, match="empty"):
        model.encode_text([])


def test_image_errors_name_the_item(model, image_files, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(Path(image_files[3]).read_bytes()[:2000])
    cases = [
        (None, "item 1"),
        (42, "item 1.*unsupported"),
        (b"\x00garbage", "item 1"),
        (str(text_file), "item 1"),
        (str(truncated), "item 1"),
        (str(tmp_path / "missing.png"), "item 1"),
        ("https://example.com/cat.jpg", "item 1.*URL"),
    ]
    for bad, pattern in cases:
        with pytest.raises(ImageInputError, match=pattern):
            model.encode_image([image_files[0], bad, image_files[2]])
    with pytest.raises(ValueError, match="empty"):
        model.encode_image([])


def test_error_index_counts_across_batches(model, image_files):
    with pytest.raises(ImageInputError, match="item 4"):
        model.encode_image([*image_files[:4], None], batch_size=2)


def test_too_large_image_is_refused(tiny_bundle, image_files):
    small_limit = clipedge.load(tiny_bundle, backend="cpu", max_image_pixels=1000)
    with pytest.raises(ImageInputError, match="item 0.*pixels"):
        small_limit.encode_image([image_files[3]])


# ----- bundle errors ------------------------------------------------------------------------


def copy_bundle(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def test_missing_bundle_file(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "vision.onnx").unlink()
    with pytest.raises(BundleError, match="vision.onnx is missing"):
        clipedge.load(bundle)


def test_truncated_graph(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = bundle / "text.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        clipedge.load(bundle)


def test_corrupt_graph_same_size(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = bundle / "text.onnxruntime-cpu.onnx"  # what the CPU backend loads
    graph.write_bytes(b"\xff" * graph.stat().st_size)
    with pytest.raises(BundleError, match="sha256"):
        clipedge.load(bundle, verify_checksums=True)
    with pytest.raises(BundleError, match="sha256"):  # the default: hashed at the first load
        clipedge.load(bundle)
    # Without hashing, the graph's header check still refuses it before any encode.
    with pytest.raises(BundleError, match="text.onnxruntime-cpu.onnx is not a readable ONNX graph"):
        clipedge.load(bundle, verify_checksums=False)


def test_newer_manifest_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest["format_version"] = 99
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer clipedge"):
        clipedge.load(bundle)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a clipedge bundle"):
        clipedge.load(tmp_path)
    (tmp_path / "clipedge.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        clipedge.load(tmp_path)


def test_text_only_bundle_never_loads_vision(tiny_bundle, tmp_path):
    model = clipedge.load(tiny_bundle, backend="cpu")
    model.encode_text("a")
    assert list(model._pipelines) == ["text"]


def _flip_weight_exponents(graph: Path) -> None:
    """Set the top exponent bit of every float of the largest initializer: the graph still
    loads, its outputs turn NaN/Inf (a bit rot that only the checksums would see)."""
    onnx = pytest.importorskip("onnx", reason="rewrites a graph with onnx (the export extra)")
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    values = numpy_helper.to_array(largest).astype(np.float32).copy()
    values.view(np.uint32)[...] |= np.uint32(0x40000000)
    largest.CopyFrom(numpy_helper.from_array(values, largest.name))
    onnx.save(model, str(graph))


def test_non_finite_output_names_the_item_and_the_remedy(tiny_bundle, tmp_path, reference):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    graph = "text.onnxruntime-cpu.onnx"  # what the CPU backend loads
    _flip_weight_exponents(bundle / graph)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest["files"][graph]["bytes"] = (bundle / graph).stat().st_size
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    model = clipedge.load(bundle, backend="cpu", verify_checksums=False)
    with pytest.raises(clipedge.NonFiniteEmbeddingError, match=r"item \d.*verify_checksums=True"):
        model.encode_text(reference["texts"])
    with pytest.raises(BundleError, match="sha256"):
        clipedge.load(bundle, verify_checksums=True)


def test_intact_bundle_passes_checksums_and_a_wrong_manifest_hash_does_not(tiny_bundle, tmp_path):
    model = clipedge.load(tiny_bundle, backend="cpu", verify_checksums=True)
    assert model.encode_text("a").shape == (64,)
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest["files"]["tokenizer.json"]["sha256"] = "0" * 64
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    clipedge.load(bundle, backend="cpu", verify_checksums=False)  # sizes only: loads
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        clipedge.load(bundle, backend="cpu")  # the default hashes at the first load
    with pytest.raises(BundleError, match="tokenizer.json does not match its sha256"):
        clipedge.load(bundle, backend="cpu", verify_checksums=True)


@pytest.mark.parametrize("whole", [None, 42, b"bytes"])
def test_wrong_kind_of_whole_input_is_a_clear_error(model, whole):
    with pytest.raises(TypeError, match="expected a string or a list of strings"):
        model.encode_text(whole)
    if whole is not None and not isinstance(whole, bytes):
        with pytest.raises(TypeError, match="expected an image or a list of images"):
            model.encode_image(whole)
    if whole is None:
        with pytest.raises(TypeError, match="expected an image or a list of images"):
            model.encode_image(None)


def test_lone_surrogate_names_the_item(model):
    with pytest.raises(TextInputError, match=r"item 1: not valid Unicode"):
        model.encode_text(["fine", "bad \ud800 text"])


def test_numpy_integer_options_are_accepted(model, reference):
    out = model.encode_text(
        reference["texts"],
        truncate_dim=np.int64(32),
        batch_size=np.int32(2),
        max_length=np.int64(512),
    )
    close(out, "text_default_trunc32.npy")


def test_per_item_errors_keep_the_other_items(model, reference, image_files):
    prepared = model.tower("text").prepare(["a", None, "b\ud800", "c"])
    assert [e is None for e in prepared.errors] == [True, False, False, True]
    assert prepared.token_ids[1] is None and prepared.token_ids[3] is not None
    images = model.tower("vision").prepare([image_files[0], b"junk", image_files[1]])
    assert [e is None for e in images.errors] == [True, False, True]
    assert images.errors[1].index == 1 and images.sizes[0] == (97, 61)
    np.testing.assert_array_equal(images.pixels[1], 0.0)
    # The pipeline gives what encode_image returns, the bad item keeping its error.
    options = model.finish_options(None, True)
    embedded = model.pipeline("vision").embed(images, 1, options)
    assert embedded.errors[1] is images.errors[1] and embedded.first_error() is images.errors[1]
    want = model.encode_image([image_files[0], image_files[1]])
    np.testing.assert_allclose(embedded.vectors[[0, 2]], want, atol=1e-6)


def test_manifest_tower_keys_are_checked(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    del manifest["towers"]["text"]["settings"]["pad_token_id"]
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="pad_token_id"):
        clipedge.load(bundle)
    manifest["towers"]["audio"] = manifest["towers"].pop("text")
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="unknown tower 'audio'"):
        clipedge.load(bundle)


def test_pooling_follows_the_manifest(tiny_token_states_bundle, tmp_path, reference):
    """Token-state graphs are pooled as the manifest's `pooling` says: the text tower switched
    from `mean` to `cls` returns the first token's state."""
    bundle = copy_bundle(tiny_token_states_bundle, tmp_path)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    assert manifest["towers"]["text"]["pooling"] == "mean"
    manifest["towers"]["text"]["pooling"] = "cls"
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    model = clipedge.load(bundle, backend="cpu")
    texts = reference["texts"]
    pipeline = model.pipeline("text")
    prepared = model.tower("text").prepare(texts)
    batch = next(pipeline.batches(prepared.token_ids, prepared.valid, len(texts)))
    states = pipeline.session.run(batch.feeds)
    first = states[:, 0] / np.linalg.norm(states[:, 0], axis=1, keepdims=True)
    out = model.encode_text(texts)
    np.testing.assert_allclose(out[batch.items], first, atol=1e-6)
    assert np.abs(out - expected("text_default_norm.npy")).max() > 1e-2
