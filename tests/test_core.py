"""The one core: options, errors, the pipeline and the manifest hold for every consumer."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clipedge
from clipedge.bundle.manifest import MANIFEST_NAME, read_manifest
from clipedge.engine.onnxruntime_backend import OnnxruntimeOptions
from clipedge.engine.session import EngineLimits
from clipedge.errors import (
    BackendError,
    BundleError,
    ClipEdgeError,
    EngineLimitError,
    InputError,
    NonFiniteEmbeddingError,
    OptionError,
)
from clipedge.options import Options
from clipedge.pipeline import RAW, Pipeline

ROOT = Path(__file__).resolve().parent.parent
LONG_TEXT = " ".join(f"word{i} and more words" for i in range(400))


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return clipedge.load(tiny_bundle, backend="cpu")


class LimitedSession:
    """A real session seen through an engine that takes at most `max_length` tokens."""

    def __init__(self, session, max_length: int) -> None:
        self.session = session
        self.provider = session.provider
        self.limits = EngineLimits(max_batch=2, max_length=max_length)
        self.batches: list[int] = []

    def run(self, feeds):
        rows, length = feeds["input_ids"].shape
        assert rows <= 2 and length <= self.limits.max_length, "the pipeline broke the limits"
        self.batches.append(rows)
        return self.session.run(feeds)

    def close(self) -> None:
        pass


def limited(model, max_length: int) -> LimitedSession:
    pipeline = model.pipeline("text")
    session = LimitedSession(pipeline.session, max_length)
    pipeline.session = session
    return session


def test_an_engine_limit_is_an_input_error_of_that_item_only(tiny_bundle):
    model = clipedge.load(tiny_bundle, backend="cpu")
    reference = model.encode_text(["short one", "another"])
    session = limited(model, max_length=16)
    with pytest.raises(EngineLimitError, match=r"item 1: \d+ tokens exceed the longest text"):
        model.encode_text(["short one", LONG_TEXT, "another"])
    tower = model.tower("text")
    prepared = tower.prepare(["short one", LONG_TEXT, "another", "x"])
    embedded = model.pipeline("text").embed(prepared, 32, RAW)
    assert isinstance(embedded.errors[1], EngineLimitError) and isinstance(
        embedded.errors[1], InputError
    )
    assert embedded.errors[0] is None and embedded.errors[2] is None
    got = embedded.vectors[[0, 2]] / np.linalg.norm(embedded.vectors[[0, 2]], axis=1)[:, None]
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert max(session.batches) <= 2  # batches split to the engine's largest


def test_a_failing_item_costs_only_itself(model):
    class Flaky:
        provider = "flaky"
        limits = EngineLimits()

        def __init__(self, session):
            self.session = session

        def run(self, feeds):
            if (feeds["input_ids"] == 666).any():
                raise RuntimeError("poisoned row")
            return self.session.run(feeds)

        def close(self):
            pass

    tower = model.tower("text")
    pipeline = Pipeline(tower, Flaky(model.session("text")), model.manifest.embed_dim)
    rows = [[0, 5, 2], [0, 666, 2], [0, 7, 2]]
    embedded = pipeline.run_rows(rows, 8, RAW, first_index=10)
    assert embedded.errors[0] is None and embedded.errors[2] is None
    assert isinstance(embedded.errors[1], BackendError)
    assert str(embedded.errors[1]).startswith("item 11: the text engine failed: RuntimeError")


def test_max_batch_tokens_bounds_padded_tokens_without_changing_results(tiny_bundle):
    texts = ["word " * 70, "a", "word " * 40, "b c", "word " * 60, "d"]
    plain = clipedge.load(tiny_bundle, backend="cpu")
    budget = clipedge.load(tiny_bundle, backend="cpu", max_batch_tokens=300)
    pipeline = budget.pipeline("text")
    rows = [pipeline.tower.prepare([t]).row(0) for t in texts]
    plan = pipeline.plan(rows, range(len(rows)), 32)
    assert len(plan) > 1 and sorted(i for chunk in plan for i in chunk) == list(range(6))
    for chunk in plan:
        assert len(chunk) * max(len(rows[i]) for i in chunk) <= 300
    np.testing.assert_allclose(budget.encode_text(texts), plain.encode_text(texts), atol=1e-6)
    alone = budget.pipeline("text").run_rows([rows[1], [0, *[5] * 400, 2]], 8, RAW)
    assert alone.errors[0] is None and isinstance(alone.errors[1], EngineLimitError)
    assert str(alone.errors[1]).startswith("item 1: 402 tokens exceed max_batch_tokens=300")


def test_images_count_their_tower_tokens_against_max_batch_tokens(tiny_bundle):
    """An image is grid^2 + 1 tokens inside the tower (17 for the tiny 64 px, 16 px patches;
    1025 at full size): the budget bounds image batches too; one image over it still runs."""
    manifest = read_manifest(tiny_bundle)
    assert manifest.towers["vision"].settings.tokens == 17
    images = [np.full((64, 64, 3), shade, np.uint8) for shade in range(0, 250, 25)]
    plain = clipedge.load(tiny_bundle, backend="cpu")
    budget = clipedge.load(tiny_bundle, backend="cpu", max_batch_tokens=3 * 17)
    pipeline = budget.pipeline("vision")
    rows = [pipeline.tower.prepare([image]).row(0) for image in images]
    assert [len(chunk) for chunk in pipeline.plan(rows, range(10), 32)] == [3, 3, 3, 1]
    np.testing.assert_allclose(budget.encode_image(images), plain.encode_image(images), atol=1e-6)
    tight = clipedge.load(tiny_bundle, backend="cpu", max_batch_tokens=8)
    assert [len(c) for c in tight.pipeline("vision").plan(rows, range(3), 32)] == [1, 1, 1]
    assert tight.encode_image(images[:3]).shape == (3, 64)


def test_nan_errors_name_the_lowest_item_and_count_the_rest(model):
    class Nan:
        provider = "nan"
        limits = EngineLimits()

        def run(self, feeds):
            out = np.ones((len(feeds["input_ids"]), model.manifest.embed_dim), np.float32)
            out[feeds["input_ids"][:, 1] != 9] = np.nan
            return out

        def close(self):
            pass

    pipeline = Pipeline(model.tower("text"), Nan(), model.manifest.embed_dim)
    embedded = pipeline.run_rows([[0, 5, 2], [0, 9, 2], [0, 5, 5, 2], [0, 5, 2]], 8, RAW)
    assert embedded.errors[1] is None
    error = embedded.first_error()
    assert isinstance(error, NonFiniteEmbeddingError)
    assert str(error).startswith("item 0 (and 2 more): the text tower returned NaN/Inf")


def test_every_runtime_error_has_one_root():
    classes = [
        clipedge.TextInputError,
        clipedge.ImageInputError,
        clipedge.SourceError,
        BundleError,
        NonFiniteEmbeddingError,
        OptionError,
        EngineLimitError,
        BackendError,
    ]
    assert all(issubclass(cls, ClipEdgeError) for cls in classes)
    assert issubclass(OptionError, ValueError) and issubclass(InputError, ValueError)


def test_every_export_calibration_and_batch_error_has_one_root():
    pytest.importorskip("torch", reason="export and calibration need the export extra")
    pytest.importorskip("pyarrow", reason="the batch tool needs the batch extra")
    import clipedge.calibration.data as calibration_data
    import clipedge.calibration.pipeline as calibration_pipeline
    import clipedge.embed.job as embed_job
    import clipedge.export.config as export_config
    import clipedge.export.pipeline as export_pipeline
    import clipedge.export.source as export_source
    import clipedge.export.weights as export_weights

    classes = [
        embed_job.EmbedError,
        export_config.UnsupportedCheckpointError,
        export_pipeline.ExportError,
        export_source.CheckpointSourceError,
        export_weights.CheckpointError,
        calibration_data.CalibrationDataError,
        calibration_pipeline.BelowTargetError,
    ]
    assert all(issubclass(cls, ClipEdgeError) for cls in classes)


def test_one_options_object_is_checked_once_and_reaches_load(tiny_bundle):
    for bad in ({"max_image_pixels": -5}, {"threads": -1}, {"url_timeout": 0}, {"max_length": 2}):
        with pytest.raises(OptionError, match=next(iter(bad))):
            Options(**bad)
        with pytest.raises(OptionError, match=next(iter(bad))):
            clipedge.load(tiny_bundle, backend="cpu", **bad)
    with pytest.raises(TypeError, match="unknown option 'max_pixel'"):
        clipedge.load(tiny_bundle, backend="cpu", max_pixel=5)
    model = clipedge.load(tiny_bundle, backend="cpu", max_image_pixels=100)
    with pytest.raises(clipedge.ImageInputError, match="exceeds max_image_pixels=100"):
        model.encode_image(np.zeros((20, 20, 3), np.uint8))


def test_max_length_is_the_bundles_default_everywhere(tiny_bundle, model):
    manifest = read_manifest(tiny_bundle)
    settings = manifest.towers["text"].settings
    assert model.tower("text").default_max_length == settings.default_max_length == 512
    long = " ".join(["word"] * 3000)
    default = model.encode_text(long)
    np.testing.assert_array_equal(default, model.encode_text(long, max_length=512))
    assert not np.allclose(default, model.encode_text(long, max_length=1024))
    wider = clipedge.load(tiny_bundle, backend="cpu", max_length=1024)
    np.testing.assert_array_equal(wider.encode_text(long), model.encode_text(long, max_length=1024))
    with pytest.raises(OptionError, match=r"max_length must be in \[3, 8192\]"):
        model.encode_text("x", max_length=9000)


@pytest.mark.parametrize("bad", [2, 0, -1, 8193, 16.0, "16", True])
def test_invalid_max_length_is_an_option_error(model, bad):
    with pytest.raises(OptionError, match="max_length"):
        model.encode_text("a", max_length=bad)
    with pytest.raises(OptionError, match="max_length"):
        model.tower("text").prepare(["a"], max_length=bad)


def test_texts_batch_longest_first(model):
    rows = [[0] * n for n in (3, 10, 1, 10, 7)]
    assert model.tower("text").batch_order(rows, range(5)) == [1, 3, 4, 0, 2]
    batches = list(model.pipeline("text").batches(rows, range(5), 2))
    assert [b.items for b in batches] == [[1, 3], [4, 0], [2]]


def test_the_same_long_text_gets_the_same_vector_from_library_server_and_batch(
    tiny_bundle, model, tmp_path
):
    pytest.importorskip("pyarrow")
    pytest.importorskip("fastapi")
    import asyncio
    import time

    import pyarrow.parquet as pq

    from clipedge.embed.job import EmbedJob, embed
    from clipedge.serve.metrics import Metrics
    from clipedge.serve.requests import parse_request
    from clipedge.serve.service import Service
    from clipedge.serve.settings import ServeSettings

    long = " ".join(f"token{i}" for i in range(1500))
    library = model.encode_text(long)
    source = tmp_path / "texts.txt"
    source.write_text(long + "\n")
    embed(EmbedJob(tiny_bundle, str(source), "texts", tmp_path / "out", workers=0), False)
    batch = np.asarray(pq.read_table(tmp_path / "out").column("embedding").to_pylist()[0])
    settings = ServeSettings(str(tiny_bundle))
    service = Service(settings, Metrics(), model)
    service.start()
    request = parse_request({"input": [long], "truncate": True}, settings, 64, {})
    body = asyncio.run(service.embed(request, time.monotonic() + 30))
    service.close()
    served = np.asarray(body["data"][0]["embedding"])
    np.testing.assert_allclose(batch, library, atol=1e-6)
    np.testing.assert_allclose(served, library, atol=1e-6)


def test_embed_workers_keep_every_image_limit(tiny_bundle, tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    from PIL import Image

    from clipedge.embed.job import EmbedJob, embed

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "big.png")
    Image.new("RGB", (8, 8), "blue").save(folder / "small.png")
    job = EmbedJob(
        tiny_bundle,
        str(folder),
        "images",
        tmp_path / "out",
        workers=1,
        options=Options(max_image_pixels=100),
    )
    summary = embed(job, False)
    table = pq.read_table(tmp_path / "out").to_pydict()
    errors = dict(zip([Path(i).name for i in table["id"]], table["error"], strict=True))
    assert summary.failed == 1 and errors["small.png"] is None
    assert "exceeds max_image_pixels=100" in errors["big.png"]


def test_dicts_and_sets_are_not_texts_and_none_does_not_normalise(model):
    with pytest.raises(TypeError, match="got dict"):
        model.encode_text({"a": 1})
    with pytest.raises(TypeError, match="got set"):
        model.encode_text({"a", "b"})
    raw = model.encode_text("a cat", normalize_embeddings=None)
    assert not np.isclose(np.linalg.norm(raw), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw), model.encode_text("a cat"), atol=1e-6)


@pytest.mark.parametrize("char", ["\u0301", "\u200b"])
def test_tokenising_cost_is_bounded_whatever_the_characters(model, char):
    import time

    text = "a" + char * 2_000_000
    started = time.perf_counter()
    prepared = model.tower("text").prepare([text])
    assert time.perf_counter() - started < 3.0
    assert prepared.errors == [None] and len(prepared.row(0)) <= 512


def test_no_tower_name_branch_outside_the_towers():
    pattern = re.compile(r"""[!=]= ?["'](text|vision)["']""")
    found = []
    for folder in ("runtime", "export", "calibration", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if "towers" in path.relative_to(ROOT).parts:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def write_manifest(bundle: Path, change) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_format_1_manifest_still_loads_and_keeps_its_calibrated_target(tiny_bundle, tmp_path):
    import shutil

    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)

    def to_v1(data):
        data["format_version"] = 1
        for tower in data["towers"].values():
            tower.update(tower.pop("settings"))
            tower["output"] = "pooled"
            for graph in tower["graphs"].values():
                graph["external_data"] = None
        fp32 = data["towers"]["text"]["graphs"]["fp32"]
        data["towers"]["text"]["graphs"]["fp16"] = {
            **fp32,
            "precision": "fp16",
            "device": "gpu",
            "accuracy": {"cosine_mean": 1, "cosine_min": 1, "target_cosine": 0.97, "passed": True},
        }

    write_manifest(bundle, to_v1)
    manifest = read_manifest(bundle)
    assert manifest.format_version == 2
    assert manifest.towers["text"].graphs["fp16"].accuracy.target == 0.97
    assert manifest.towers["vision"].settings.image_size == 64
    vectors = clipedge.load(bundle, backend="cpu", precision="fp32").encode_text(["a cat"])
    np.testing.assert_allclose(
        vectors, clipedge.load(tiny_bundle, backend="cpu").encode_text(["a cat"]), atol=1e-7
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format_version=99), "bundle format 99, this clipedge reads up to 2"),
        (lambda d: d["towers"]["text"].pop("settings"), r"bundle format 2\) is incomplete"),
        (lambda d: d.update(embed_dim=65), "output is 64 wide, the manifest's embed_dim is 65"),
        (
            lambda d: d["towers"]["text"]["settings"].update(pad_token_id=10**9),
            "pad_token_id 1000000000 is not in the tokenizer's vocabulary",
        ),
    ],
)
def test_a_manifest_that_disagrees_is_a_bundle_error_at_load(
    tiny_bundle, tmp_path, change, message
):
    import shutil

    bundle = tmp_path / "bad"
    shutil.copytree(tiny_bundle, bundle)
    write_manifest(bundle, change)
    with pytest.raises(BundleError, match=message):
        clipedge.load(bundle, backend="cpu")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipedge.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_every_command_reports_errors_one_way(tiny_bundle, tmp_path):
    verify = run_cli("verify", str(tmp_path / "missing"))
    assert verify.returncode == 1 and verify.stderr.startswith("clipedge verify: error:")
    pytest.importorskip("pyarrow", reason="clipedge embed needs the batch extra")
    text_only = run_cli("embed", str(tmp_path / "missing"), "--texts", "x.txt", "-o", "o")
    assert text_only.returncode == 1
    assert text_only.stderr.startswith("clipedge embed: error: bundle directory")
    assert "Traceback" not in text_only.stderr
    usage = run_cli("embed", str(tiny_bundle), "-o", str(tmp_path / "o"))
    assert usage.returncode == 2
    assert usage.stderr.strip() == "clipedge embed: error: give exactly one of --images or --texts"
    bad_option = run_cli(
        "embed", str(tiny_bundle), "--texts", "x.txt", "-o", "o", "--max-image-pixels", "-3"
    )
    assert bad_option.returncode == 2
    assert bad_option.stderr.startswith("clipedge embed: error: max_image_pixels must be")


def test_the_text_session_returns_memory_after_a_long_text(tiny_bundle):
    """onnxruntime's CPU arena would keep a long text's attention buffers for good; text
    sessions run without it (vision's fixed shapes keep it)."""
    model = clipedge.load(tiny_bundle, backend="cpu")
    session = model.session("text")._session
    assert session.get_session_options().enable_cpu_mem_arena is False
    assert model.session("vision")._session.get_session_options().enable_cpu_mem_arena is True


def test_cpu_sessions_plan_without_buffer_reuse(tiny_bundle):
    """onnxruntime's planner, reusing a freed buffer for a later tensor, kept buffers alive
    past their last use: one full-size 8192-token text +1.40 GB with it, +0.46 GB without
    (docs/benchmarks.md). Both CPU towers run without it unless asked."""
    model = clipedge.load(tiny_bundle, backend="cpu")
    for tower in ("text", "vision"):
        assert model.session(tower)._session.get_session_options().enable_mem_reuse is False
    asked = clipedge.load(
        tiny_bundle, backend="cpu", backend_options=OnnxruntimeOptions(memory_reuse=True)
    )
    assert asked.session("text")._session.get_session_options().enable_mem_reuse is True


def test_cpu_sessions_do_not_spin(tiny_bundle):
    """Idle intra-op threads sleep instead of spin-waiting on the CPU provider: two towers
    (and the server's preparation) share the cores; asked, they spin as onnxruntime's
    default does."""

    def spinning(model: clipedge.ClipEdgeModel, tower: str) -> str:
        options = model.session(tower)._session.get_session_options()
        return options.get_session_config_entry("session.intra_op.allow_spinning")

    model = clipedge.load(tiny_bundle, backend="cpu")
    assert [spinning(model, t) for t in ("text", "vision")] == ["0", "0"]
    asked = clipedge.load(
        tiny_bundle, backend="cpu", backend_options=OnnxruntimeOptions(spinning=True)
    )
    assert spinning(asked, "text") == "1"
