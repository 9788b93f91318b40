"""The command line and the export's handling of its output folder (newcomer paths)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="exporting needs the [export] extra (torch)")

from clipedge import __version__  # noqa: E402
from clipedge.cli import main  # noqa: E402
from clipedge.export import cli as export_cli  # noqa: E402
from clipedge.export import pipeline  # noqa: E402
from clipedge.export.pipeline import export_bundle  # noqa: E402

from conftest import CHECKPOINT  # noqa: E402


def quiet(line: str) -> None:
    pass


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipedge {__version__}"


def test_non_empty_folder_needs_overwrite_which_removes_stale_files(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "text.int8.onnx").write_bytes(b"stale graph of an older export")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export_bundle(str(CHECKPOINT), target, towers=["vision"], report=quiet)
    assert (target / "text.int8.onnx").exists()
    export_bundle(str(CHECKPOINT), target, towers=["vision"], report=quiet, overwrite=True)
    manifest = json.loads((target / "clipedge.json").read_text())
    assert sorted(p.name for p in target.iterdir()) == sorted([*manifest["files"], "clipedge.json"])
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no staging folder left


def test_failed_export_leaves_no_partial_bundle(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("verification crashed")

    monkeypatch.setattr(pipeline, "verify_graph", fail)
    with pytest.raises(RuntimeError, match="verification crashed"):
        export_bundle(str(CHECKPOINT), tmp_path / "bundle", towers=["text"], report=quiet)
    assert list(tmp_path.iterdir()) == []


def test_manifest_names_the_source_without_machine_paths(tiny_bundle):
    text = (tiny_bundle / "clipedge.json").read_text()
    source = json.loads(text)["source"]
    assert source["kind"] == "local" and source["name"] == "checkpoint"
    assert len(source["weights_sha256"]) == 64
    assert str(CHECKPOINT.parent) not in text and str(Path.home()) not in text


def test_missing_extra_is_named_with_the_install_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "clipedge.export.pipeline", raising=False)
    monkeypatch.delitem(sys.modules, "clipedge.export.weights", raising=False)
    code = main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b")])
    assert code == 2
    assert "pip install 'clipedge[export]'" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["5", "17", "26", "99", "eighteen"])
def test_unsupported_opset_is_refused_while_parsing(monkeypatch, capsys, opset, tmp_path):
    pytest.importorskip("onnx", reason="the opset range is capped by the installed onnx")
    monkeypatch.setattr(export_cli, "export", lambda args: pytest.fail("ran anyway"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b"), "--opset", opset])
    assert exit_info.value.code == 2
    assert "--opset: opset must be an int from 18 to 25" in capsys.readouterr().err
