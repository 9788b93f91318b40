"""The runtime (runtime/, `clipedge`) stands on its own: it never imports the exporter or the
calibration code, and `clipedge build-engine` works on an install without torch."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clipedge.bundle.manifest import read_manifest
from clipedge.engine.tensorrt_engines import engine_entries

RUNTIME = Path(__file__).parent.parent / "runtime"
OTHER_FOLDERS = ("clipedge.export", "clipedge.calibration")
FORBIDDEN = (*OTHER_FOLDERS, "torch", "transformers")
# Only the command table names the export / calibrate commands' modules (imported when run).
ALLOWED_STRINGS = {("cli.py", "clipedge.export.cli"), ("cli.py", "clipedge.calibration.cli")}


def _module_name(path: Path) -> str:
    parts = ["clipedge", *path.relative_to(RUNTIME).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module an import statement of `path` names (relative ones resolved), and every
    string constant that names a clipedge module (importlib.import_module arguments)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(OTHER_FOLDERS)
            and (path.name, node.value) not in ALLOWED_STRINGS
        ):
            found.append((node.lineno, node.value))
    return found


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_runtime_never_imports_export_calibration_or_torch():
    offenders = [
        f"{path.relative_to(RUNTIME.parent)}:{line}: {name}"
        for path in sorted(RUNTIME.rglob("*.py"))
        for line, name in _imported_names(path)
        if _forbidden(name)
    ]
    assert offenders == []


def test_the_import_check_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    package = tmp_path / "runtime" / "engine"
    package.mkdir(parents=True)
    probe = package / "probe.py"
    probe.write_text(
        "from ..export import pipeline\nimport torch.nn\n"
        "from clipedge.calibration import cli\nfrom .tensorrt_engines import x\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "RUNTIME", tmp_path / "runtime")
    names = [name for _, name in _imported_names(probe) if _forbidden(name)]
    assert names == ["clipedge.export", "clipedge.export.pipeline", "torch.nn"] + [
        "clipedge.calibration",
        "clipedge.calibration.cli",
    ]


# ----- clipedge build-engine with torch, the exporter and the calibration code blocked -------

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("torch", "transformers", "clipedge.export", "clipedge.calibration")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is blocked: build-engine must not import it")
            return None

    sys.meta_path.insert(0, Block())
    """
)
RUN = textwrap.dedent(
    """
    import json, sys
    try:
        import torch  # noqa: F401
        blocked = False
    except ImportError:
        blocked = True
    from clipedge.cli import main

    status = main(["build-engine", *sys.argv[1:]])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    loaded += sorted(m for m in sys.modules if m.startswith(("clipedge.export", "clipedge.calib")))
    print(json.dumps({"status": status, "blocked": blocked, "loaded": loaded}))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt_rtx") is None,
    reason="needs tensorrt-rtx-cu13 (the tensorrt-test extra) to build engines without a GPU",
)
def test_build_engine_runs_without_torch(tiny_bundle, tmp_path):
    pytest.importorskip("onnx", reason="build-engine reads graphs with onnx (tensorrt extra)")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    args = [str(bundle), "--precision", "fp32", "--workspace-gb", "1"]
    result = subprocess.run(
        [sys.executable, "-c", RUN, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"status": 0, "blocked": True, "loaded": []}, result.stdout + result.stderr
    manifest = read_manifest(bundle)
    for tower_name, tower in manifest.towers.items():
        entries = engine_entries(tower)
        assert [e.precision for e in entries] == ["fp32"], tower_name
        entry = entries[0]
        path = bundle / entry.file
        assert path.is_file() and path.stat().st_size == entry.bytes > 0
        assert manifest.files[entry.file]["bytes"] == entry.bytes
        assert entry.graph == tower.graphs["fp32"].file and entry.flavour == "tensorrt_rtx"
        assert entry.graph_sha256 == manifest.files[entry.graph]["sha256"]


def test_build_engine_without_onnx_names_the_tensorrt_extra(tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = None; from clipedge.cli import main; "
        f"sys.exit(main(['build-engine', {str(tmp_path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "pip install 'clipedge[tensorrt]'" in result.stderr
