"""The `clipedge` command table: --version, lazy command modules, the missing-extra hint."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from clipedge import __version__
from clipedge.cli import COMMANDS, EXTRAS, main
from clipedge.export import cli as export_cli

from conftest import CHECKPOINT

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipedge {__version__}"


def test_only_the_running_commands_module_is_imported(monkeypatch):
    for module in COMMANDS.values():
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(SystemExit):
        main(["-v", "verify", "--help"])
    assert [m for m in dict.fromkeys(COMMANDS.values()) if m in sys.modules] == [COMMANDS["verify"]]


@pytest.mark.parametrize(
    ("missing", "extra"),
    [("torch", "export"), ("cuda.bindings", "tensorrt"), ("pyarrow", "batch"), ("ray", "ray")],
)
def test_missing_extra_is_named_with_the_install_line(monkeypatch, capsys, missing, extra):
    def handler(args):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    monkeypatch.setattr(export_cli, "export", handler)
    assert main(["export", str(CHECKPOINT), "-o", "unused"]) == 2
    err = capsys.readouterr().err
    assert f"{missing} is not installed" in err and f"pip install 'clipedge[{extra}]'" in err


def test_a_missing_module_of_no_extra_is_not_hidden(monkeypatch):
    def handler(args):
        raise ModuleNotFoundError("No module named 'clipedge.typo'", name="clipedge.typo")

    monkeypatch.setattr(export_cli, "export", handler)
    with pytest.raises(ModuleNotFoundError, match="clipedge.typo"):
        main(["export", str(CHECKPOINT), "-o", "unused"])


def test_every_hinted_extra_has_that_dependency_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    for module, extra in EXTRAS.items():
        names = [re.split(r"[<>=~!;\[ ]", r, maxsplit=1)[0] for r in extras[extra]]
        assert any(n.replace("-", "_").startswith(module) for n in names), (module, extra)


@pytest.mark.parametrize("opset", ["5", "17", "26", "99", "eighteen"])
def test_unsupported_opset_is_refused_while_parsing(monkeypatch, capsys, opset, tmp_path):
    pytest.importorskip("onnx", reason="the opset range is capped by the installed onnx")
    monkeypatch.setattr(export_cli, "export", lambda args: pytest.fail("ran anyway"))
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(CHECKPOINT), "-o", str(tmp_path / "b"), "--opset", opset])
    assert exit_info.value.code == 2
    assert "--opset: opset must be an int from 18 to 25" in capsys.readouterr().err
