"""`clipedge embed` output loaded as it is into LanceDB (embedded) and Qdrant (local mode).

Random-weight fixtures carry no meaning, so the check is agreement: each image's own vector
finds that image first, and a text query's top-k equals a brute-force NumPy ranking."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="the batch tool needs the batch extra")
lancedb = pytest.importorskip("lancedb", reason="the vector-database hand-off test (dev extra)")
qdrant = pytest.importorskip("qdrant_client", reason="the vector-database hand-off test")

from PIL import Image  # noqa: E402

import clipedge  # noqa: E402
from clipedge.embed.job import EmbedJob, embed  # noqa: E402

TOP_K = 5


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        pixels = rng.integers(0, 255, (48 + i, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def table(tiny_bundle, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    embed(EmbedJob(tiny_bundle, str(photos), "images", out, shard_size=10), progress=False)
    return pq.read_table(out)


def brute_force(vectors: np.ndarray, query: np.ndarray) -> list[int]:
    return np.argsort(-(vectors @ query), kind="stable")[:TOP_K].tolist()


def test_lancedb_and_qdrant_agree_with_numpy(table, tiny_bundle, tmp_path):
    from qdrant_client.models import Distance, PointStruct, VectorParams

    ids = table["id"].to_pylist()
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    query = clipedge.load(tiny_bundle, backend="cpu").encode_text(
        "a photo of a cat", task="retrieval.query"
    )
    want = [ids[i] for i in brute_force(vectors, query)]

    lance = lancedb.connect(tmp_path / "lance").create_table("photos", table)  # no cast

    def lance_top(vector: np.ndarray) -> list[str]:
        hits = lance.search(vector).metric("cosine").limit(TOP_K).to_list()
        return [hit["id"] for hit in hits]

    client = qdrant.QdrantClient(":memory:")
    client.create_collection(
        "photos", VectorParams(size=vectors.shape[1], distance=Distance.COSINE)
    )
    client.upsert(
        "photos",
        [
            PointStruct(id=i, vector=v.tolist(), payload={"id": ids[i]})
            for i, v in enumerate(vectors)
        ],
    )

    def qdrant_top(vector: np.ndarray) -> list[str]:
        hits = client.query_points("photos", query=vector.tolist(), limit=TOP_K).points
        return [hit.payload["id"] for hit in hits]

    for i, vector in enumerate(vectors):
        assert lance_top(vector)[0] == ids[i] and qdrant_top(vector)[0] == ids[i]
    assert lance_top(query) == want
    assert qdrant_top(query) == want


# ----- --to and the documented snippets: outputs with a failed row ------------------------


@pytest.fixture()
def texts_with_a_bad_line(tmp_path):
    source = tmp_path / "texts.jsonl"
    lines = [json.dumps({"key": f"k{i}", "text": f"caption {i}", "lang": "en"}) for i in range(9)]
    lines[4] = json.dumps({"key": "k4", "text": ""})  # an error row: empty text
    source.write_text("\n".join(lines) + "\n")
    return source


def test_to_lancedb_and_qdrant_upserts_ok_rows_once(tiny_bundle, texts_with_a_bad_line, tmp_path):
    from clipedge.embed.stores import point_id

    lance_url = f"lancedb://{tmp_path / 'lance'}/captions"
    qdrant_url = f"qdrant://{tmp_path / 'qdrant'}/captions"
    for url in (lance_url, qdrant_url):
        out = tmp_path / url.partition("://")[0]
        job = EmbedJob(
            tiny_bundle,
            str(texts_with_a_bad_line),
            "texts",
            out,
            shard_size=4,
            id_column="key",
            keep=("lang",),
            to=url,
        )
        assert embed(job, progress=False).delivered == 8
        (out / "part-00001.parquet").unlink()  # a resume redoes a shard and delivers again
        assert embed(job, progress=False).delivered == 8
    want = {r["id"]: r["embedding"] for r in pq.read_table(tmp_path / "lancedb").to_pylist()}

    lance = lancedb.connect(tmp_path / "lance").open_table("captions").to_arrow()
    assert lance.num_rows == 8 and sorted(lance["id"].to_pylist()) == sorted(
        k for k in want if k != "k4"
    )
    assert set(lance["status"].to_pylist()) == {"ok"} and set(lance["lang"].to_pylist()) == {"en"}
    row = lance.to_pylist()[0]
    np.testing.assert_allclose(row["embedding"], want[row["id"]], atol=1e-6)

    client = qdrant.QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        assert client.count("captions").count == 8
        point = client.retrieve("captions", [point_id("k3")], with_vectors=True)[0]
        assert point.payload == {"id": "k3", "status": "ok", "lang": "en"}
        np.testing.assert_allclose(point.vector, want["k3"], atol=1e-5)
    finally:
        client.close()


def test_to_refuses_an_unknown_url(tiny_bundle, tmp_path):
    from clipedge.errors import OptionError

    with pytest.raises(OptionError, match="--to must be lancedb://PATH/TABLE"):
        EmbedJob(tiny_bundle, "x.txt", "texts", tmp_path, to="postgres://db/t")


def test_the_documented_snippets_load_an_output_with_a_failed_row(
    tiny_bundle, texts_with_a_bad_line, tmp_path, monkeypatch
):
    """Runs the ```python blocks of docs/embed.md (all but `notest` ones) as they are."""
    doc = (Path(__file__).parents[1] / "docs" / "embed.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(tmp_path)
    source = str(texts_with_a_bad_line)
    job = EmbedJob(tiny_bundle, source, "texts", Path("photo-vectors"), id_column="key")
    embed(job, progress=False)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/embed.md", "exec"), namespace)
    assert namespace["ok"].num_rows == 8 and namespace["vectors"].shape == (8, 64)
    assert namespace["hits"][0].payload["id"] == "k0"
