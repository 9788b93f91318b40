"""Native TensorRT: the builder for real (TensorRT for RTX builds without a GPU), the
backend's decisions in plain Python, and the API surface of the real TensorRT classes.

The engine builds are a buildability test: every graph of the tiny bundle (fp32, fp16, int8,
both towers) parses and builds, with the I/O and profiles the runtime expects. They say
nothing about accuracy: no engine is executed here (no GPU); `clipedge verify` and
`scripts/gpu_check.sh` do that on a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="building engines reads graphs with onnx (the tensorrt extra)")

import onnx
from onnx import TensorProto, helper, numpy_helper

import clipedge
from clipedge.bundle.manifest import BundleError, read_manifest
from clipedge.engine import plan as plan_module
from clipedge.engine import tensorrt_backend
from clipedge.engine.onnxruntime_backend import TensorrtEpOptions
from clipedge.engine.tensorrt_backend import TensorrtOptions
from clipedge.engine.tensorrt_engines import (
    MANIFEST_KEY,
    RTX_COMPUTE_CAPABILITIES,
    EngineEntry,
    Machine,
    buffer_plan,
    choose_engine,
    choose_profile,
    engine_entries,
    l4t_release,
    mismatches,
    parse_profiles,
    split_batch,
    tower_profiles,
)

from conftest import FIXTURE

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
HAS_CUDA_EP = "TensorrtExecutionProvider" in __import__("onnxruntime").get_available_providers()
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="needs tensorrt-rtx-cu13 (the [dev] install)")


# ----- plain logic -----------------------------------------------------------------------


def test_parse_profiles():
    assert parse_profiles(None, "text") == [(32, 128), (32, 512)]
    assert parse_profiles(None, "vision") == [(32, None)]
    assert parse_profiles("32x128, 8X2048", "text") == [(32, 128), (8, 2048)]
    assert parse_profiles("1,32", "vision") == [(1, None), (32, None)]
    with pytest.raises(ValueError, match="BATCHxLENGTH"):
        parse_profiles("32", "text")
    with pytest.raises(ValueError, match="BATCH, e.g. 32"):
        parse_profiles("8x128", "vision")
    with pytest.raises(ValueError, match="bad profile"):
        parse_profiles("axb", "text")


def test_tower_profiles_follow_the_manifest(tiny_bundle):
    manifest = read_manifest(tiny_bundle)
    text = tower_profiles(manifest.towers["text"], [(2, 8192), (32, 128), (8, 99999)], "text")
    # sorted by length; a bucket over the manifest's max_length (8192) is dropped.
    assert [(p.max_batch, p.max_length) for p in text] == [(32, 128), (2, 8192)]
    assert text[0].shapes["input_ids"] == ([1, 1], [8, 128], [32, 128])
    assert text[1].shapes["attention_mask"] == ([1, 1], [2, 8192], [2, 8192])
    vision = tower_profiles(manifest.towers["vision"], [(32, None)], "vision")
    assert vision[0].shapes["pixel_values"] == ([1, 3, 64, 64], [8, 3, 64, 64], [32, 3, 64, 64])
    capped = tower_profiles(manifest.towers["text"], [(4, 20000)], "text")
    assert [(p.max_batch, p.max_length) for p in capped] == [(4, 8192)]


def _profiles(tiny_bundle):
    tower = read_manifest(tiny_bundle).towers["text"]
    return tower_profiles(tower, [(32, 128), (32, 512), (8, 2048)], "text")


def test_profile_choice_and_batch_split(tiny_bundle):
    profiles = _profiles(tiny_bundle)
    assert choose_profile(profiles, 7) == 0
    assert choose_profile(profiles, 128) == 0
    assert choose_profile(profiles, 129) == 1
    assert choose_profile(profiles, 2048) == 2
    with pytest.raises(ValueError, match="exceed the engine's longest profile"):
        choose_profile(profiles, 2049)
    assert split_batch(70, 32) == [slice(0, 32), slice(32, 64), slice(64, 70)]
    assert split_batch(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError):
        split_batch(0, 8)


def test_buffer_plan_is_the_largest_shape_of_any_profile(tiny_bundle):
    profiles = _profiles(tiny_bundle)
    sizes = buffer_plan(
        profiles,
        {
            "input_ids": ("int64", ["batch", "sequence"]),
            "text_embeds": ("float32", ["batch", 64]),
            "last_hidden_state": ("float16", ["batch", "sequence", 64]),
        },
    )
    assert sizes["input_ids"] == max(32 * 512, 8 * 2048) * 8
    assert sizes["text_embeds"] == 32 * 64 * 4
    assert sizes["last_hidden_state"] == max(32 * 512, 8 * 2048) * 64 * 2


def test_l4t_release(tmp_path):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    assert l4t_release(release) == "36.4.3"
    assert l4t_release(tmp_path / "missing") is None


def _entry(**changes) -> EngineEntry:
    base = dict(
        file="text.fp16.trt-10.3.0-sm87.engine",
        precision="fp16",
        graph="text.fp16.onnx",
        graph_sha256="a" * 64,
        profiles=[],
        flavour="tensorrt",
        tensorrt_version="10.3.0.30",
        version_compatible=False,
        gpu_name="Orin",
        compute_capabilities=["8.7"],
        platform={"machine": "aarch64", "l4t": "36.4.0"},
        inputs=[],
        outputs=[],
    )
    base.update(changes)
    return EngineEntry(**base)


ORIN = Machine({"tensorrt": "10.3.0.30"}, "Orin", "8.7", {"machine": "aarch64", "l4t": "36.4.0"})


def test_engine_matching_names_every_reason():
    assert mismatches(_entry(), ORIN, "a" * 64) == []
    assert mismatches(_entry(), ORIN, None) == []  # graph hash unknown: not a reason
    reasons = mismatches(
        _entry(),
        Machine({"tensorrt": "10.13.3"}, "NVIDIA L4", "8.9", {"machine": "x86_64", "l4t": None}),
        "b" * 64,
    )
    text = " | ".join(reasons)
    assert "another text.fp16.onnx" in text
    assert "built with tensorrt 10.3.0.30, here 10.13.3" in text
    assert "compute capability 8.7, this GPU (NVIDIA L4) is 8.9" in text
    assert "built on aarch64, this is x86_64" in text
    assert "L4T 36.4.0" in text
    # a version-compatible engine runs on a later TensorRT of the same major
    later = Machine({"tensorrt": "10.13.3"}, "Orin", "8.7", ORIN.platform)
    assert mismatches(_entry(version_compatible=True), later, None) == []
    major = Machine({"tensorrt": "11.0.0"}, "Orin", "8.7", ORIN.platform)
    assert "same major version" in " ".join(
        mismatches(_entry(version_compatible=True), major, None)
    )
    # same compute capability, another GPU: tuned elsewhere (full TensorRT)
    other = Machine({"tensorrt": "10.3.0.30"}, "Jetson AGX Orin", "8.7", ORIN.platform)
    assert "tuned on Orin" in " ".join(mismatches(_entry(), other, None))
    # no GPU, no TensorRT: said, not crashed
    nothing = Machine({}, None, None, {"machine": "aarch64", "l4t": "36.4.0"})
    assert {"needs tensorrt (installed: none)", "no usable NVIDIA GPU here"} <= set(
        mismatches(_entry(), nothing, None)
    )


def test_rtx_engines_are_portable_across_rtx_gpus_not_hopper():
    rtx = _entry(
        flavour="tensorrt_rtx",
        tensorrt_version="1.7.1.116",
        gpu_name=None,
        compute_capabilities=[],
        platform={"machine": "x86_64", "l4t": None},
    )
    x86 = {"machine": "x86_64", "l4t": None}
    ada = Machine({"tensorrt_rtx": "1.7.1.116"}, "NVIDIA GeForce RTX 4090", "8.9", x86)
    assert mismatches(rtx, ada, None) == []
    hopper = Machine({"tensorrt_rtx": "1.7.1.116", "tensorrt": "10.13"}, "NVIDIA H200", "9.0", x86)
    assert "is 9.0" in " ".join(mismatches(rtx, hopper, None))
    assert "9.0" not in RTX_COMPUTE_CAPABILITIES and "8.7" not in RTX_COMPUTE_CAPABILITIES


# ----- the int8 embedding rewrite --------------------------------------------------------


def _int8_embedding_graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    table = rng.integers(-127, 128, (50, 8)).astype(np.int8)
    scales = rng.uniform(0.01, 0.1, (50, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb_int8", "ids"], ["g_int8"], name="emb"),
        helper.make_node("Cast", ["g_int8"], ["g_wide"], to=TensorProto.FLOAT, name="emb_cast"),
        helper.make_node("Gather", ["emb_row_scale", "ids"], ["g_scale"], name="emb_scale"),
        helper.make_node("Mul", ["g_wide", "g_scale"], ["out"], name="emb_dequant"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", "s", 8])],
        [
            numpy_helper.from_array(table, "emb_int8"),
            numpy_helper.from_array(scales, "emb_row_scale"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_int8_embedding_rewrite_gives_the_same_values():
    import onnxruntime as ort

    from clipedge.engine.tensorrt_build import rewrite_int8_embeddings

    model = _int8_embedding_graph()
    ids = np.array([[0, 5, 49], [3, 3, 1]], dtype=np.int64)

    def run(m):
        session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"ids": ids})[0]

    before = run(model)
    assert rewrite_int8_embeddings(model) == 1
    assert [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Gather"]
    onnx.checker.check_model(model)
    np.testing.assert_array_equal(run(model), before)
    assert rewrite_int8_embeddings(model) == 0  # nothing left to rewrite


# ----- builds with TensorRT for RTX (no GPU needed) ----------------------------------------


@pytest.fixture(scope="module")
def calibrated_bundle(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle with fp16 and int8 graphs (as `clipedge calibrate` writes them)."""
    skimage_data = pytest.importorskip("skimage.data", reason="calibration photographs")
    from clipedge.cli import main

    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    args = ["calibrate", str(bundle), "--precisions", "fp16,int8"]
    args += ["--calibration-images", str(Path(skimage_data.data_dir) / "*.png")]
    args += ["--calibration-texts", str(FIXTURE.parent / "calibration" / "captions.jsonl")]
    assert main(args) == 0
    return bundle


@pytest.fixture(scope="module")
def engines_bundle(calibrated_bundle, tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """Every graph of the calibrated tiny bundle built with TensorRT for RTX on this CPU."""
    if not HAS_RTX:
        pytest.skip("needs tensorrt-rtx-cu13 (the [dev] install)")
    from clipedge.engine.tensorrt_build import BuildOptions, build_engines

    bundle = tmp_path_factory.mktemp("trt-engines") / "bundle"
    shutil.copytree(calibrated_bundle, bundle)
    lines: list[str] = []
    seconds = {}
    for precision in ("fp32", "fp16", "int8"):
        started = time.perf_counter()
        build_engines(bundle, None, BuildOptions(precision=precision, workspace_gb=1), lines.append)
        seconds[precision] = time.perf_counter() - started
    return bundle, seconds


@needs_rtx
def test_every_graph_of_the_tiny_bundle_builds(engines_bundle):
    bundle, seconds = engines_bundle
    manifest = read_manifest(bundle)
    expected_io = {
        "text": ({"input_ids": "int64", "attention_mask": "int64"}, {"text_embeds": "float32"}),
        "vision": ({"pixel_values": "float32"}, {"image_embeds": "float32"}),
    }
    for tower_name, tower in manifest.towers.items():
        entries = {e.precision: e for e in engine_entries(tower)}
        assert set(entries) == {"fp32", "fp16", "int8"}
        for precision, entry in entries.items():
            path = bundle / entry.file
            assert path.is_file() and path.stat().st_size == entry.bytes > 100_000
            assert manifest.files[entry.file]["bytes"] == entry.bytes
            assert entry.graph == tower.graphs[precision].file
            assert entry.graph_sha256 == manifest.files[entry.graph]["sha256"]
            assert entry.flavour == "tensorrt_rtx" and entry.tensorrt_version.startswith("1.")
            assert entry.platform["machine"] and entry.gpu_name is None
            inputs, outputs = expected_io[tower_name]
            assert {t["name"]: t["dtype"] for t in entry.inputs} == inputs
            assert {t["name"]: t["dtype"] for t in entry.outputs} == outputs
            assert all(d == -1 for t in entry.inputs for d in t["shape"][:1])
            if tower_name == "text":
                assert [(p.max_batch, p.max_length) for p in entry.profiles] == [
                    (32, 128),
                    (32, 512),
                ]
            else:
                assert [p.shapes["pixel_values"][2] for p in entry.profiles] == [[32, 3, 64, 64]]
    # the TensorRT-only copy of the int8 text graph is gone; the shipped graph is untouched
    assert not list(bundle.glob(".*trt-*")) and not list(bundle.glob("*.trt.onnx"))
    shipped = onnx.load(str(bundle / "text.int8.onnx"))
    assert "Cast" in {n.op_type for n in shipped.graph.node}
    assert sum(seconds.values()) < 120, seconds


@needs_rtx
def test_the_int8_text_graph_needs_the_rewrite(calibrated_bundle):
    """Without the rewrite TensorRT refuses the graph, as the issue reports."""
    from clipedge.engine.tensorrt_build import import_builder

    trt, _ = import_builder("tensorrt_rtx")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(calibrated_bundle / "text.int8.onnx"))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name in ("input_ids", "attention_mask"):
        profile.set_shape(name, (1, 1), (1, 16), (2, 16))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None


@needs_rtx
def test_build_engine_cli_replaces_its_entry_and_prints_commands(engines_bundle, tmp_path, capsys):
    from clipedge.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(engines_bundle[0], bundle)
    cache = tmp_path / "timing.cache"
    args = ["build-engine", str(bundle), "--tower", "text", "--precision", "int8"]
    args += ["--profiles", "4x64,2x256", "--timing-cache", str(cache), "--workspace-gb", "1"]
    args += ["--keep-graph"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=" in out and "--stronglyTyped" in out and "polygraphy convert" in out
    assert "text.int8.trt.onnx" in out and (bundle / "text.int8.trt.onnx").is_file()
    assert "has no timing cache" in out and not cache.exists()  # a no-op in TensorRT for RTX
    entries = [e for e in engine_entries(read_manifest(bundle).towers["text"])]
    int8 = [e for e in entries if e.precision == "int8"]
    assert len(int8) == 1  # same target: replaced, not added
    assert [(p.max_batch, p.max_length) for p in int8[0].profiles] == [(4, 64), (2, 256)]
    assert main(["build-engine", str(tmp_path / "nope")]) == 1


# ----- the runtime with engines that do not run here ---------------------------------------


@needs_rtx
def test_no_gpu_refuses_with_reasons_and_auto_stays_on_onnxruntime(engines_bundle):
    bundle, _ = engines_bundle
    manifest = read_manifest(bundle)
    machine = tensorrt_backend.this_machine()
    if machine.compute_capability is not None:
        pytest.skip("this machine has a GPU")
    choice = choose_engine(manifest.towers["text"], "fp16", machine, manifest.files)
    assert choice.entry is None and "no usable NVIDIA GPU here" in choice.explain("text", "fp16")
    with pytest.raises(BundleError, match="no usable NVIDIA GPU here"):
        tensorrt_backend.open_session(
            bundle / "text.fp16.onnx", manifest.towers["text"], None, True
        )
    model = clipedge.load(bundle, precision="fp32")
    assert model.plan.backend in ("cpu", "openvino")


@needs_rtx
def test_plan_prefers_native_engines_that_run_here(engines_bundle, monkeypatch):
    """With a (pretended) RTX 4090 the plan runs the native engines, best precision first;
    nothing is executed."""
    bundle, _ = engines_bundle
    manifest = read_manifest(bundle)
    version = engine_entries(manifest.towers["text"])[0].tensorrt_version
    ada = Machine({"tensorrt_rtx": version}, "NVIDIA GeForce RTX 4090", "8.9")
    monkeypatch.setattr(tensorrt_backend, "this_machine", lambda device=0: ada)
    assert tensorrt_backend.bundle_engines_run_here(manifest)
    plan = plan_module.plan_execution(manifest, bundle, "auto")
    assert plan.backend == "tensorrt-native" and plan.precisions == {
        "text": "int8",
        "vision": "int8",
    }
    assert plan_module.plan_execution(manifest, bundle, "tensorrt").backend == "tensorrt-native"
    # options for onnxruntime's TensorRT provider ask for the provider, not the engines
    ep_options = TensorrtEpOptions()
    assert plan_module.choose_backend("tensorrt", manifest, ep_options) != "tensorrt-native"
    assert plan_module.choose_backend("auto", manifest, ep_options) != "tensorrt-native"
    assert plan_module.choose_backend("tensorrt", manifest, TensorrtOptions()) == "tensorrt-native"
    # an engine built from another graph is not used
    data = json.loads((bundle / "clipedge.json").read_text())
    for entry in data["towers"]["vision"][MANIFEST_KEY]:
        entry["graph_sha256"] = "0" * 64
    (bundle / "clipedge.json").write_text(json.dumps(data))
    changed = read_manifest(bundle)
    assert not tensorrt_backend.bundle_engines_run_here(changed)
    try:
        assert plan_module.choose_backend("auto", changed) != "tensorrt-native"
    finally:
        (bundle / "clipedge.json").write_text(json.dumps(manifest.to_dict(), indent=2))


# ----- the API surface of the real TensorRT and CUDA classes -------------------------------


@pytest.mark.parametrize("module_name", ["tensorrt_lean", "tensorrt_rtx", "tensorrt"])
def test_backend_api_exists_on_real_tensorrt_classes(module_name):
    """Every TensorRT attribute the backend calls, on the real classes (inspected only: a
    Runtime is never constructed without a GPU)."""
    module = pytest.importorskip(module_name, reason=f"{module_name} is not installed")
    missing = [a for a in tensorrt_backend.TRT_API["module"] if not hasattr(module, a)]
    for cls, attributes in tensorrt_backend.TRT_API.items():
        if cls != "module":
            missing += [f"{cls}.{a}" for a in attributes if not hasattr(getattr(module, cls), a)]
    assert missing == []
    assert hasattr(module.TensorIOMode, "INPUT") and hasattr(module.Logger, "WARNING")


def test_builder_api_exists_on_tensorrt_rtx():
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    for name in ("STRONGLY_TYPED",):
        assert hasattr(trt.NetworkDefinitionCreationFlag, name)
    for attribute in ("create_timing_cache", "set_timing_cache", "set_memory_pool_limit"):
        assert hasattr(trt.IBuilderConfig, attribute)
    assert hasattr(trt.IBuilderConfig, "builder_optimization_level")
    assert hasattr(trt.BuilderFlag, "VERSION_COMPATIBLE")
    assert hasattr(trt.OnnxParser, "parse_from_file")


def test_cuda_api_exists_and_no_gpu_is_a_clean_answer():
    pytest.importorskip("cuda.bindings", reason="cuda-bindings is not installed")
    runtime = tensorrt_backend.cudart()
    assert [a for a in tensorrt_backend.CUDA_API if not hasattr(runtime, a)] == []
    name, capability = tensorrt_backend.query_gpu()
    assert (name is None) == (capability is None)


def test_options_and_registry():
    from clipedge.engine.registry import backend

    native = backend("tensorrt-native")
    assert native.options_type is tensorrt_backend.TensorrtOptions
    assert native.fallback == "tensorrt" and native.device == "gpu"
    with pytest.raises(ValueError):
        tensorrt_backend.TensorrtOptions(max_contexts=0)


def test_verify_runs_what_this_machine_has(calibrated_bundle, capsys):
    """On a CPU-only machine: the GPU graphs on the CPU provider against fp32, with batch
    invariance (alone vs in a batch, identical items in a batch)."""
    from clipedge.cli import main
    from clipedge.verify import candidates, verify_bundle

    manifest = read_manifest(calibrated_bundle)
    found = candidates(manifest)
    assert {(c.tower, c.precision) for c in found if c.backend == "cpu"} >= {
        ("text", "int8"),
        ("vision", "fp16"),
    }
    results = verify_bundle(calibrated_bundle, batch_size=4, only=lambda c: c.backend == "cpu")
    assert results and all(r.passed for r in results), [r.notes for r in results]
    for r in results:
        assert r.alone_vs_batch > 0.999 and r.identical_in_batch > 0.999
    out = capsys.readouterr().out
    assert "alone/batch" in out and "text   cpu" in out
    assert main(["verify", str(calibrated_bundle.parent / "missing")]) == 1


# ----- EPContext (onnxruntime's TensorRT provider, ahead of time) ---------------------------


def test_ep_context_options_put_every_dynamic_input_in_every_profile(tiny_bundle, tmp_path):
    from clipedge.engine.tensorrt_build import ep_context_provider_options

    profiles = _profiles(tiny_bundle)
    options = ep_context_provider_options(profiles, tmp_path / "ctx.onnx", tmp_path)
    assert options["trt_dump_ep_context_model"] == "True"
    assert options["trt_ep_context_file_path"] == str(tmp_path / "ctx.onnx")
    for key in ("min", "opt", "max"):
        entries = options[f"trt_profile_{key}_shapes"].split(",")
        assert len(entries) == 2 * len(profiles)  # input_ids and attention_mask, per profile
        assert entries[0].startswith("input_ids:") and entries[1].startswith("attention_mask:")
    assert options["trt_profile_max_shapes"].split(",")[-1] == "attention_mask:8x2048"


@pytest.mark.skipif(
    not HAS_CUDA_EP, reason="EPContext needs onnxruntime-gpu with TensorRT and a GPU"
)
def test_ep_context_graph_is_written(tiny_bundle, tmp_path):
    from clipedge.engine.tensorrt_build import build_ep_context

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    context = build_ep_context(bundle, "vision", "fp32", "8", report=lambda line: None)
    assert context.is_file()
    graph = onnx.load(str(context))
    assert {n.op_type for n in graph.graph.node} == {"EPContext"}


def test_ep_context_without_the_provider_is_a_clear_error(tiny_bundle, tmp_path, capsys):
    if HAS_CUDA_EP:
        pytest.skip("this onnxruntime has the TensorRT provider")
    from clipedge.cli import main

    assert main(["build-engine", str(tiny_bundle), "--ep-context", "--precision", "fp32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clipedge build-engine: error: ")
    assert "TensorRT provider is not in this onnxruntime" in err


def test_tensorrt_and_cuda_are_not_imported_by_default(tiny_bundle):
    """`import clipedge` and loading a bundle without engines touch neither TensorRT nor CUDA."""
    import subprocess
    import sys

    code = (
        "import sys, clipedge\n"
        f"clipedge.load({str(tiny_bundle)!r}).encode_text('a')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorrt', 'tensorrt_rtx', 'tensorrt_lean', 'cuda')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
