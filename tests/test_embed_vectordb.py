"""`clipedge embed` output loaded as it is into LanceDB (embedded) and Qdrant (local mode).

Random-weight fixtures carry no meaning, so the check is agreement: each image's own vector
finds that image first, and a text query's top-k equals a brute-force NumPy ranking."""

from __future__ import annotations

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
