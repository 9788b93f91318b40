"""The command line: --version, the missing-extra hint, --opset checked while parsing."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("torch", reason="exporting needs the [export] extra (torch)")

from clipedge import __version__  # noqa: E402
from clipedge.cli import main  # noqa: E402
from clipedge.export import cli as export_cli  # noqa: E402

from conftest import CHECKPOINT  # noqa: E402


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipedge {__version__}"


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
