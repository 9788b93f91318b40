"""The runtime never needs PyTorch or transformers: proven where importing them fails."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from conftest import EXPECTED

NO_TORCH = "import sys; sys.modules['torch'] = None; from clipedge.cli import main;"
SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    import numpy as np

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Block())
    import clipedge

    bundle, expected_dir = sys.argv[1], sys.argv[2]
    manifest = json.load(open(f"{expected_dir}/manifest.json"))
    model = clipedge.load(bundle, backend="cpu")
    text = model.encode_text(manifest["texts"], task="retrieval.query")
    images = model.encode_image([f"{expected_dir}/{p}" for p in manifest["images"]])
    print(json.dumps({
        "text": float(np.abs(text - np.load(f"{expected_dir}/text_query_norm.npy")).max()),
        "image": float(np.abs(images - np.load(f"{expected_dir}/image_norm.npy")).max()),
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")),
    }))
    """
)


def test_runtime_runs_with_torch_and_transformers_blocked(tiny_bundle):
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_bundle), str(EXPECTED)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["text"] <= 2e-5 and report["image"] <= 2e-5


def test_cli_help_works_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; from clipedge.cli import main; main(['--help'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "export" in result.stdout


def test_export_without_torch_says_which_extra(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None; from clipedge.cli import main; "
        f"sys.exit(main(['export', 'x', '-o', {str(tmp_path)!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "clipedge[export]" in result.stderr
