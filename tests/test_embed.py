"""`clipedge embed`: one row per input, resumable after SIGKILL, vectors equal `encode_*`."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="the batch tool needs the batch extra")
psutil = pytest.importorskip("psutil", reason="process checks (dev extra)")
import pyarrow as pa  # noqa: E402

import clipedge  # noqa: E402
from clipedge.embed.job import EmbedError, EmbedJob, embed  # noqa: E402
from clipedge.errors import SourceError  # noqa: E402
from clipedge.options import Options  # noqa: E402

from conftest import EXPECTED, assert_all_gone  # noqa: E402

INPUTS = EXPECTED / "inputs"
JPEG = (INPUTS / "img3_large_1024x768.jpg").read_bytes()


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return clipedge.load(tiny_bundle, backend="cpu")


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for path in sorted(INPUTS.iterdir()):
        shutil.copy(path, folder / path.name)
    (folder / "sub" / "cut.jpg").write_bytes(JPEG[:2000])
    (folder / "sub" / "notes.png").write_text("not an image")
    return folder


def rows(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir).to_pylist()


@pytest.fixture(autouse=True)
def no_process_outlives_a_test():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    after = psutil.Process().children(recursive=True)
    assert_all_gone([p for p in after if p.pid not in before], within=5.0)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_image_gets_one_row_and_good_ones_equal_encode_image(
    tiny_bundle, image_folder, tmp_path, model, workers
):
    out = tmp_path / f"out{workers}"
    summary = embed(
        EmbedJob(tiny_bundle, str(image_folder), "images", out, shard_size=3, workers=workers),
        progress=False,
    )
    table = rows(out)
    paths = sorted(p for p in image_folder.rglob("*") if p.is_file())
    assert [r["id"] for r in table] == [str(p) for p in paths]
    assert (summary.done, summary.failed) == (5, 2)
    for row, path in zip(table, paths, strict=True):
        if path.parent.name == "sub":
            assert row["status"] == "error" and row["embedding"] is None and row["error"]
        else:
            assert row["status"] == "ok" and row["error"] is None
            np.testing.assert_allclose(row["embedding"], model.encode_image(path), atol=1e-5)
    assert sorted(p.name for p in out.iterdir()) == [
        "_clipedge-embed.json",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    manifest = json.loads((out / "_clipedge-embed.json").read_text())
    assert manifest["complete"] and manifest["counts"]["failed"] == 2
    assert pq.read_schema(out / "part-00000.parquet").field("embedding").type.list_size == 64


def test_texts_with_ids_task_dimensions_and_kept_columns(tiny_bundle, tmp_path, model):
    source = tmp_path / "docs.jsonl"
    texts = [f"caption {i} " * (1 + i % 5) for i in range(11)]
    lines = [json.dumps({"key": f"k{i}", "body": t, "lang": "en"}) for i, t in enumerate(texts)]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    job = EmbedJob(
        tiny_bundle,
        str(source),
        "texts",
        out,
        dimensions=32,
        task="retrieval.query",
        shard_size=4,
        column="body",
        id_column="key",
        keep=("lang",),
        dtype="float16",
    )
    embed(job, progress=False)
    table = rows(out)
    assert [r["id"] for r in table] == [f"k{i}" for i in range(11)]
    assert {r["lang"] for r in table} == {"en"}
    want = model.encode_text(texts, task="retrieval.query", truncate_dim=32)
    np.testing.assert_allclose([r["embedding"] for r in table], want, atol=2e-3)  # float16
    embedding = pq.read_schema(out / "part-00000.parquet").field("embedding").type
    assert embedding == pa.list_(pa.float16(), 32)  # float16 stored, not float32 values


def test_openvino_jobs_run_in_throughput_mode_with_the_same_vectors(tiny_bundle, tmp_path):
    """Under OpenVINO a batch job takes the streams; rows equal the latency-mode model's."""
    pytest.importorskip("openvino", reason="OpenVINO is an optional extra")
    from clipedge.embed.job import Embedder

    source = tmp_path / "texts.txt"
    texts = [f"a caption about item {i} " * (1 + i % 4) for i in range(9)]
    source.write_text("\n".join(texts) + "\n")
    job = EmbedJob(tiny_bundle, str(source), "texts", tmp_path / "out", backend="openvino")
    embedder = Embedder(job)
    assert embedder.model.backend_options.mode == "throughput"
    cpu = Embedder(EmbedJob(tiny_bundle, str(source), "texts", tmp_path / "o2", backend="cpu"))
    assert cpu.model.plan.backend == "cpu"  # onnxruntime has no such mode: options untouched
    embed(job, progress=False)
    latency = clipedge.load(tiny_bundle, backend="openvino")
    assert latency.backend_options.mode == "latency"
    want = latency.encode_text(texts)
    got = np.array([r["embedding"] for r in rows(tmp_path / "out")])
    assert (got * want).sum(1).min() >= 0.999  # bf16 either way; streams change no value


def test_parquet_and_csv_tables(tiny_bundle, tmp_path, model):
    import pyarrow as pa
    import pyarrow.csv

    texts = ["a cat", "a dog", "a bridge"]
    table = pa.table({"id": ["x", "y", "z"], "text": texts})
    pq.write_table(table, tmp_path / "t.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "t.csv")
    for name in ("t.parquet", "t.csv"):
        out = tmp_path / f"out-{name}"
        embed(EmbedJob(tiny_bundle, str(tmp_path / name), "texts", out, id_column="id"), False)
        got = rows(out)
        assert [r["id"] for r in got] == ["x", "y", "z"]
        np.testing.assert_allclose(
            [r["embedding"] for r in got], model.encode_text(texts), atol=1e-5
        )


def test_fail_fast_names_the_input(tiny_bundle, image_folder, tmp_path):
    job = EmbedJob(tiny_bundle, str(image_folder), "images", tmp_path / "o", fail_fast=True)
    with pytest.raises(EmbedError, match=r"input .*cut\.jpg: .*--fail-fast"):
        embed(job, progress=False)


def test_a_bad_precision_is_one_line_not_a_traceback(tiny_bundle, tmp_path, capsys):
    from clipedge.cli import main

    source = tmp_path / "texts.txt"
    source.write_text("a caption\n")
    argv = ["embed", str(tiny_bundle), "--texts", str(source), "-o", str(tmp_path / "o")]
    assert main([*argv, "--precision", "int4"]) == 2  # a bad option: usage
    err = capsys.readouterr().err
    assert err.startswith("clipedge embed: error: precision must be one of fp32, fp16, int8")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.parquet"))


def test_dimensions_are_named_as_the_command_names_them(tiny_bundle, tmp_path, capsys):
    """Errors and warnings about --dimensions say `dimensions` (not the library's
    `truncate_dim`), and a warning is one `clipedge: warning:` line, not a path in the venv."""
    from clipedge.cli import main

    source = tmp_path / "texts.txt"
    source.write_text("a caption\n")
    argv = ["embed", str(tiny_bundle), "--texts", str(source)]
    assert main([*argv, "-o", str(tmp_path / "a"), "--dimensions", "0"]) == 2
    assert (
        capsys.readouterr().err == "clipedge embed: error: dimensions must be in [1, 64], got 0\n"
    )
    assert main([*argv, "-o", str(tmp_path / "b"), "--dimensions", "7"]) == 0
    assert capsys.readouterr().err.startswith(
        "clipedge: warning: dimensions=7 is not one of the trained Matryoshka dimensions"
    )


class SlowImages(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        time.sleep(0.15)
        self.send_response(200)
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        self.wfile.write(JPEG)

    def log_message(self, *args) -> None:
        pass


def test_sigkill_then_resume_gives_exactly_one_row_per_input(tiny_bundle, tmp_path, model):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/img{i}.jpg" for i in range(24)]
        source = tmp_path / "urls.txt"
        source.write_text("\n".join(urls) + "\n")
        out = tmp_path / "out"
        args = [
            str(tiny_bundle),
            "--images",
            str(source),
            "-o",
            str(out),
            "--shard-size",
            "4",
            "--workers",
            "1",
            "--batch-size",
            "4",
            "--allow-urls",
            "--allow-private-urls",
        ]
        process = subprocess.Popen(
            [sys.executable, "-m", "clipedge.cli", "embed", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(list(out.glob("part-*.parquet"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers, "the run should have its worker process"
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert_all_gone(workers)
        finished = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
        assert 2 <= len(finished) < 6, "the run should have been killed midway"
        # A leftover under a name this run never writes: only the resume's cleanup removes it.
        (out / "part-00042.parquet.tmp").write_bytes(b"half a shard of an earlier run")
        job = EmbedJob(
            tiny_bundle,
            str(source),
            "images",
            out,
            shard_size=4,
            workers=1,
            batch_size=4,
            options=Options(allow_urls=True, allow_private_urls=True),
        )
        summary = embed(job, progress=False)
        assert summary.skipped == 4 * len(finished)
        assert {p: p.stat().st_mtime_ns for p in finished} == finished  # untouched
        assert not list(out.glob("*.tmp"))
        table = rows(out)
        assert [r["id"] for r in table] == urls
        manifest = json.loads((out / "_clipedge-embed.json").read_text())
        assert manifest["counts"]["rows"] == manifest["counts"]["done"] == 24  # the whole output
        assert manifest["last_run"]["skipped"] == 4 * len(finished)
        assert manifest["last_run"]["done"] == 24 - 4 * len(finished)
        assert {r["status"] for r in table} == {"ok"}
        want = model.encode_image(JPEG)
        np.testing.assert_allclose(
            np.array([r["embedding"] for r in table]), np.tile(want, (24, 1)), atol=1e-5
        )
        source.write_text("\n".join(urls[:-1]) + "\n")
        with pytest.raises(EmbedError, match="the source changed since the first run"):
            embed(job, progress=False)
    finally:
        server.shutdown()


# ----- sources: a record that cannot be read is an error row, never the end of the run -------


def test_unreadable_lines_are_error_rows_naming_the_line(tiny_bundle, tmp_path, model):
    txt = tmp_path / "texts.txt"
    txt.write_bytes(b"a cat\n\xff\xfe not utf-8\n\na dog\n")
    out = tmp_path / "txt"
    summary = embed(EmbedJob(tiny_bundle, str(txt), "texts", out, shard_size=2), progress=False)
    table = rows(out)
    assert [(r["id"], r["status"]) for r in table] == [("1", "ok"), ("2", "error"), ("4", "ok")]
    assert table[1]["error"].startswith(f"{txt}:line 2: not UTF-8")
    assert table[1]["embedding"] is None
    np.testing.assert_allclose(table[2]["embedding"], model.encode_text("a dog"), atol=1e-5)
    assert (summary.done, summary.failed) == (2, 1)

    lines = [
        {"key": "a", "text": "a cat"},
        "{not json",
        ["a", "list"],
        {"key": "d", "body": "no text field"},
        {"key": "e", "text": ""},
        {"text": "no key"},
        {"key": "g", "text": "a bridge"},
    ]
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "jsonl"
    embed(EmbedJob(tiny_bundle, str(jsonl), "texts", out, id_column="key"), progress=False)
    table = rows(out)
    assert [r["status"] for r in table] == ["ok"] + ["error"] * 5 + ["ok"]
    assert [r["id"] for r in table] == ["a", "2", "3", "4", "e", "6", "g"]
    reasons = [r["error"].removeprefix(f"{jsonl}:") for r in table[1:6]]
    assert reasons[0].startswith("line 2: not JSON")
    assert reasons[1:] == [
        "line 3: not a JSON object (list)",
        "line 4: no 'text' field",
        "line 5: empty text",  # the server refuses it too; never an `ok` vector of nothing
        "line 6: no 'key' field",  # --id-column is never silently replaced by the line number
    ]
    with pytest.raises(SourceError, match=r"texts\.jsonl:line 2: not JSON"):
        embed(EmbedJob(tiny_bundle, str(jsonl), "texts", tmp_path / "ff", fail_fast=True), False)


def test_a_csv_row_that_cannot_be_parsed_is_an_error_row_in_its_place(tiny_bundle, tmp_path):
    source = tmp_path / "t.csv"
    source.write_text('id,text\nx,a cat\ny,"a dog",extra\nz,a bridge\nw,\n')
    out = tmp_path / "out"
    embed(EmbedJob(tiny_bundle, str(source), "texts", out, id_column="id"), progress=False)
    table = rows(out)
    assert [(r["id"], r["status"]) for r in table] == [
        ("x", "ok"),
        ("z", "ok"),
        ("w", "error"),
        ("3", "error"),  # after its read block: pyarrow's streaming reader gives no line
    ]
    assert table[2]["error"] == f"{source}:row 2: empty text"
    bad_line = 'y,"a dog",extra'
    assert table[3]["error"] == f"{source}:row 3: cannot parse the row {bad_line!r}"


def test_a_text_only_bundle_with_images_is_one_error_line(tiny_bundle, tmp_path, capsys):
    from clipedge.cli import main

    bundle = tmp_path / "text-only"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "clipedge.json").read_text())
    manifest["towers"] = {k: v for k, v in manifest["towers"].items() if k == "text"}
    manifest["files"] = {k: v for k, v in manifest["files"].items() if k != "vision.onnx"}
    (bundle / "clipedge.json").write_text(json.dumps(manifest))
    (bundle / "vision.onnx").unlink()
    argv = ["embed", str(bundle), "--images", str(INPUTS), "-o", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clipedge embed: error: bundle ")
    assert "has no vision tower" in err


# ----- resumes: the same source however it is named; --hash content -------------------------


def test_a_relative_source_resumes_its_absolute_form(tiny_bundle, image_folder, tmp_path):
    out = tmp_path / "out"
    job = EmbedJob(tiny_bundle, "photos", "images", out, shard_size=3, workers=0)
    cwd = Path.cwd()
    try:
        import os

        os.chdir(image_folder.parent)
        first = embed(job, progress=False)
    finally:
        os.chdir(cwd)
    again = embed(EmbedJob(tiny_bundle, str(image_folder), "images", out, shard_size=3), False)
    assert again.skipped == first.done + first.failed == 7
    manifest = json.loads((out / "_clipedge-embed.json").read_text())
    assert manifest["source"] == str(image_folder)
    assert [r["id"] for r in rows(out)][0].startswith(str(image_folder))  # absolute ids


def test_hash_content_resumes_over_touched_files(tiny_bundle, image_folder, tmp_path):
    import os

    out = {mode: tmp_path / mode for mode in ("stat", "content")}
    for mode, folder in out.items():
        job = EmbedJob(tiny_bundle, str(image_folder), "images", folder, workers=0, hash=mode)
        embed(job, progress=False)
    for path in image_folder.rglob("*.*"):
        os.utime(path, ns=(1, 1))  # touched, not changed
    with pytest.raises(EmbedError, match="the source changed since the first run"):
        embed(EmbedJob(tiny_bundle, str(image_folder), "images", out["stat"], workers=0), False)
    job = EmbedJob(tiny_bundle, str(image_folder), "images", out["content"], hash="content")
    assert embed(job, progress=False).skipped == 7
    (image_folder / "sub" / "notes.png").write_text("changed")
    with pytest.raises(EmbedError, match="the source changed since the first run"):
        embed(job, progress=False)


# ----- worker processes end with their parent --------------------------------------------


def test_workers_die_with_a_sigkilled_parent(tiny_bundle, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowImages)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        source = tmp_path / "urls.txt"
        source.write_text("\n".join(f"{base}/img{i}.jpg" for i in range(400)) + "\n")
        command = [sys.executable, "-m", "clipedge.cli", "embed", str(tiny_bundle)]
        command += ["--images", str(source), "-o", str(tmp_path / "out"), "--workers", "2"]
        command += ["--allow-urls", "--allow-private-urls", "--batch-size", "2"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        parent = psutil.Process(process.pid)
        deadline = time.monotonic() + 60
        while len(parent.children()) < 2 and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before its workers started"
            time.sleep(0.05)
        time.sleep(0.5)  # the workers are fetching (inside their initializer's guards)
        workers = parent.children(recursive=True)
        assert len(workers) >= 2
        process.kill()
        process.wait()
        assert_all_gone(workers, within=2.0)
    finally:
        server.shutdown()


FORKSERVER_POOL = """
import multiprocessing, os, sys, time
from concurrent.futures import ProcessPoolExecutor
from clipedge.embed.job import _die_with_parent
context = multiprocessing.get_context(sys.argv[1])
with ProcessPoolExecutor(2, context, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
    pids = {future.result() for future in [pool.submit(os.getpid) for _ in range(8)]}
    print(" ".join(map(str, pids)), flush=True)
    time.sleep(60)
"""


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_the_worker_guard_holds_for_every_start_method(method):
    """Under forkserver (Python 3.14's default on Linux) a worker's parent is the fork server,
    so PR_SET_PDEATHSIG alone neither fires on the job's death nor passes the parent check."""
    process = subprocess.Popen(
        [sys.executable, "-c", FORKSERVER_POOL, method], stdout=subprocess.PIPE, text=True
    )
    try:
        workers = [psutil.Process(int(pid)) for pid in process.stdout.readline().split()]
        assert workers and all(w.pid != process.pid for w in workers)
    finally:
        process.kill()
        process.wait()
    assert_all_gone(workers, within=2.0)
