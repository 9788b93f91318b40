"""`clipedge embed --ray` on a local Ray instance the test starts: the rows a single process
writes, shard for shard."""

from __future__ import annotations

import json

import pytest

pq = pytest.importorskip("pyarrow.parquet", reason="the batch tool needs the batch extra")
ray = pytest.importorskip("ray", reason="the Ray path needs the ray extra")

from clipedge.embed.job import EmbedJob, embed  # noqa: E402
from clipedge.embed.ray_data import embed_with_ray  # noqa: E402

from conftest import EXPECTED  # noqa: E402


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
