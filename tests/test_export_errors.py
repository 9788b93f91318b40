"""Checkpoint loading and the export's refusals: strictness, clear errors, config defaults,
bf16, hub fallback, opset range, the output folder (no partial bundle), the manifest's source."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="export tests need the [export] extra")

from safetensors.torch import load_file, save_file  # noqa: E402

from clipedge.cli import main  # noqa: E402
from clipedge.export import pipeline  # noqa: E402
from clipedge.export.config import (  # noqa: E402
    TEXT_BACKBONE_DEFAULTS,
    UnsupportedCheckpointError,
    parse_config,
)
from clipedge.export.opset import MAX_OPSET  # noqa: E402
from clipedge.export.pipeline import export_bundle  # noqa: E402
from clipedge.export.source import CheckpointSourceError, resolve_source  # noqa: E402
from clipedge.export.weights import CheckpointError, load_towers  # noqa: E402

from conftest import CHECKPOINT, EXPECTED  # noqa: E402

QKV = "text_model.transformer.roberta.encoder.layers.0.mixer.Wqkv.parametrizations.weight.original"


def copy_checkpoint(tmp_path: Path, edit_tensors=None, edit_config=None) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, target)
    for path in target.iterdir():
        path.chmod(0o644)
    if edit_tensors:
        tensors = load_file(target / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, target / "model.safetensors")
    if edit_config:
        config = json.loads((target / "config.json").read_text())
        edit_config(config)
        (target / "config.json").write_text(json.dumps(config))
    return target


def load(directory: Path, towers=("text", "vision")):
    src = resolve_source(str(directory))
    return load_towers(src.config, src.open_tensors(), towers)


def test_missing_tensor_is_named(tmp_path):
    directory = copy_checkpoint(tmp_path, lambda t: t.pop(QKV))
    with pytest.raises(CheckpointError, match="missing tensor.*layers.0.mixer.Wqkv"):
        load(directory)


def test_wrong_shape_is_named(tmp_path):
    def shrink(tensors):
        tensors["vision_model.blocks.1.attn.proj.weight"] = torch.zeros(64, 32)

    directory = copy_checkpoint(tmp_path, shrink)
    with pytest.raises(CheckpointError, match=r"blocks.1.attn.proj.weight.*\(64, 32\)"):
        load(directory)


def test_unexpected_tensor_is_named(tmp_path):
    def add(tensors):
        tensors["vision_model.blocks.0.attn.k_bias"] = torch.zeros(64)

    directory = copy_checkpoint(tmp_path, add)
    with pytest.raises(CheckpointError, match="unexpected tensors.*k_bias"):
        load(directory)
    # The text tower alone does not own vision tensors, so it still loads.
    assert "text" in load(directory, towers=("text",))


def test_jina_clip_v1_config_is_rejected(tmp_path):
    def v1(config):
        config["text_config"] = {
            "hf_model_name_or_path": "jinaai/jina-bert-flash-implementation",
            "pooler_type": "mean_pooler",
            "embed_dim": 768,
        }

    directory = copy_checkpoint(tmp_path, edit_config=v1)
    with pytest.raises(UnsupportedCheckpointError, match="jina-clip-v1"):
        resolve_source(str(directory))


def test_text_backbone_defaults_match_jina_embeddings_v3():
    base = json.loads((CHECKPOINT / "text_backbone_base_config.json").read_text())
    for key, value in TEXT_BACKBONE_DEFAULTS.items():
        assert base[key] == value, key
    cfg = parse_config(json.loads((CHECKPOINT / "config.json").read_text())).text
    assert cfg.rotary_base == 20000.0 and cfg.layer_norm_eps == 1e-5
    assert cfg.lora_scaling == 1.0  # alpha 4 from the clip config over rank 4
    assert cfg.hidden_size == 64  # the tiny override wins over the v3 default


def test_bf16_checkpoint_loads_as_float32(tmp_path):
    def to_bf16(tensors):
        for name, tensor in tensors.items():
            tensors[name] = tensor.to(torch.bfloat16)

    towers = load(copy_checkpoint(tmp_path, to_bf16))
    for module in towers.values():
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    pixels = torch.from_numpy(__import__("numpy").load(EXPECTED / "image_pixel_values.npy"))
    with torch.no_grad():
        out = towers["vision"](pixels)
    reference = torch.from_numpy(__import__("numpy").load(EXPECTED / "image_norm.npy"))
    cosine = torch.nn.functional.cosine_similarity(out, reference)
    assert cosine.min() > 0.99  # bf16 rounding of random weights, not a different model


def test_hub_id_offline_says_to_pass_a_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointSourceError, match="pass its local directory"):
        resolve_source("jinaai/jina-clip-v2")


def test_incomplete_directory_lists_missing_files(tmp_path):
    directory = copy_checkpoint(tmp_path)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointSourceError, match="tokenizer.json"):
        resolve_source(str(directory))


def test_cli_export_reports_stages_and_verifies(tmp_path, capsys):
    assert main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b"), "--towers", "text"]) == 0
    out = capsys.readouterr().out
    for stage in ("[load]", "[export]", "[verify]", "[save]", "min cosine"):
        assert stage in out
    manifest = json.loads((tmp_path / "b" / "clipedge.json").read_text())
    assert list(manifest["towers"]) == ["text"]
    assert manifest["towers"]["text"]["settings"]["default_max_length"] == 512
    assert manifest["source"]["weights_sha256"]


def test_cli_failed_verification_exits_non_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("clipedge.export.verify.MIN_COSINE", 1.5)
    assert main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b"), "--towers", "text"]) == 1
    assert "verification FAILED" in capsys.readouterr().err


def test_cli_bad_checkpoint_exits_with_message(tmp_path, capsys):
    directory = copy_checkpoint(tmp_path, lambda t: t.pop(QKV))
    assert main(["export", str(directory), "-o", str(tmp_path / "b")]) == 1
    assert "Wqkv" in capsys.readouterr().err


def quiet(line: str) -> None:
    pass


def test_unsupported_opset_is_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "resolve_source", lambda *a: pytest.fail("loaded anyway"))
    for opset in (16, 17, 26, True, "18"):
        with pytest.raises(ValueError, match="opset must be an int from 18 to 25"):
            export_bundle(str(CHECKPOINT), tmp_path / "b", opset=opset, report=quiet)
    assert list(tmp_path.iterdir()) == []


def test_requested_opset_is_what_the_graphs_have(tmp_path):
    onnx = pytest.importorskip("onnx")
    result = export_bundle(str(CHECKPOINT), tmp_path / "b", opset=MAX_OPSET, report=quiet)
    assert result.ok and [g.tower for g in result.graphs] == ["text", "vision"]
    for graph in result.graphs:
        model = onnx.load(str(graph.path), load_external_data=False)
        assert [o.version for o in model.opset_import if o.domain == ""] == [MAX_OPSET]
    assert result.manifest.versions["opset"] == str(MAX_OPSET)


def test_a_graph_left_at_another_opset_fails_the_export(tmp_path, monkeypatch):
    # Below 18 the exporter keeps opset 18 when it cannot convert; that must not pass as 16.
    monkeypatch.setattr(pipeline, "check_opset", lambda opset: opset)
    with pytest.raises(RuntimeError, match=r"text.onnx has opset \[18\], not the requested 16"):
        export_bundle(str(CHECKPOINT), tmp_path / "b", towers=["text"], opset=16, report=quiet)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_folder_needs_overwrite_which_removes_stale_files(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "text.int8.onnx").write_bytes(b"stale graph of an older export")
    stale = {"format": "clipedge-bundle", "files": {"text.int8.onnx": {}}}
    (target / "clipedge.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export_bundle(str(CHECKPOINT), target, towers=["vision"], report=quiet)
    assert sorted(p.name for p in target.iterdir()) == ["clipedge.json", "text.int8.onnx"]
    export_bundle(str(CHECKPOINT), target, towers=["vision"], report=quiet, overwrite=True)
    manifest = json.loads((target / "clipedge.json").read_text())
    assert sorted(p.name for p in target.iterdir()) == sorted([*manifest["files"], "clipedge.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left


def test_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    assert main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_export_leaves_no_partial_bundle(tmp_path, monkeypatch, overwrite):
    def fail(*args, **kwargs):
        raise RuntimeError("verification crashed")

    target = tmp_path / "bundle"
    if overwrite:  # the old bundle stays as it was
        target.mkdir()
        (target / "clipedge.json").write_text('{"format": "clipedge-bundle"}')
    monkeypatch.setattr(pipeline, "verify_graph", fail)
    with pytest.raises(RuntimeError, match="verification crashed"):
        export_bundle(str(CHECKPOINT), target, towers=["text"], report=quiet, overwrite=overwrite)
    assert [p.name for p in tmp_path.iterdir()] == (["bundle"] if overwrite else [])
    if overwrite:
        assert [p.name for p in target.iterdir()] == ["clipedge.json"]


def test_manifest_names_the_source_by_name_and_hashes_only(tiny_bundle):
    text = (tiny_bundle / "clipedge.json").read_text()
    source = json.loads(text)["source"]
    assert source["kind"] == "local" and source["name"] == "checkpoint"
    assert len(source["config_sha256"]) == 64 and len(source["weights_sha256"]) == 64

    def strings(value) -> list[str]:
        if isinstance(value, dict):
            value = [*value, *value.values()]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    absolute = [s for s in strings(json.loads(text)) if Path(s).is_absolute()]
    assert absolute == []
    for path in (CHECKPOINT.parent, tiny_bundle, Path.home()):
        assert str(path) not in text
