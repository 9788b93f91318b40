"""The calibration report's recall and the mixed-precision search, checked against known answers.

`tests/test_calibration.py` runs the pipeline end to end; these tests pin the two promises it
only touched: recall@k ranks the candidate's scores highest first with the fp32 top-1 as the
truth, and the block search returns the fewest float blocks that meet its target (so that the
held-out accuracy the report measures meets it too).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="calibration needs onnx (the export extra)")

from clipedge.calibration import search
from clipedge.calibration.report import recall_at_k

from conftest import FIXTURE

# -- recall@k on hand-built embeddings --------------------------------------------------------


def one_hot(n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)


def queries_ranking_truth_at(ranks: list[int], seed: int = 0) -> np.ndarray:
    """Query rows over one-hot items whose scores put item i (the truth) at rank ranks[i].

    Scores are distinct and positive, so each row's ranking is fully determined.
    """
    n = len(ranks)
    rng = np.random.default_rng(seed)
    rows = []
    for i, rank in enumerate(ranks):
        levels = np.linspace(1.0, 0.1, n)  # the score of rank 1, 2, ..., n
        others = [j for j in range(n) if j != i]
        rng.shuffle(others)
        order = others[: rank - 1] + [i] + others[rank - 1 :]  # item at each rank
        row = np.empty(n, dtype=np.float32)
        row[order] = levels
        rows.append(row)
    return np.stack(rows)


def test_identical_embeddings_give_full_recall():
    rng = np.random.default_rng(1)
    queries, items = rng.normal(size=(12, 16)), rng.normal(size=(9, 16))
    assert recall_at_k(queries, items, queries, items) == {"recall@1": 1.0, "recall@5": 1.0}


def test_small_perturbation_keeps_recall():
    """Well-separated scores survive a perturbation far below the score margins."""
    items = one_hot(8)
    queries = items + 0.05  # truth i, margin 1 over every other item
    rng = np.random.default_rng(2)
    noisy_q = queries + rng.normal(scale=1e-3, size=queries.shape)
    noisy_i = items + rng.normal(scale=1e-3, size=items.shape)
    assert recall_at_k(queries, items, noisy_q, noisy_i, ks=(1,)) == {"recall@1": 1.0}


def test_recall_counts_the_rank_of_the_fp32_top1_in_the_candidate_ranking():
    ranks = [1, 1, 2, 3, 5, 6, 8, 1]
    items = one_hot(len(ranks))
    reference_queries = one_hot(len(ranks))  # fp32: query i's top-1 is item i
    candidate_queries = queries_ranking_truth_at(ranks)
    recall = recall_at_k(reference_queries, items, candidate_queries, items, ks=(1, 2, 3, 5, 8))
    expected = {f"recall@{k}": sum(r <= k for r in ranks) / len(ranks) for k in (1, 2, 3, 5, 8)}
    assert recall == expected  # 3/8, 4/8, 5/8, 6/8, 8/8


def test_truth_comes_from_the_reference_not_the_candidate():
    """The same candidate scored against two references: the truth moves with the reference."""
    ranks = [2, 2, 2, 2]
    items = one_hot(4)
    candidate_queries = queries_ranking_truth_at(ranks)  # item i is the candidate's 2nd
    top1 = candidate_queries.argmax(1)  # ... and these items are the candidate's 1st
    assert recall_at_k(one_hot(4), items, candidate_queries, items, ks=(1,))["recall@1"] == 0.0
    shifted = one_hot(4)[top1]  # a reference whose top-1 is the candidate's top-1
    assert recall_at_k(shifted, items, candidate_queries, items, ks=(1,))["recall@1"] == 1.0


def test_permuted_items_give_the_share_of_fixed_points():
    """Candidate items shuffled: only queries whose item stayed in place keep their top-1."""
    items = one_hot(8) + 0.01
    queries = one_hot(8)
    permutation = np.array([0, 2, 1, 3, 5, 4, 7, 6])  # fixed points: 0 and 3
    recall = recall_at_k(queries, items, queries, items[permutation], ks=(1,))
    assert recall == {"recall@1": 2 / 8}


def test_retrieval_agreement_pairs_each_direction_with_its_reference():
    """Text-to-image ranks images for each text, image-to-text ranks texts for each image."""
    from clipedge.calibration.pipeline import _retrieval_agreement

    texts, images = one_hot(6)[:, :4], one_hot(4)  # texts 4 and 5 are zero rows
    texts[4:] = [[1.0, 0.5, 0, 0], [0, 0, 0.5, 1.0]]  # their truths: images 0 and 3
    swapped = images[[1, 0, 2, 3]]  # candidate images 0 and 1 swapped
    agreement = _retrieval_agreement(
        {
            ("text", "fp32"): texts,
            ("vision", "fp32"): images,
            ("text", "int8"): texts,
            ("vision", "int8"): swapped,
        },
        ["int8"],
    )["int8"]
    # t2i: texts 0, 1 and 4 (truth image 0 or 1) lose their top-1, texts 2, 3, 5 keep it.
    assert agreement["text_to_image_recall@1"] == 3 / 6
    # i2t: images 0 and 1 now score texts for the other image; images 2 and 3 keep theirs.
    assert agreement["image_to_text_recall@1"] == 2 / 4
    assert agreement["text_to_image_recall@5"] == 1.0  # only 4 images: all within the top 5


# -- the block search's logic, on a converter whose accuracy is known ------------------------

DRIFT = {f"layers.{i}": d for i, d in enumerate([3e-4, 5e-3, 1e-4, 2e-3, 8e-4, 4e-4, 1e-3, 6e-4])}
OTHER_DRIFT = 5e-5  # embeddings and head, always converted by the search


class FakeConversions:
    """A converter that records which nodes each graph keeps float; its min cosine is 1 minus
    the drift of every converted block (and of the other nodes when converted)."""

    def __init__(self) -> None:
        self.blocks = {block: [f"{block}/a", f"{block}/b"] for block in DRIFT}
        self.others = ["embed", "head"]
        self.kept: dict[Path, frozenset[str]] = {}
        self.calls: list[Path] = []

    def convert(self, keep_float, destination: Path) -> Path:
        self.kept[destination] = frozenset(keep_float)
        self.calls.append(destination)
        return destination

    def min_cosine(self, graph: Path) -> float:
        return self.min_cosine_of(self.kept[graph])

    def min_cosine_of(self, kept: frozenset[str]) -> float:
        drift = sum(d for b, d in DRIFT.items() if not set(self.blocks[b]) <= kept)
        drift += 0.0 if set(self.others) <= kept else OTHER_DRIFT
        return 1.0 - drift

    @property
    def held_out(self):
        """A held-out set of six items scoring the graph's min cosine, each the next 0.001
        better (so the ranking's worst items include the first)."""
        return FakeHeldOut(self, offsets=[0.001 * i for i in range(6)])

    def cosine_with_float(self, blocks: list[str]) -> float:
        return 1.0 - OTHER_DRIFT - sum(d for b, d in DRIFT.items() if b not in blocks)


class FakeHeldOut:
    def __init__(self, conversions: FakeConversions, offsets: list[float]) -> None:
        self.conversions, self.offsets = conversions, offsets
        self.runs: list[frozenset[str]] = []  # the float nodes of each graph run on this set

    def __len__(self) -> int:
        return len(self.offsets)

    def cosines(self, graph):
        self.runs.append(self.conversions.kept[graph])
        return np.array([self.conversions.min_cosine(graph) + d for d in self.offsets])

    def subset(self, items):
        return FakeHeldOut(self.conversions, [self.offsets[i] for i in items])


RANKED = sorted(DRIFT, key=lambda b: -DRIFT[b])


@pytest.mark.parametrize("k", range(len(RANKED) + 1))
def test_search_returns_the_fewest_ranked_blocks_that_meet_the_target(tmp_path, k):
    fake = FakeConversions()
    target = fake.cosine_with_float(RANKED[:k])  # met with exactly k blocks, not with k - 1
    destination = tmp_path / "text.int8.onnx"
    lines: list[str] = []
    held_out = fake.held_out
    result = search.search_fallback(
        fake.convert, fake.blocks, fake.others, held_out, target, destination, lines.append
    )
    assert result.fp32_blocks == RANKED[:k]
    assert result.min_cosine == pytest.approx(target, abs=1e-12) and result.min_cosine >= target
    assert result.graph == destination
    # The graph left at the destination is the one reported, not the last trial.
    assert fake.kept[destination] == {n for b in RANKED[:k] for n in fake.blocks[b]}
    # Sensitivity is measured only when the whole-tower conversion misses the target.
    assert result.sensitivity == (pytest.approx(DRIFT) if k else {})
    builds = fake.calls.count(destination)
    steps = math.ceil(math.log2(len(DRIFT)))
    assert builds <= 3 + 2 * steps, "doubling then bisecting, not a linear scan"
    # Only the whole tower and variants that meet the target run on every held-out item.
    whole, *passes = held_out.runs
    assert whole == frozenset()
    assert all(fake.min_cosine_of(kept) >= target for kept in passes)
    assert (1 if k else 0) <= len(passes) <= 1 + steps  # the chosen k was judged on all
    # Progress: one line per ranked unit with the time left, and the units kept float.
    ranked_lines = [line for line in lines if line.strip().startswith("ranked")]
    assert len(ranked_lines) == (len(DRIFT) if k else 0)
    assert all("left" in line for line in ranked_lines[:-1])
    if k:
        assert lines[-1] == f"kept float: {', '.join(RANKED[:k])}"


def test_an_item_the_whole_tower_turns_to_nan_is_among_the_worst(tmp_path):
    fake = FakeConversions()
    held_out = FakeHeldOut(fake, offsets=[0.0, 0.001, 0.002, 0.003, 0.004, float("nan")])
    chosen = []
    subset = held_out.subset
    held_out.subset = lambda items: chosen.extend(items) or subset(items)
    search.search_fallback(fake.convert, fake.blocks, fake.others, held_out, 0.999, tmp_path / "g")
    assert 5 in chosen and len(chosen) == search.RANKING_ITEMS


def test_search_trials_leave_nothing_beside_the_graph_even_when_interrupted(tmp_path):
    fake = FakeConversions()
    calls: list[Path] = []

    def writing(keep_float, destination: Path, stop_at: int = 0) -> Path:
        destination.write_bytes(b"graph")
        calls.append(destination)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return fake.convert(keep_float, destination)

    target = fake.cosine_with_float(RANKED[:2])
    search.search_fallback(
        writing, fake.blocks, fake.others, fake.held_out, target, tmp_path / "g.onnx"
    )
    assert any("sensitivity" in p.name for p in calls)
    assert [p.name for p in tmp_path.iterdir()] == ["g.onnx"]
    calls.clear()  # Ctrl-C in the middle of the ranking (the whole tower, then 2 trials)
    with pytest.raises(KeyboardInterrupt):
        search.search_fallback(
            lambda keep, dst: writing(keep, dst, stop_at=4),
            fake.blocks,
            fake.others,
            fake.held_out,
            target,
            tmp_path / "h.onnx",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.onnx", "h.onnx"]


def test_search_falls_back_every_block_when_the_target_is_out_of_reach(tmp_path):
    fake = FakeConversions()
    destination = tmp_path / "g.onnx"
    result = search.search_fallback(
        fake.convert, fake.blocks, fake.others, fake.held_out, 1.0, destination
    )
    assert result.fp32_blocks == RANKED
    assert result.min_cosine == pytest.approx(1.0 - OTHER_DRIFT)
    assert fake.kept[destination] == {n for names in fake.blocks.values() for n in names}


@pytest.mark.parametrize(
    ("count", "held"), [(2, 1), (8, 4), (24, 12), (64, 32), (100, 32), (256, 64), (1000, 250)]
)
def test_held_out_set_is_at_least_32_where_half_the_items_allow(count, held, caplog):
    from clipedge.calibration.data import MIN_HELD_OUT, split_held_out

    items = list(range(count))
    calibrate, held_out = split_held_out(items, 0.25)
    assert len(held_out) == held and calibrate + held_out == items
    assert not set(calibrate) & set(held_out)
    warned = "held out to judge accuracy" in caplog.text
    assert warned == (held < MIN_HELD_OUT)


def test_held_out_items_are_scored_against_their_own_rows(tmp_path, monkeypatch):
    """Each item is scored against its own reference row; a subset keeps the rows (and the
    batches) its items came from."""
    reference = np.eye(5, dtype=np.float32)
    feeds = [{"x": reference[:2]}, {"x": reference[2:5]}]
    held_out = search.HeldOut("vision", feeds, reference)
    flipped = {0: 1.0, 1: 1.0, 2: 1.0, 3: -1.0, 4: 1.0}  # row 3 points the other way
    runs = []

    class Session:
        def run(self, feed):
            runs.append(len(feed["x"]))
            return feed["x"] * np.array([[flipped[int(np.argmax(r))]] for r in feed["x"]])

    monkeypatch.setattr(search, "cpu_session", lambda graph: Session())
    monkeypatch.setattr(
        search, "pooled_embeddings", lambda s, tower, fs: np.concatenate([s.run(f) for f in fs])
    )
    assert len(held_out) == 5
    assert held_out.cosines(tmp_path) == pytest.approx([1.0, 1.0, 1.0, -1.0, 1.0])
    worst = held_out.subset([3, 1])
    assert len(worst) == 2 and [len(f["x"]) for f in worst.feeds] == [1, 1]
    runs.clear()
    assert worst.cosines(tmp_path) == pytest.approx([1.0, -1.0])  # items 1 and 3, in order
    assert runs == [1, 1], "only the chosen items run"


# -- the block search and the report on the tiny bundle ---------------------------------------

skimage_data = pytest.importorskip("skimage.data", reason="real photographs for calibration")
PHOTO_GLOB = str(Path(skimage_data.data_dir) / "*.png")
CAPTIONS = FIXTURE.parent / "calibration" / "captions.jsonl"


def _calibration():
    from clipedge.calibration.data import CalibrationSet

    return CalibrationSet.from_sources(PHOTO_GLOB, CAPTIONS, limit=12)


@pytest.fixture(scope="module")
def vision_case(tiny_bundle, tmp_path_factory):
    """The vision tower as int8-cpu converts it: measured whole and with one block float.

    The target lies between the whole-tower conversion (missing it on the calibration and
    the held-out feeds) and the best one-block fallback (meeting it on both).
    """
    import onnx

    import clipedge
    from clipedge.calibration.blocks import nodes_by_block
    from clipedge.calibration.data import tower_feeds
    from clipedge.calibration.precisions import PRECISIONS, Conversion
    from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings

    work = tmp_path_factory.mktemp("search")
    graph = tiny_bundle / "vision.onnx"
    calibration = _calibration()
    model = clipedge.load(tiny_bundle, backend="cpu", precision="fp32")
    feeds = {held: tower_feeds(model, "vision", calibration, held) for held in (False, True)}
    fp32 = cpu_session(graph)
    reference = {held: pooled_embeddings(fp32, "vision", f) for held, f in feeds.items()}
    convert = PRECISIONS["int8-cpu"].make_converter(graph, feeds[False], Conversion())
    onnx_model = onnx.load(str(graph), load_external_data=False)
    blocks = nodes_by_block(onnx_model)
    inside = {name for names in blocks.values() for name in names}

    def measure(keep: list[str], name: str) -> dict[bool, float]:
        session = cpu_session(convert(keep, work / name))
        return {
            held: cosine_stats(reference[held], pooled_embeddings(session, "vision", f))[
                "cosine_min"
            ]
            for held, f in feeds.items()
        }

    whole = measure([], "whole.onnx")
    single = {b: measure(nodes, f"only-{b}.onnx") for b, nodes in blocks.items()}
    best = max(single, key=lambda b: min(single[b].values()))
    low, high = max(whole.values()), min(single[best].values())
    assert low < high, f"no one-block fallback beats the whole tower: {whole} {single}"
    return {
        "graph": graph,
        "feeds": feeds,
        "reference": reference,
        "convert": convert,
        "blocks": blocks,
        "others": [n.name for n in onnx_model.graph.node if n.name not in inside],
        "calibration": calibration,
        "target": (low + high) / 2,
        "whole": whole,
        "single": single,
        "work": work,
    }


def test_search_meets_a_target_the_whole_tower_misses(vision_case):
    from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings

    case = vision_case
    target = case["target"]
    assert max(case["whole"].values()) < target  # the whole-tower conversion misses it
    result = search.search_fallback(
        case["convert"],
        case["blocks"],
        case["others"],
        search.HeldOut("vision", case["feeds"][True], case["reference"][True]),
        target,
        case["work"] / "vision.int8-cpu.onnx",
    )
    assert result.min_cosine >= target
    # One block suffices (measured): the search keeps exactly one, the most sensitive.
    assert len(result.fp32_blocks) == 1
    assert result.fp32_blocks[0] == max(result.sensitivity, key=result.sensitivity.get)
    assert min(case["single"][result.fp32_blocks[0]].values()) >= target
    session = cpu_session(result.graph)
    for held in (False, True):  # the graph on disk, re-measured, calibration and held-out
        embeddings = pooled_embeddings(session, "vision", case["feeds"][held])
        cosine = cosine_stats(case["reference"][held], embeddings)["cosine_min"]
        assert cosine >= target, ("held-out" if held else "calibration", cosine, target)
        if held:  # the search judged the held-out set, as the report does
            assert cosine == pytest.approx(result.min_cosine)


def test_calibrate_meets_the_target_on_held_out_and_reports_float_blocks(
    vision_case, tiny_bundle, tmp_path
):
    from clipedge.calibration.pipeline import calibrate_bundle

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    target = vision_case["target"]
    results = calibrate_bundle(
        bundle,
        ["int8-cpu"],
        vision_case["calibration"],
        targets={"int8-cpu": target},
        report=lambda line: None,
    )
    rows = {r.tower: r for r in results}
    vision = rows["vision"]
    assert vision.target_cosine == target
    assert vision.cosine_min >= target and vision.passed  # held-out, measured by the report
    assert len(vision.fp32_blocks) == 1 and vision.fp32_blocks[0] in vision_case["blocks"]
    assert rows["text"].passed and rows["text"].cosine_min >= target
    manifest = json.loads((bundle / "clipedge.json").read_text())
    accuracy = manifest["towers"]["vision"]["graphs"]["int8-cpu"]["accuracy"]
    assert accuracy["fp32_blocks"] == vision.fp32_blocks and accuracy["passed"]
    report = json.loads((bundle / "accuracy_report.json").read_text())
    (row,) = [r for r in report["towers"] if r["tower"] == "vision"]
    assert row["fp32_blocks"] == vision.fp32_blocks and row["cosine_min"] >= target


def test_openvino_search_leaves_the_chosen_graph_at_the_destination(vision_case):
    """int8-ov trials all come from one NNCF run and rewrite the same path: the graph left
    there, measured afresh, is the one the search reported, and it meets the target."""
    pytest.importorskip("nncf", reason="int8-ov needs the optional nncf package")
    from clipedge.calibration.precisions import PRECISIONS, Conversion
    from clipedge.calibration.report import cosine_stats, cpu_session, pooled_embeddings

    case = vision_case
    feeds, reference = case["feeds"][True], case["reference"][True]
    convert = PRECISIONS["int8-ov"].make_converter(
        case["graph"], case["feeds"][False], Conversion()
    )
    destination = case["work"] / "vision.int8-ov.xml"
    whole = convert([], destination)
    whole_cos = cosine_stats(reference, pooled_embeddings(cpu_session(whole), "vision", feeds))
    target = 1.0 - (1.0 - whole_cos["cosine_min"]) / 4  # needs float blocks
    lines: list[str] = []
    result = search.search_fallback(
        convert,
        case["blocks"],
        case["others"],
        search.HeldOut("vision", feeds, reference),
        target,
        destination,
        lines.append,
    )
    assert result.fp32_blocks and result.graph == destination
    again = pooled_embeddings(cpu_session(destination), "vision", feeds)
    assert cosine_stats(reference, again)["cosine_min"] == pytest.approx(result.min_cosine)
    assert result.min_cosine >= target or len(result.fp32_blocks) == len(case["blocks"])
    assert sum("ranked" in line for line in lines) == len(case["blocks"])
    assert not list(case["work"].glob("sensitivity-*")), "trial graphs are removed"


# -- memory: per-stage peaks, the statistics feeds and the plan -------------------------------


def test_stages_log_time_and_a_peak_that_covers_what_the_stage_allocated():
    from clipedge.calibration import memory

    lines = []
    stages = memory.Stages(report=lines.append)
    with memory.scope(stages, "text int8-ov"), stages("text int8-ov", "total"):
        with memory.stage("statistics"):
            block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, touched
            del block
        with memory.stage("report"):
            pass
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == [
        "statistics",
        "report",
        "total",
    ]
    assert all(
        line.startswith("[calibrate] text int8-ov: ") and "peak RSS" in line for line in lines
    )
    records = {r.name: r for r in stages.records}
    if stages.exact:  # Linux: the kernel's per-stage peak
        assert records["text int8-ov: statistics"].peak_bytes >= 64 << 20
        assert (
            records["text int8-ov: total"].peak_bytes
            >= records["text int8-ov: statistics"].peak_bytes
        )
    with memory.stage("outside any scope"):  # logs nothing, fails nothing
        pass
    assert len(lines) == 3


def test_statistics_feeds_cut_long_batches_into_row_groups_of_views():
    from clipedge.calibration.openvino_int8 import statistics_feeds, tokens_per_row

    text = {"input_ids": np.ones((8, 512), np.int64), "attention_mask": np.ones((8, 512), np.int64)}
    short = {"input_ids": np.ones((8, 40), np.int64), "attention_mask": np.ones((8, 40), np.int64)}
    image = {"pixel_values": np.zeros((4, 3, 512, 512), np.float32)}
    assert tokens_per_row(text) == 512 and tokens_per_row(image) == 36 * 36 + 1
    cut = statistics_feeds([text, short, image], max_tokens=1645)
    assert [len(f["input_ids"]) if "input_ids" in f else len(f["pixel_values"]) for f in cut] == [
        3,
        3,
        2,
        8,
        1,
        1,
        1,
        1,
    ]
    assert all(np.shares_memory(f["input_ids"], text["input_ids"]) for f in cut[:3])
    assert statistics_feeds([text], None)[0]["input_ids"].shape == (8, 512)
    assert len(statistics_feeds([image], 10)) == 4  # one row at least


def test_the_memory_plan_refuses_a_budget_no_row_fits_and_plans_the_rest():
    from clipedge.calibration import memory
    from clipedge.errors import OptionError

    towers = {"text": (2_237_715_403, 512), "vision": (1_218_590_944, 1297)}
    lines = memory.check_budget(towers, ["int8-ov"], None)
    statistics = [line for line in lines if "statistics" in line]
    assert "text int8-ov statistics in feeds of <= " in statistics[0]
    assert "3 row(s) of 512" in statistics[0] and "1 row(s) of 1297" in statistics[1]
    assert memory.statistics_tokens(towers["text"][0], 8) < memory.statistics_tokens(
        towers["text"][0], None
    )
    every = ["int8-cpu", "int8-ov", "fp16", "int8"]
    lines = memory.check_budget(towers, every, 8)
    assert lines[-1] == "memory plan: one tower at a time within --max-memory 8 GB"
    assert len(lines) == 1 + 2 * 5  # each precision's conversion, int8-ov's statistics
    assert all(float(line.rsplit("~", 1)[1].split()[0]) <= 8 for line in lines[:-1])
    with pytest.raises(OptionError, match="--max-memory 6 GB cannot be met: .* vision input"):
        memory.check_budget({"vision": towers["vision"]}, ["int8-ov"], 6)
    with pytest.raises(OptionError, match="positive"):
        memory.check_budget(towers, ["fp16"], 0)
    # Measured full-size peaks (docs/benchmarks.md): int8-cpu text 7.3 GB, fp16 text 5.9 GB,
    # Q/DQ int8 text 7.6 GB, each refused up front under a budget it cannot meet.
    for precision, budget, least in (("int8-cpu", 7, 8), ("fp16", 5, 6), ("int8", 7, 8)):
        with pytest.raises(OptionError, match=f"{precision} of the text graph .* least {least} GB"):
            memory.check_budget(towers, [precision], budget)
    assert memory.check_budget({"vision": towers["vision"]}, ["int8-cpu"], 5)


def test_the_report_reuses_a_held_out_run_only_on_the_graph_it_ran(tmp_path, monkeypatch):
    reference = np.eye(3, dtype=np.float32)
    held_out = search.HeldOut("vision", [{"x": reference}], reference)

    class Session:
        def run(self, feed):
            return feed["x"]

    monkeypatch.setattr(search, "cpu_session", lambda graph: Session())
    monkeypatch.setattr(
        search, "pooled_embeddings", lambda s, tower, fs: np.concatenate([s.run(f) for f in fs])
    )
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"one")
    assert held_out.measured(graph) is None
    held_out.cosines(graph)
    embeddings, ms = held_out.measured(graph)
    assert np.array_equal(embeddings, reference) and ms >= 0
    graph.unlink()
    graph.write_bytes(b"other graph")  # the search rewrote the destination afterwards
    assert held_out.measured(graph) is None


def test_the_search_units_are_the_blocks_and_the_weighted_modules_outside_them(tiny_bundle):
    """With all 24 full-size image blocks float the int8 patch-embedding convolution alone
    held the tower at 0.98: it must be a unit the search can keep float."""
    import onnx

    from clipedge.calibration.blocks import nodes_by_block, nodes_by_unit

    for tower, outside in (("vision", "patch_embed"), ("text", "word_embeddings")):
        model = onnx.load(str(tiny_bundle / f"{tower}.onnx"), load_external_data=False)
        units, blocks = nodes_by_unit(model), nodes_by_block(model)
        assert list(units)[: len(blocks)] == list(blocks) and set(units) - set(blocks) == {outside}
        ops = {n.name: n.op_type for n in model.graph.node}
        assert {ops[name] for name in units[outside]} & {"Conv", "Gather"}
        names = [name for nodes in units.values() for name in nodes]
        assert len(names) == len(set(names))  # no node in two units
