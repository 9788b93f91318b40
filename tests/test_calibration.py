"""Calibration data, the precision pipeline, mixed-precision search and the accuracy report."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="calibration needs onnx (the export extra)")

import clipedge
from clipedge.calibration.data import (
    CalibrationDataError,
    CalibrationSet,
    find_images,
    read_texts,
    sample,
    with_task_prompts,
)
from clipedge.cli import main

from conftest import FIXTURE

skimage_data = pytest.importorskip("skimage.data", reason="real photographs for calibration")
PHOTOS = Path(skimage_data.data_dir)
CAPTIONS = FIXTURE.parent / "calibration" / "captions.jsonl"
PHOTO_GLOB = str(PHOTOS / "*.png")


def test_find_images_dir_glob_list(tmp_path):
    by_glob = find_images(PHOTO_GLOB)
    assert len(by_glob) >= 10 and all(p.suffix == ".png" for p in by_glob)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in by_glob[:3]) + "\n")
    assert find_images(listing) == sorted(by_glob[:3])
    assert set(by_glob) <= set(find_images(PHOTOS))
    with pytest.raises(CalibrationDataError, match="not found"):
        find_images([tmp_path / "nope.jpg"])
    with pytest.raises(CalibrationDataError, match="no calibration images"):
        find_images(str(tmp_path / "*.jpg"))


def test_read_texts_txt_and_jsonl(tmp_path):
    texts = read_texts(CAPTIONS)
    assert len(texts) >= 40 and any("宇宙" in t for t in texts)
    plain = tmp_path / "t.txt"
    plain.write_text("one\n\ntwo\n")
    assert read_texts(plain) == ["one", "two"]
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"caption": "x"}\n')
    with pytest.raises(CalibrationDataError, match="t.jsonl:line 1: no 'text' field"):
        read_texts(bad)


def test_sampling_is_deterministic_and_held_out_is_disjoint():
    first = CalibrationSet.from_sources(PHOTO_GLOB, CAPTIONS, limit=12, seed=3)
    again = CalibrationSet.from_sources(PHOTO_GLOB, CAPTIONS, limit=12, seed=3)
    assert first == again
    assert not set(first.texts) & set(first.held_out_texts)
    assert len(first.texts) + len(first.held_out_texts) == 12
    assert sample(range(10), 4, 1) != sample(range(10), 4, 2)


def test_query_prompts_are_included():
    prompts = {"retrieval.query": "Q: "}
    assert with_task_prompts(["a", "b"], prompts) == ["a", "Q: a", "b", "Q: b"]


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, target)
    return target


def calibrate_args(bundle: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        str(bundle),
        "--calibration-images",
        PHOTO_GLOB,
        "--calibration-texts",
        str(CAPTIONS),
        *extra,
    ]


def test_every_precision_end_to_end(bundle_copy, reference, capsys):
    assert main(calibrate_args(bundle_copy, "--precisions", "fp16,int8,int8-cpu")) == 0
    out = capsys.readouterr().out
    assert "cos min" in out and "retrieval agreement" in out
    assert "6 graph(s) registered in clipedge.json, accuracy_report.json written" in out
    manifest = json.loads((bundle_copy / "clipedge.json").read_text())
    graphs = manifest["towers"]["text"]["graphs"]
    assert graphs["int8-cpu"]["device"] == "cpu" and graphs["int8-cpu"]["accuracy"]["passed"]
    assert graphs["fp16"]["device"] == graphs["int8"]["device"] == "gpu"
    assert graphs["fp16"]["accuracy"]["overflow"] == []
    assert graphs["int8"]["accuracy"]["method"] == "max"
    for name in ("text.fp16.onnx", "vision.int8.onnx", "text.int8-cpu.onnx"):
        assert name in manifest["files"]
    # onnxruntime's CPU precision comes from the fused fp32 form; the GPU ones stay portable
    ops = {
        name: {n.op_type for n in onnx.load(str(bundle_copy / name)).graph.node}
        for name in ("text.int8-cpu.onnx", "text.int8.onnx", "text.fp16.onnx")
    }
    assert "MultiHeadAttention" in ops["text.int8-cpu.onnx"]
    assert "MultiHeadAttention" not in ops["text.int8.onnx"] | ops["text.fp16.onnx"]
    report = json.loads((bundle_copy / "accuracy_report.json").read_text())
    assert {t["tower"] for t in report["towers"]} == {"text", "vision"}
    assert "random weights" in report["note"]
    for row in report["towers"]:
        assert row["cosine_min"] <= row["cosine_mean"] <= 1.0 + 1e-6
        assert row["bytes"] < row["fp32_bytes"]
    assert set(report["retrieval"]["int8-cpu"]) >= {
        "text_to_image_recall@1",
        "image_to_text_recall@5",
    }
    # The runtime now picks the passing CPU int8 graph by default, and it stays close to fp32.
    model = clipedge.load(bundle_copy, backend="cpu")
    assert model.precisions == {"text": "int8-cpu", "vision": "int8-cpu"}
    fp32 = clipedge.load(bundle_copy, backend="cpu", precision="fp32")
    a, b = model.encode_text(reference["texts"]), fp32.encode_text(reference["texts"])
    assert (a * b).sum(1).min() >= 0.99


def test_missed_target_fails_unless_allowed(bundle_copy, capsys):
    args = calibrate_args(bundle_copy, "--precisions", "int8-cpu", "--target-cosine", "0.99999999")
    assert main(args) == 1
    assert "accuracy target missed" in capsys.readouterr().err
    manifest = json.loads((bundle_copy / "clipedge.json").read_text())
    assert not manifest["towers"]["vision"]["graphs"]["int8-cpu"]["accuracy"]["passed"]
    assert clipedge.load(bundle_copy, backend="cpu").precisions["vision"] == "fp32"
    assert main([*args, "--allow-below-target"]) == 0


def test_search_falls_back_the_most_sensitive_blocks(tiny_bundle, tmp_path):
    import onnx

    from clipedge.calibration.blocks import nodes_by_block
    from clipedge.calibration.cpu_int8 import quantize_cpu
    from clipedge.calibration.data import tower_feeds
    from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings
    from clipedge.calibration.search import HeldOut, search_fallback

    graph = tiny_bundle / "vision.onnx"
    calibration = CalibrationSet.from_sources(PHOTO_GLOB, None, limit=8)
    feeds = tower_feeds(clipedge.load(tiny_bundle, backend="cpu"), "vision", calibration, False)
    reference = pooled_embeddings(cpu_session(graph), "vision", feeds)

    def convert(keep_float, dst):
        return quantize_cpu(graph, dst, "dynamic", exclude_nodes=keep_float)

    whole = pooled_embeddings(cpu_session(convert([], tmp_path / "all.onnx")), "vision", feeds)
    whole_cos = cosine_stats(reference, whole)["cosine_min"]
    target = 1.0 - (1.0 - whole_cos) / 4  # unreachable without falling back some blocks
    model = onnx.load(str(graph))
    blocks = nodes_by_block(model)
    inside = {n for names in blocks.values() for n in names}
    others = [n.name for n in model.graph.node if n.name not in inside]
    held_out = HeldOut("vision", feeds, reference)
    result = search_fallback(convert, blocks, others, held_out, target, tmp_path / "mixed.onnx")
    assert set(result.sensitivity) == set(blocks)
    assert result.fp32_blocks, "the target needs at least one float block"
    assert result.fp32_blocks[0] == max(result.sensitivity, key=result.sensitivity.get)
    final = pooled_embeddings(cpu_session(result.graph), "vision", feeds)
    assert cosine_stats(reference, final)["cosine_min"] == pytest.approx(result.min_cosine)
    assert np.isfinite(final).all()


needs_nncf = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("nncf", "openvino")),
    reason="the int8-ov precision needs the optional nncf and openvino packages",
)


@needs_nncf
def test_openvino_int8_precision_end_to_end(bundle_copy, reference):
    assert main(calibrate_args(bundle_copy, "--precisions", "int8-ov")) == 0
    manifest = json.loads((bundle_copy / "clipedge.json").read_text())
    for tower in ("text", "vision"):
        entry = manifest["towers"][tower]["graphs"]["int8-ov"]
        assert entry["file"] == f"{tower}.int8-ov.xml"
        assert entry["device"] == "openvino" and entry["accuracy"]["passed"]
        assert entry["accuracy"]["method"] == "nncf-transformer"
        assert {entry["file"], f"{tower}.int8-ov.bin"} <= set(manifest["files"])
    # Attention's activation x activation products read bf16 inputs (int8 was slower and
    # less accurate, measured); every weight product reads int8 inputs, every weight is int8.
    import openvino as ov

    from clipedge.calibration.openvino_int8 import LAYOUT_OPS, attention_matmuls

    for tower in ("text", "vision"):
        attention = set(attention_matmuls(bundle_copy / f"{tower}.onnx"))
        ir = ov.Core().read_model(str(bundle_copy / f"{tower}.int8-ov.xml"))
        matmuls = {o.get_friendly_name(): o for o in ir.get_ops() if o.get_type_name() == "MatMul"}

        def quantized(op):  # a FakeQuantize on an input, maybe before layout-only ops
            for port in (0, 1):
                node = op.input_value(port).get_node()
                while node.get_type_name() in LAYOUT_OPS:
                    node = node.input_value(0).get_node()
                if node.get_type_name() == "FakeQuantize":
                    return True
            return False

        assert attention and attention <= set(matmuls)
        assert not any(quantized(matmuls[name]) for name in attention)
        assert all(quantized(op) for name, op in matmuls.items() if name not in attention)
    # With OpenVINO installed and no NVIDIA GPU, auto takes OpenVINO and its int8 graphs.
    model = clipedge.load(bundle_copy)
    assert model.plan.backend == "openvino"
    assert model.precisions == {"text": "int8-ov", "vision": "int8-ov"}
    fp32 = clipedge.load(bundle_copy, backend="cpu", precision="fp32")
    a, b = model.encode_text(reference["texts"]), fp32.encode_text(reference["texts"])
    assert (a * b).sum(1).min() >= 0.99
    images = [FIXTURE / "expected" / name for name in reference["images"]]
    a, b = model.encode_image(images), fp32.encode_image(images)
    assert (a * b).sum(1).min() >= 0.99
    # onnxruntime cannot read OpenVINO IR: asking for it names the backend that can.
    assert clipedge.load(bundle_copy, backend="cpu").precisions["text"] == "fp32"
    with pytest.raises(clipedge.BundleError, match="runs only with backend='openvino'"):
        clipedge.load(bundle_copy, backend="cpu", precision="int8-ov")


def test_precision_with_missing_package_fails_before_any_work(bundle_copy, monkeypatch, capsys):
    from clipedge.calibration import precisions

    spec = dataclasses.replace(precisions.PRECISIONS["int8-ov"], requires=("no_such_module_x",))
    monkeypatch.setitem(precisions.PRECISIONS, "int8-ov", spec)
    before = (bundle_copy / "clipedge.json").read_text()
    assert main(calibrate_args(bundle_copy, "--precisions", "int8-ov")) == 2  # as any missing
    err = capsys.readouterr().err  # package the CLI reports
    assert "int8-ov needs no_such_module_x" in err and "clipedge[export,nncf]" in err
    assert (bundle_copy / "clipedge.json").read_text() == before


def bundle_files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in bundle.iterdir() if p.is_file()}


def test_an_interrupted_calibration_leaves_the_bundle_as_it_was(bundle_copy, monkeypatch):
    """Ctrl-C while a second precision converts: the graph the run had already rewritten
    (int8, calibrated again on other samples) stays the old one, matching the manifest; the
    finished graph waits in the work folder, and the next run reuses it."""
    from clipedge.calibration import pipeline, precisions

    assert main(calibrate_args(bundle_copy, "--precisions", "int8", "--no-search")) == 0
    assert not (bundle_copy / pipeline.WORK_DIR).exists()  # a finished run leaves none
    before = bundle_files(bundle_copy)

    def interrupted(*args):
        raise KeyboardInterrupt

    original = precisions.PRECISIONS["fp16"]
    spec = dataclasses.replace(original, make_converter=interrupted)
    monkeypatch.setitem(precisions.PRECISIONS, "fp16", spec)
    args = calibrate_args(bundle_copy, "--precisions", "int8,fp16", "--no-search", "--seed", "1")
    assert main(args) == 130  # "clipedge calibrate: interrupted"
    assert bundle_files(bundle_copy) == before
    with pytest.warns(RuntimeWarning, match="meant for gpu"):  # Q/DQ int8 is the GPU's
        model = clipedge.load(bundle_copy, backend="cpu", precision="int8", verify_checksums=True)
    assert model.encode_text("a caption").shape == (model.manifest.embed_dim,)
    work = bundle_copy / pipeline.WORK_DIR
    finished = sorted(p.parent.name.rsplit("-", 1)[0] for p in work.glob("*/result.json"))
    assert finished == ["text.fp32", "text.int8"]

    # The second run reuses the finished text int8 graph and converts only what is left.
    converted = []

    def counting(src, feeds, method, make=precisions.PRECISIONS["int8"].make_converter):
        converted.append(Path(src).name)
        return make(src, feeds, method)

    monkeypatch.setitem(precisions.PRECISIONS, "fp16", original)
    monkeypatch.setitem(
        precisions.PRECISIONS,
        "int8",
        dataclasses.replace(precisions.PRECISIONS["int8"], make_converter=counting),
    )
    assert main(args) == 0
    assert converted == ["vision.onnx"]
    manifest = json.loads((bundle_copy / "clipedge.json").read_text())
    assert {"fp16", "int8"} <= set(manifest["towers"]["text"]["graphs"])
    assert not (bundle_copy / pipeline.WORK_DIR).exists()
    clipedge.load(bundle_copy, backend="cpu", precision="fp16", verify_checksums=True)


def test_calibration_signs_only_what_it_wrote(bundle_copy):
    """A stray file in the bundle's folder is not signed into the manifest (it was: every
    file in the folder was hashed again and listed), and the signed files still load."""
    (bundle_copy / "notes.txt").write_text("not part of the bundle")
    before = json.loads((bundle_copy / "clipedge.json").read_text())["files"]
    assert main(calibrate_args(bundle_copy, "--towers", "text", "--precisions", "int8-cpu")) == 0
    files = json.loads((bundle_copy / "clipedge.json").read_text())["files"]
    assert "notes.txt" not in files
    assert set(files) == set(before) | {"text.int8-cpu.onnx", "accuracy_report.json"}
    model = clipedge.load(bundle_copy, backend="cpu", verify_checksums=True)
    assert model.precisions["text"] == "int8-cpu"
    assert model.encode_text("a caption").shape == (model.manifest.embed_dim,)


def test_an_unknown_precision_is_refused_before_the_data_is_read(tmp_path, capsys):
    argv = ["calibrate", str(tmp_path), "--calibration-images", str(tmp_path / "none")]
    assert main([*argv, "--precisions", "int4"]) == 2
    err = capsys.readouterr().err  # about the precision, not the missing images or bundle
    assert err.strip() == (
        "clipedge calibrate: error: --precisions: unknown precision(s) ['int4']; "
        "choose from ['fp16', 'int8', 'int8-cpu', 'int8-ov']"
    )


def test_a_graph_onnx_refuses_is_a_clean_failure(bundle_copy, monkeypatch, capsys):
    """onnx's checker refuses, e.g., a hard-linked weights file (a `cp -al` copy of a bundle):
    the command says so in one line and exits 1 instead of a traceback."""
    from onnx.checker import ValidationError

    from clipedge.calibration import pipeline

    def refuse(*args, **kwargs):
        raise ValidationError("text.onnx.data has multiple hard links")

    monkeypatch.setattr(pipeline, "calibrate_bundle", refuse)
    assert main(calibrate_args(bundle_copy, "--precisions", "int8-cpu")) == 1
    err = capsys.readouterr().err
    assert err.strip() == "clipedge calibrate: error: text.onnx.data has multiple hard links"


def test_undecodable_images_are_named_and_skipped(tmp_path, caplog):
    photos = sorted(PHOTOS.glob("*.png"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in [broken, *photos]) + "\n")
    calibration = CalibrationSet.from_sources(listing, None, limit=None)
    assert sorted(calibration.images + calibration.held_out_images) == photos
    assert "skipping calibration image" in caplog.text and str(broken) in caplog.text
    broken_only = tmp_path / "only.txt"
    broken_only.write_text(f"{broken}\n")
    with pytest.raises(CalibrationDataError, match="none of the calibration images"):
        CalibrationSet.from_sources(broken_only, None)


def test_towers_calibrates_one_tower_and_keeps_the_others_report_rows(bundle_copy, capsys):
    assert main(calibrate_args(bundle_copy, "--precisions", "int8-cpu", "--no-search")) == 0
    text_before = json.loads((bundle_copy / "clipedge.json").read_text())["towers"]["text"]
    text_graph = (bundle_copy / "text.int8-cpu.onnx").read_bytes()
    capsys.readouterr()
    args = calibrate_args(bundle_copy, "--precisions", "int8-cpu", "--towers", "vision")
    assert main([*args, "--no-search"]) == 0
    out = capsys.readouterr().out
    assert "[calibrate] vision int8-cpu: total" in out and "peak RSS" in out
    assert "[calibrate] text" not in out
    manifest = json.loads((bundle_copy / "clipedge.json").read_text())
    assert manifest["towers"]["text"] == text_before
    assert (bundle_copy / "text.int8-cpu.onnx").read_bytes() == text_graph
    report = json.loads((bundle_copy / "accuracy_report.json").read_text())
    assert sorted(r["tower"] for r in report["towers"]) == ["text", "vision"]
    clipedge.load(bundle_copy, backend="cpu", verify_checksums=True)


def test_bad_towers_and_an_unmeetable_memory_budget_are_refused_up_front(bundle_copy, capsys):
    before = bundle_files(bundle_copy)
    args = calibrate_args(bundle_copy, "--precisions", "int8-cpu")
    assert main([*args, "--towers", "audio"]) == 2
    assert "unknown tower(s) ['audio']" in capsys.readouterr().err
    if importlib.util.find_spec("nncf") is not None:  # the budget plans NNCF's statistics
        int8_ov = calibrate_args(bundle_copy, "--precisions", "int8-ov")
        assert main([*int8_ov, "--max-memory", "0.01"]) == 2
        err = capsys.readouterr().err
        assert "clipedge calibrate: error: --max-memory 0.01 GB cannot be met" in err
    assert bundle_files(bundle_copy) == before
    assert main([*args, "--max-memory", "64", "--no-search"]) == 0
    assert "within --max-memory 64 GB" in capsys.readouterr().out


@pytest.fixture(scope="module")
def vision_feeds(tiny_bundle):
    """The tiny image tower's graph, calibration and held-out feeds, attention products."""
    from clipedge.calibration.data import tower_feeds
    from clipedge.calibration.openvino_int8 import attention_matmuls

    calibration = CalibrationSet.from_sources(PHOTO_GLOB, None, limit=12)
    model = clipedge.load(tiny_bundle, backend="cpu")
    graph = tiny_bundle / "vision.onnx"
    feeds, held = (tower_feeds(model, "vision", calibration, h) for h in (False, True))
    return graph, feeds, held, attention_matmuls(graph)


@needs_nncf
def test_leaving_attention_out_of_nncf_gives_the_same_graph(vision_feeds, tmp_path):
    """NNCF's statistics on the attention maps cost memory and bought nothing: every variant
    bypasses attention's quantisers anyway. Without them NNCF makes the same graph."""
    from clipedge.calibration.openvino_int8 import quantize_all, save_ir, with_float_inputs
    from clipedge.calibration.report import cpu_session, pooled_embeddings

    graph, feeds, held, attention = vision_feeds
    before = with_float_inputs(quantize_all(graph, feeds), attention)
    after = with_float_inputs(quantize_all(graph, feeds, float_layers=attention), attention)
    outputs = [
        pooled_embeddings(cpu_session(save_ir(m, tmp_path / f"{name}.xml")), "vision", held)
        for name, m in (("before", before), ("after", after))
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])


@needs_nncf
def test_units_kept_float_get_their_float_weights_back(vision_feeds, tmp_path):
    """A unit the search keeps float runs on float weights: with int8 weights kept, every
    full-size image block float still gave 0.98154 (the 7-bit weights alone). All units
    float is the fp32 graph again; the others stay int8 weights on disk."""
    import onnx

    from clipedge.calibration.blocks import nodes_by_unit
    from clipedge.calibration.openvino_int8 import quantize_all, save_ir, with_float_inputs
    from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings

    graph, feeds, held, attention = vision_feeds
    quantized = quantize_all(graph, feeds, float_layers=attention)
    units = nodes_by_unit(onnx.load(str(graph), load_external_data=False))
    every = [name for names in units.values() for name in names]
    reference = pooled_embeddings(cpu_session(graph), "vision", held)
    cosines, sizes = {}, {}
    for name, layers in (("int8", attention), ("float", [*attention, *every])):
        ir = save_ir(with_float_inputs(quantized, layers), tmp_path / f"{name}.xml")
        embeddings = pooled_embeddings(cpu_session(ir), "vision", held)
        cosines[name] = cosine_stats(reference, embeddings)["cosine_min"]
        sizes[name] = ir.with_suffix(".bin").stat().st_size
    assert cosines["float"] >= 0.9995 > cosines["int8"]
    assert sizes["int8"] * 3 < sizes["float"]  # int8 weights where quantised
