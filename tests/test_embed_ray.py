"""`clipedge embed --ray` on a local Ray instance the test starts: the rows a single process
writes, shard for shard."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="the batch tool needs the batch extra")
ray = pytest.importorskip("ray", reason="the Ray path needs the ray extra")
psutil = pytest.importorskip("psutil", reason="the ray extra installs it")

from clipedge.embed.job import EmbedJob, embed  # noqa: E402
from clipedge.embed.ray_data import embed_with_ray  # noqa: E402

from conftest import EXPECTED, assert_all_gone  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_rows_equal_single_process_rows(local_ray, tiny_bundle, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text(
        "\n".join(json.dumps({"text": f"caption {i} " * (1 + i % 4)}) for i in range(9))
    )
    images = EXPECTED / "inputs"
    for kind, source in (("texts", texts), ("images", images)):
        local, distributed = tmp_path / f"local-{kind}", tmp_path / f"ray-{kind}"
        job = EmbedJob(tiny_bundle, str(source), kind, local, shard_size=16, batch_size=4)
        embed(job, progress=False)
        summary = embed_with_ray(job.__class__(**{**job.__dict__, "out_dir": distributed}))
        assert summary.done == len(pq.read_table(local))
        a, b = pq.read_table(local).to_pylist(), pq.read_table(distributed).to_pylist()
        assert [r["id"] for r in a] == [r["id"] for r in b]
        assert [r["status"] for r in a] == [r["status"] for r in b]
        for x, y in zip(a, b, strict=True):
            assert (
                max(abs(p - q) for p, q in zip(x["embedding"], y["embedding"], strict=True)) < 1e-5
            )
        assert sorted(p.name for p in distributed.glob("part-*")) == sorted(
            p.name for p in local.glob("part-*")
        )


def test_ray_resumes_keeps_columns_and_writes_error_rows(local_ray, tiny_bundle, tmp_path):
    import pyarrow as pa

    from clipedge.embed.ray_data import EmbedBatch, records_table
    from clipedge.inputs.sources import text_records

    source = tmp_path / "texts.jsonl"
    lines = [json.dumps({"text": f"caption {i}", "lang": "en"}) for i in range(10)]
    lines[3] = "{broken"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    job = EmbedJob(tiny_bundle, str(source), "texts", out, shard_size=4, keep=("lang",))
    first = embed_with_ray(job)
    assert (first.done, first.failed) == (9, 1)
    (out / "part-00001.parquet").unlink()
    again = embed_with_ray(job)
    assert (again.skipped, again.done, again.failed) == (6, 4, 0)
    table = pq.read_table(out)
    assert table["id"].to_pylist() == [str(i) for i in range(1, 11)]
    assert table["status"].to_pylist()[3] == "error" and table["lang"].to_pylist()[0] == "en"
    assert (
        table["error"]
        .to_pylist()[3]
        .endswith(
            "line 4: not JSON (Expecting property name "
            "enclosed in double quotes: line 1 column 2 "
            "(char 1))"
        )
    )
    # the blocks Ray moves are plain Arrow (no pickled Python objects)
    block = records_table(0, list(text_records(source, keep=("lang",), on_error="record")), ())
    assert {str(t) for t in block.schema.types} <= {"int32", "string", "binary"}
    result = EmbedBatch(job)(block)
    assert result.schema.field("embedding").type == pa.list_(pa.float32(), 64)
    assert result["embedding"].null_count == 1 and result["error"].null_count == 9


def _ray_embed(bundle, source, out) -> subprocess.Popen:
    command = [sys.executable, "-m", "clipedge.cli", "embed", str(bundle), "--ray"]
    command += ["--texts", str(source), "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_sigkilled_ray_run_leaves_no_process(tiny_bundle, tmp_path):
    """Its own local Ray instance ends with it: Ray's agents outlived a SIGKILL before."""
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(400_000)))
    process = _ray_embed(tiny_bundle, source, tmp_path / "out")
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    while not any("MapWorker" in _command(p) for p in _alive(parent)):
        assert process.poll() is None and time.monotonic() < deadline, "no Ray actor started"
        time.sleep(0.2)
    time.sleep(1.0)  # the agents and the actor are up
    started = _alive(parent)
    assert len(started) >= 4, started
    process.kill()
    process.wait()
    assert_all_gone(started)


def test_a_finished_ray_run_leaves_no_process(tiny_bundle, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(50)))
    process = _ray_embed(tiny_bundle, source, tmp_path / "out")
    parent = psutil.Process(process.pid)
    seen: set[psutil.Process] = set()
    while process.poll() is None:
        seen |= set(_alive(parent))
        time.sleep(0.2)
    assert process.returncode == 0 and len(pq.read_table(tmp_path / "out")) == 50
    assert_all_gone(list(seen))


def _alive(parent: psutil.Process) -> list[psutil.Process]:
    try:
        return parent.children(recursive=True)
    except psutil.Error:
        return []


def _command(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # ended (or a zombie) meanwhile
        return ""


LIBRARY_CALLER = """
import subprocess, sys
from pathlib import Path
from clipedge.embed.job import EmbedJob
from clipedge.embed.ray_data import embed_with_ray
own = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
job = EmbedJob(Path(sys.argv[1]), sys.argv[2], "texts", Path(sys.argv[3]))
embed_with_ray(job, progress=False)
print("alive" if own.poll() is None else "killed", flush=True)
own.kill()
"""


def test_the_reaper_spares_a_library_callers_own_processes(tiny_bundle, tmp_path):
    source = tmp_path / "texts.txt"
    source.write_text("".join(f"text number {i}\n" for i in range(20)))
    done = subprocess.run(
        [sys.executable, "-c", LIBRARY_CALLER, str(tiny_bundle), str(source), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip().splitlines()[-1:] == ["alive"], done.stderr[-2000:]
