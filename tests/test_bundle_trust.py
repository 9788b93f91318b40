"""Bundles you can trust (issue 19): an export never deletes what is not a bundle, every
manifest path stays inside the bundle, files are verified by default (once per machine, then
a stamp), graphs and tokenizer agree with the manifest at load, load and export options are
checked before any work, and bundle files follow the umask."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

import clipedge
from clipedge import BackendError, BundleError, OnnxruntimeOptions, OpenVinoOptions, OptionError
from clipedge.bundle import files
from clipedge.bundle.manifest import MANIFEST_NAME, read_manifest
from clipedge.bundle.writing import staged_bundle
from clipedge.cli import main
from clipedge.engine import registry
from clipedge.options import Options

from conftest import CHECKPOINT


def copy_bundle(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    target = tmp_path / name
    shutil.copytree(bundle, target)
    return target


def edit_manifest(bundle: Path, change) -> None:
    path = bundle / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def settled(monkeypatch):
    """Files copied a moment ago are stamped too (see files.RACY_SECONDS)."""
    monkeypatch.setattr(files, "RACY_SECONDS", 0.0)


# ----- 1. --overwrite replaces only a bundle, staged beside it and swapped in --------------


def test_overwrite_never_deletes_a_folder_that_is_not_a_bundle(tmp_path, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "precious.txt").write_text("x")
    assert main(["export", str(CHECKPOINT), "-o", str(folder), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is not a clipedge bundle" in err and "precious.txt" in err
    assert (folder / "precious.txt").read_text() == "x"


def test_overwrite_refuses_a_bundle_holding_files_of_its_own(tiny_bundle, tmp_path, capsys):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    (bundle / "notes.txt").write_text("mine")
    assert main(["export", str(CHECKPOINT), "-o", str(bundle), "--overwrite"]) == 2
    assert "also holds notes.txt" in capsys.readouterr().err
    assert (bundle / "notes.txt").exists()


@pytest.mark.parametrize("output", [".", "..", "inner/.."])
def test_an_output_holding_the_current_directory_is_refused_up_front(
    tmp_path, monkeypatch, capsys, output
):
    work = tmp_path / "work" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work.parent if output == "inner/.." else work)
    assert main(["export", str(CHECKPOINT), "-o", output, "--overwrite"]) == 2
    assert "is or contains the current directory" in capsys.readouterr().err
    assert work.is_dir()


def test_a_bundle_is_swapped_in_whole_and_a_failure_keeps_the_old_one(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    before = sorted(p.name for p in bundle.iterdir())
    failing = pytest.raises(RuntimeError, match="export failed")
    with failing, staged_bundle(bundle, overwrite=True) as staging:
        assert staging.parent == tmp_path and staging != bundle
        (staging / "half.onnx").write_bytes(b"half")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in bundle.iterdir()) == before
    with staged_bundle(bundle, overwrite=True) as staging:
        (staging / MANIFEST_NAME).write_text('{"format": "clipedge-bundle", "files": {}}')
    assert [p.name for p in bundle.iterdir()] == [MANIFEST_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # nothing staged or aside left


# ----- 2. every manifest path is confined to the bundle ------------------------------------


def _set_graph(path):
    return lambda d: d["towers"]["text"]["graphs"]["fp32"].update(file=path)


def _add_engine(path):
    return lambda d: d["towers"]["vision"]["tensorrt_engines"].append({"file": path})


@pytest.mark.parametrize(
    ("change", "entry"),
    [
        (_set_graph("../text.onnx"), "towers.text.graphs.fp32.file"),
        (_set_graph("/etc/passwd"), "towers.text.graphs.fp32.file"),
        (_set_graph("./text.onnx"), "towers.text.graphs.fp32.file"),
        (
            lambda d: d["towers"]["text"]["settings"].update(tokenizer="a/../../tokenizer.json"),
            "towers.text.settings.tokenizer",
        ),
        (
            lambda d: d["towers"]["vision"]["settings"].update(preprocessor="C:\\config.json"),
            "towers.vision.settings.preprocessor",
        ),
        (lambda d: d["files"].update({"../../.bashrc": {"bytes": 1}}), "files['../../.bashrc']"),
        (_add_engine("/tmp/vision.plan"), "towers.vision.tensorrt_engines[0].file"),
    ],
)
def test_a_path_outside_the_bundle_is_refused_naming_the_entry(
    tiny_bundle, tmp_path, change, entry
):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match="manifest entry " + entry.replace("[", r"\[")):
        read_manifest(bundle)
    with pytest.raises(BundleError, match="every path in a bundle must be relative"):
        clipedge.load(bundle, backend="cpu", verify_checksums=False)


def test_a_symlink_leaving_the_bundle_is_refused(tiny_bundle, tmp_path):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "elsewhere.json"
    shutil.move(bundle / "tokenizer.json", outside)
    (bundle / "tokenizer.json").symlink_to(outside)
    with pytest.raises(BundleError, match=r"files\['tokenizer.json'\].*outside the bundle"):
        clipedge.load(bundle, backend="cpu")
    # A symlink inside the bundle, and a bundle reached through a symlink, are fine.
    (bundle / "tokenizer.json").unlink()
    shutil.move(outside, bundle / "real-tokenizer.json")
    (bundle / "tokenizer.json").symlink_to("real-tokenizer.json")
    (tmp_path / "link").symlink_to(bundle)
    assert read_manifest(tmp_path / "link").towers["text"].settings.tokenizer == "tokenizer.json"


# ----- 3. verified by default: hashed once per machine, then a stamp -----------------------


def _count_hashes(monkeypatch) -> list[str]:
    hashed: list[str] = []
    real = files.sha256_file

    def counting(path, *args, **kwargs):
        if Path(path).name != MANIFEST_NAME:
            hashed.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(files, "sha256_file", counting)
    return hashed


def _flip_a_byte_keeping_size_and_mtime(path: Path) -> None:
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns


def test_first_load_hashes_and_stamps_later_loads_hash_nothing(
    tiny_bundle, tmp_path, monkeypatch, settled
):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    hashed = _count_hashes(monkeypatch)
    clipedge.load(bundle, backend="cpu")
    assert sorted(hashed) == sorted(read_manifest(bundle).files)
    stamp = json.loads(files.stamp_path(bundle).read_text())
    assert stamp["bundle"] == str(bundle.resolve()) and len(stamp["manifest_sha256"]) == 64
    assert files.stamp_path(bundle).is_relative_to(os.environ["CLIPEDGE_CACHE_DIR"])
    hashed.clear()
    clipedge.load(bundle, backend="cpu")
    assert hashed == []  # cached start-up reads no file contents
    clipedge.load(bundle, backend="cpu", verify_checksums=True)
    assert len(hashed) == len(read_manifest(bundle).files)  # True: every load
    hashed.clear()
    clipedge.load(copy_bundle(bundle, tmp_path, "copy"), backend="cpu", verify_checksums=False)
    assert hashed == []  # False: never (sizes only)


def test_a_flipped_byte_with_its_mtime_restored_is_caught_on_the_next_load(
    tiny_bundle, tmp_path, settled
):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    clipedge.load(bundle, backend="cpu")  # verified and stamped
    _flip_a_byte_keeping_size_and_mtime(bundle / "text.onnx")  # its ctime moves
    with pytest.raises(BundleError, match="text.onnx does not match its sha256"):
        clipedge.load(bundle, backend="cpu")


def test_a_replaced_file_is_caught_and_verify_files_rehashes(
    tiny_bundle, tmp_path, capsys, settled
):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    clipedge.load(bundle, backend="cpu")
    graph = bundle / "vision.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01
    graph.unlink()
    graph.write_bytes(bytes(data))  # a new file (new inode, new mtime), same size
    assert main(["verify", str(bundle), "--files"]) == 1
    assert "vision.onnx does not match its sha256" in capsys.readouterr().err
    with pytest.raises(BundleError, match="vision.onnx does not match its sha256"):
        clipedge.load(bundle, backend="cpu")
    assert main(["verify", str(copy_bundle(tiny_bundle, tmp_path, "good")), "--files"]) == 0
    assert "8 files" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["yes", 1, 0.5])
def test_verify_checksums_is_none_true_or_false(value):
    with pytest.raises(OptionError, match="verify_checksums must be None"):
        Options(verify_checksums=value)


# ----- 4. the manifest against the graphs and the tokenizer, at load ----------------------


def _text_input(**changes):
    return lambda d: d["towers"]["text"]["inputs"][0].update(changes)


def _width(width):
    def change(d):
        d.update(embed_dim=width, matryoshka_dimensions=[width])
        for tower in d["towers"].values():
            tower["outputs"][0]["shape"][-1] = width

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_text_input(name="ids"), r"towers.text.inputs\[0\]: the manifest names input 'ids'"),
        (_text_input(shape=["batch"]), r"towers.text.inputs\[0\] \(input_ids\): .* rank 1"),
        (
            lambda d: d["towers"]["vision"]["outputs"][0].update(name="pooled"),
            r"towers.vision.outputs\[0\]: the manifest names output 'pooled'",
        ),
        (_width(32), "embed_dim: the manifest says 32, the text graph text.onnxruntime-cpu.onnx"),
        (
            lambda d: (
                d["towers"]["vision"]["inputs"][0].update(shape=["batch", 3, 32, 32])
                or d["towers"]["vision"]["settings"].update(image_size=32)
            ),
            r"towers.vision.inputs\[0\] \(pixel_values\): axis 2 is 32 in the manifest, 64",
        ),
        (
            lambda d: d["towers"]["text"]["settings"].update(pad_token_id=2),
            "pad_token_id 2 .* puts around every text",
        ),
        (
            lambda d: d["towers"]["text"]["settings"].update(pad_token_id=24),
            "pad_token_id 24 is .* not one of its special tokens",
        ),
    ],
)
def test_a_manifest_the_graphs_or_tokenizer_contradict_fails_at_load(
    tiny_bundle, tmp_path, change, message
):
    bundle = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(bundle, change)
    with pytest.raises(BundleError, match=message):
        clipedge.load(bundle, backend="cpu", verify_checksums=False)


def test_the_graph_check_reads_only_the_header(tiny_token_states_bundle):
    from clipedge.bundle.graph_io import read_graph_io

    found = read_graph_io(tiny_token_states_bundle / "vision.onnx")
    assert list(found.inputs) == ["pixel_values"]
    assert found.inputs["pixel_values"].shape == ["batch", 3, 64, 64]
    assert found.outputs["last_hidden_state"].shape == ["batch", 17, 64]
    assert found.outputs["last_hidden_state"].dtype == "float32"


# ----- 5. load options, and a backend that is not installed, fail at load -----------------


def test_a_backend_that_is_not_installed_fails_at_load_with_its_install_hint(
    tiny_bundle, monkeypatch
):
    missing = dataclasses.replace(registry.BACKENDS["openvino"], available=lambda: False)
    monkeypatch.setitem(registry.BACKENDS, "openvino", missing)
    with pytest.raises(BackendError, match=r"pip install 'clipedge\[openvino\]'"):
        clipedge.load(tiny_bundle, backend="openvino")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": 3}, "backend must be a name"),
        ({"backend": "rocm"}, "unknown backend 'rocm'; choose one of"),
        ({"precision": "fp64"}, "precision must be one of fp32, fp16, int8, int8-cpu, int8-ov"),
        (
            {"backend_options": OnnxruntimeOptions(threads="4")},
            "OnnxruntimeOptions.threads must be int or None, got str",
        ),
        ({"backend_options": OnnxruntimeOptions(threads=0)}, "threads must be >= 1"),
        (
            {"backend_options": OnnxruntimeOptions(provider_options=[])},
            "OnnxruntimeOptions.provider_options must be dict",
        ),
        ({"threads": 0}, "threads must be an int >= 1"),
    ],
)
def test_every_load_option_is_checked_naming_it(tiny_bundle, kwargs, message):
    with pytest.raises(OptionError, match=message):
        clipedge.load(tiny_bundle, **{"backend": "cpu", **kwargs})


def test_options_of_another_backend_are_an_option_error_and_a_type_error(tiny_bundle):
    with pytest.raises(OptionError, match="takes OnnxruntimeOptions") as error:
        clipedge.load(tiny_bundle, backend="cpu", backend_options=OpenVinoOptions())
    assert isinstance(error.value, TypeError)


# ----- 6. export checks its options before the checkpoint ---------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--precisions", "int4"], "unknown precision"),
        (["--precisions", "int8"], "needs --calibration-texts and --calibration-images"),
        (["--precisions", "int8-cpu", "--target-cosine", "1.5"], "--target-cosine must be in"),
        (["--precisions", "fp16", "--calibration-samples", "1"], "--calibration-samples must"),
        (["--towers", "text,audio"], "--towers must be a non-empty subset of text, vision"),
    ],
)
def test_export_refuses_bad_options_before_reading_the_checkpoint(tmp_path, capsys, extra, message):
    pytest.importorskip("onnx", reason="clipedge export needs the [export] extra")
    missing_checkpoint = tmp_path / "no-such-checkpoint"  # reading it would fail otherwise
    argv = ["export", str(missing_checkpoint), "-o", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "no-such-checkpoint" not in err
    assert not (tmp_path / "out").exists()


def test_export_reads_the_calibration_sources_before_the_checkpoint(tmp_path, capsys):
    pytest.importorskip("onnx", reason="clipedge export needs the [export] extra")
    argv = ["export", str(tmp_path / "no-such-checkpoint"), "-o", str(tmp_path / "out")]
    argv += ["--towers", "text", "--precisions", "fp16"]
    argv += ["--calibration-texts", str(tmp_path / "missing.txt")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "missing.txt" in err and "no-such-checkpoint" not in err


# ----- 7. bundle files and folders follow the umask ---------------------------------------


def test_bundle_folders_and_files_follow_the_umask(tmp_path):
    pytest.importorskip("torch", reason="exports with the [export] extra")
    from clipedge.export.pipeline import export_bundle

    old = os.umask(0o022)
    try:
        export_bundle(str(CHECKPOINT), tmp_path / "b", towers=["vision"], report=lambda _: None)
    finally:
        os.umask(old)
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o755
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "b").iterdir()}
    assert set(modes.values()) == {0o644}, modes
